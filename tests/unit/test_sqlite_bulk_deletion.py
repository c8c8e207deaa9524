"""SQLite's `deleting_in_bulk` (an eviction pass): no checkpoint in the pass's commits, one at
its end, so the database file itself holds the deletions afterwards; the usual checkpoint
threshold is back after the pass, also after a pass that failed."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from mirror.store.index import sqlite as sqlite_index
from mirror.store.index.sqlite import AUTOCHECKPOINT, BULK_AUTOCHECKPOINT, SqliteIndex


def rows_in_the_file_alone(db: Path, tmp_path: Path) -> int:
    """Blob rows the database file holds without its WAL (what was checkpointed)."""
    copy = tmp_path / "file-alone.db"
    shutil.copyfile(db, copy)
    conn = sqlite3.connect(copy)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM blobs").fetchone()[0])
    finally:
        conn.close()


async def autocheckpoint(index: SqliteIndex) -> int:
    async with index._db.execute("PRAGMA wal_autocheckpoint") as cur:
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_a_bulk_deletion_is_checkpointed_into_the_file_at_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A threshold of one page: outside bulk mode every commit here would checkpoint, so the
    # file alone holding the rows during the pass shows the threshold was lifted.
    monkeypatch.setattr(sqlite_index, "AUTOCHECKPOINT", 1)
    db = tmp_path / "index.db"
    index = await SqliteIndex.open(db)
    try:
        digests = [f"sha256:{n:064x}" for n in range(300)]
        for digest in digests:
            await index.add_blob(digest, 10, None)
        checkpoint = sqlite3.connect(db)
        checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the rows into the file
        checkpoint.close()
        assert rows_in_the_file_alone(db, tmp_path) == 300
        async with index.deleting_in_bulk():
            assert await autocheckpoint(index) == BULK_AUTOCHECKPOINT
            assert await index.forget_blobs(digests) == 3000
            # Committed, but in the WAL only: the file alone still has the rows.
            assert rows_in_the_file_alone(db, tmp_path) == 300
        assert await autocheckpoint(index) == 1
        assert rows_in_the_file_alone(db, tmp_path) == 0
    finally:
        await index.close()


async def test_a_failed_bulk_deletion_restores_the_checkpoint_threshold(tmp_path: Path) -> None:
    index = await SqliteIndex.open(tmp_path / "index.db")
    try:
        with pytest.raises(RuntimeError):
            async with index.deleting_in_bulk():
                raise RuntimeError("a pass failed")
        assert await autocheckpoint(index) == AUTOCHECKPOINT
    finally:
        await index.close()


async def test_a_bulk_pass_that_deleted_nothing_makes_no_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A max_age pass every 10 s that finds nothing opens no connection to checkpoint."""
    calls: list[Path] = []
    monkeypatch.setattr(sqlite_index, "_checkpoint", calls.append)
    index = await SqliteIndex.open(tmp_path / "index.db")
    try:
        async with index.deleting_in_bulk():
            pass
        assert calls == []
        async with index.deleting_in_bulk():
            await index.forget_blobs(["sha256:" + "e" * 64])
        assert calls == [tmp_path / "index.db"]
    finally:
        await index.close()


async def test_a_failed_end_checkpoint_does_not_fail_the_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(path: Path) -> None:
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(sqlite_index, "_checkpoint", failing)
    index = await SqliteIndex.open(tmp_path / "index.db")
    try:
        await index.add_blob("sha256:" + "f" * 64, 5, None)
        async with index.deleting_in_bulk():
            assert await index.forget_blobs(["sha256:" + "f" * 64]) == 5
        assert await index.get_blob("sha256:" + "f" * 64) is None
    finally:
        await index.close()
