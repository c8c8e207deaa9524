"""SQLite schema 4: an index of version 3 (blob_repositories a rowid table with two indexes)
is rebuilt once, keyed digest first, keeping every row; workers opening at once all succeed."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from mirror.store.index.sqlite import SCHEMA_VERSION, SqliteIndex

VERSION_3_HOLDERS = """
DROP TABLE blob_repositories;
CREATE TABLE blob_repositories (
    registry TEXT NOT NULL, repository TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (registry, repository, digest)
);
CREATE INDEX blob_repositories_by_digest ON blob_repositories (digest);
PRAGMA user_version=3;
"""


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


async def version_3_index(path: Path) -> None:
    """A file as version 3 left it: two blobs, each held by two repositories."""
    await (await SqliteIndex.open(path)).close()
    db = sqlite3.connect(path)
    db.executescript(VERSION_3_HOLDERS)
    for n in (1, 2):
        db.execute("INSERT INTO blobs VALUES (?, 10, NULL, 1.0, 1.0)", (digest(n),))
        for repository in ("team/a", "team/b"):
            db.execute(
                "INSERT INTO blob_repositories VALUES ('docker.io', ?, ?)", (repository, digest(n))
            )
    db.commit()
    db.close()


def shape(path: Path) -> tuple[int, str, list[str]]:
    db = sqlite3.connect(path)
    try:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        sql = str(
            db.execute("SELECT sql FROM sqlite_master WHERE name = 'blob_repositories'").fetchone()[
                0
            ]
        )
        indexes = [
            str(r[0])
            for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' "
                "AND tbl_name = 'blob_repositories'"
            )
        ]
        return version, sql, indexes
    finally:
        db.close()


async def test_a_version_3_index_is_rebuilt_keyed_by_digest_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    await version_3_index(path)
    index = await SqliteIndex.open(path)
    try:
        version, sql, indexes = shape(path)
        assert version == SCHEMA_VERSION == 4
        assert "PRIMARY KEY (digest, registry, repository)" in sql and "WITHOUT ROWID" in sql
        assert indexes == []  # no rowid table, no second index
        assert await index.integrity_ok()  # what start-up checks (recovery.py)
        for n in (1, 2):
            for repository in ("team/a", "team/b"):
                assert await index.holds("docker.io", repository, digest(n))
        assert not await index.holds("docker.io", "team/c", digest(1))
        await index.add_holder("docker.io", "team/c", digest(1))
        assert await index.holds("docker.io", "team/c", digest(1))
        assert await index.forget_blobs([digest(1)]) == 10
        assert not await index.holds("docker.io", "team/a", digest(1))
        assert await index.holds("docker.io", "team/b", digest(2))
    finally:
        await index.close()


async def test_workers_opening_a_version_3_index_at_once_all_open_it(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    await version_3_index(path)
    indexes = await asyncio.gather(*(SqliteIndex.open(path) for _ in range(4)))
    try:
        for index in indexes:
            assert await index.holds("docker.io", "team/b", digest(2))
        assert shape(path)[0] == 4
    finally:
        for index in indexes:
            await index.close()


async def test_a_new_index_with_holders_passes_the_start_up_damage_check(tmp_path: Path) -> None:
    """SQLite 3.40's quick_check misreads a WITHOUT ROWID table whose columns are declared in
    another order than its key: a fine index would be moved aside at every start."""
    index = await SqliteIndex.open(tmp_path / "index.db")
    try:
        await index.add_holder("docker.io", "team/a", digest(1))
        assert await index.integrity_ok()
    finally:
        await index.close()


async def test_a_version_4_index_is_not_rebuilt_at_each_start(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    index = await SqliteIndex.open(path)
    await index.add_holder("docker.io", "team/a", digest(1))
    await index.close()

    def root_page() -> int:
        db = sqlite3.connect(path)
        try:
            return int(
                db.execute(
                    "SELECT rootpage FROM sqlite_master WHERE name = 'blob_repositories'"
                ).fetchone()[0]
            )
        finally:
            db.close()

    before = root_page()
    await (await SqliteIndex.open(path)).close()
    assert root_page() == before  # a rebuilt table would be a new B-tree elsewhere
