"""The SQLite index (aiosqlite, WAL): schema, migrations and queries, nothing else.

Files on disk are the truth for *content*; the index records what is known *about* it: sizes,
media types, which repository a manifest came from, and which digest a tag pointed at when it
was last confirmed upstream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    digest      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    media_type  TEXT,
    created     REAL NOT NULL,
    last_access REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS manifests (
    registry    TEXT NOT NULL,
    repository  TEXT NOT NULL,
    digest      TEXT NOT NULL,
    media_type  TEXT NOT NULL,
    created     REAL NOT NULL,
    PRIMARY KEY (registry, repository, digest)
);
CREATE INDEX IF NOT EXISTS manifests_by_digest ON manifests (digest);
CREATE TABLE IF NOT EXISTS tags (
    registry    TEXT NOT NULL,
    repository  TEXT NOT NULL,
    tag         TEXT NOT NULL,
    digest      TEXT NOT NULL,
    confirmed   REAL NOT NULL,
    PRIMARY KEY (registry, repository, tag)
);
"""


@dataclass(frozen=True, slots=True)
class TagRow:
    digest: str
    confirmed: float  # wall-clock seconds when upstream last confirmed this mapping


class Index:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._db = conn

    @classmethod
    async def open(cls, path: Path) -> Index:
        conn = await aiosqlite.connect(path)
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=NORMAL")
        await conn.executescript(_SCHEMA)
        await conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        await conn.commit()
        return cls(conn)

    async def close(self) -> None:
        await self._db.close()

    async def ping(self) -> bool:
        async with self._db.execute("SELECT 1") as cur:
            return await cur.fetchone() is not None

    async def get_blob(self, digest: str) -> int | None:
        """The size of an indexed blob, or None."""
        async with self._db.execute("SELECT size FROM blobs WHERE digest=?", (digest,)) as cur:
            row = await cur.fetchone()
        return None if row is None else int(row[0])

    async def _upsert_blob(
        self, digest: str, size: int, media_type: str | None, now: float
    ) -> None:
        await self._db.execute(
            "INSERT INTO blobs (digest, size, media_type, created, last_access) "
            "VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(digest) DO UPDATE SET last_access=excluded.last_access",
            (digest, size, media_type, now, now),
        )

    async def add_blob(self, digest: str, size: int, media_type: str | None) -> None:
        await self._upsert_blob(digest, size, media_type, time.time())
        await self._db.commit()

    async def forget_blob(self, digest: str) -> None:
        await self._db.execute("DELETE FROM blobs WHERE digest=?", (digest,))
        await self._db.commit()

    async def get_manifest_type(self, registry: str, repository: str, digest: str) -> str | None:
        async with self._db.execute(
            "SELECT media_type FROM manifests WHERE registry=? AND repository=? AND digest=?",
            (registry, repository, digest),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def add_manifest(
        self, registry: str, repository: str, digest: str, media_type: str, size: int
    ) -> None:
        now = time.time()
        await self._upsert_blob(digest, size, media_type, now)
        await self._db.execute(
            "INSERT OR IGNORE INTO manifests (registry, repository, digest, media_type, created) "
            "VALUES (?, ?, ?, ?, ?)",
            (registry, repository, digest, media_type, now),
        )
        await self._db.commit()

    async def get_tag(self, registry: str, repository: str, tag: str) -> TagRow | None:
        async with self._db.execute(
            "SELECT digest, confirmed FROM tags WHERE registry=? AND repository=? AND tag=?",
            (registry, repository, tag),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else TagRow(str(row[0]), float(row[1]))

    async def set_tag(
        self, registry: str, repository: str, tag: str, digest: str, confirmed: float
    ) -> None:
        await self._db.execute(
            "INSERT INTO tags (registry, repository, tag, digest, confirmed) "
            "VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(registry, repository, tag) DO UPDATE SET "
            "digest=excluded.digest, confirmed=excluded.confirmed",
            (registry, repository, tag, digest, confirmed),
        )
        await self._db.commit()

    async def delete_tag(self, registry: str, repository: str, tag: str) -> None:
        await self._db.execute(
            "DELETE FROM tags WHERE registry=? AND repository=? AND tag=?",
            (registry, repository, tag),
        )
        await self._db.commit()

    async def list_tags(self, registry: str, repository: str) -> list[str]:
        async with self._db.execute(
            "SELECT tag FROM tags WHERE registry=? AND repository=? ORDER BY tag",
            (registry, repository),
        ) as cur:
            return [str(r[0]) async for r in cur]
