"""Start-up's damage check (recovery.py `_open_index`) moves an index aside only when SQLite
calls the file damaged; an index it cannot open for another reason (a schema newer than this
mirror's, a file it cannot open, the disk full) stops the start and is left as it was, its
pins and tags with it."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mirror.recovery import IndexOpenError, open_checked
from mirror.store.blobs import BlobStore
from mirror.store.index.sqlite import SqliteIndex
from tests.fixtures.procs import free_port


async def pinned_index(path: Path) -> None:
    index = await SqliteIndex.open(path)
    await index.pin("docker.io", "team/a", "v1", {"sha256:" + "d" * 64})
    await index.close()


def set_version(path: Path, version: int) -> None:
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={version}")
    db.commit()
    db.close()


async def test_a_schema_newer_than_this_mirror_stops_the_start_and_is_kept(
    tmp_path: Path,
) -> None:
    path = tmp_path / "index.db"
    await pinned_index(path)
    set_version(path, 99)
    with pytest.raises(IndexOpenError, match="version 99 is newer"):
        await open_checked(BlobStore(tmp_path), path)
    assert [p.name for p in tmp_path.glob("index.db.damaged-*")] == []
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 99
    assert db.execute("SELECT COUNT(*) FROM pins").fetchone()[0] == 1
    db.close()


async def test_an_index_that_cannot_be_opened_is_not_taken_for_damaged(tmp_path: Path) -> None:
    """SQLITE_CANTOPEN (here: a directory where the file should be), not corruption."""
    path = tmp_path / "index.db"
    path.mkdir()
    with pytest.raises(IndexOpenError, match="cannot be opened"):
        await open_checked(BlobStore(tmp_path), path)
    assert path.is_dir() and [p.name for p in tmp_path.glob("index.db.damaged-*")] == []


@pytest.mark.parametrize("workers", [1, 2])
async def test_mirror_serve_says_why_and_exits_1(tmp_path: Path, workers: int) -> None:
    path = tmp_path / "index.db"
    await pinned_index(path)
    set_version(path, 99)
    argv = [
        sys.executable, "-m", "mirror", "serve", "--data", str(tmp_path), "--workers", str(workers),
        "--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}",
    ]  # fmt: skip
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "mirror: index" in done.stderr and "newer than this mirror's" in done.stderr
    assert "Traceback" not in done.stderr
