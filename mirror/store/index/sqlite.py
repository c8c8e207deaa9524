"""The SQLite index engine (aiosqlite, WAL): the embedded default; schema, migrations and
queries, nothing else.

Files on disk are the truth for *content*; the index records what is known *about* it: sizes,
media types, which repository a manifest came from, and which digest a tag pointed at when it
was last confirmed upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import aiosqlite

from mirror.store.index.base import ImageRow, TagRow, Traffic

# 2: blob_repositories; 3: usage_totals; 4: blob_repositories keyed by digest first
SCHEMA_VERSION = 4

log = logging.getLogger(__name__)

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
CREATE INDEX IF NOT EXISTS blobs_by_access ON blobs (last_access);
CREATE TABLE IF NOT EXISTS refs (
    parent      TEXT NOT NULL,  -- a manifest digest
    child       TEXT NOT NULL,  -- a config, layer or child manifest it names
    size        INTEGER NOT NULL,
    PRIMARY KEY (parent, child)
);
CREATE INDEX IF NOT EXISTS refs_by_child ON refs (child);
CREATE TABLE IF NOT EXISTS pins (
    registry    TEXT NOT NULL,
    repository  TEXT NOT NULL,
    reference   TEXT NOT NULL,
    digest      TEXT NOT NULL,  -- everything the image names, each digest its own row
    PRIMARY KEY (registry, repository, reference, digest)
);
CREATE INDEX IF NOT EXISTS pins_by_digest ON pins (digest);
CREATE TABLE IF NOT EXISTS tags (
    registry    TEXT NOT NULL,
    repository  TEXT NOT NULL,
    tag         TEXT NOT NULL,
    digest      TEXT NOT NULL,
    confirmed   REAL NOT NULL,
    PRIMARY KEY (registry, repository, tag)
);
CREATE INDEX IF NOT EXISTS tags_by_digest ON tags (digest);
CREATE TABLE IF NOT EXISTS blob_repositories (
    digest      TEXT NOT NULL,  -- a blob this repository is known to hold without a cached
    registry    TEXT NOT NULL,  -- manifest of it naming the blob: fetched under it, or
    repository  TEXT NOT NULL,  -- confirmed by the upstream as it (see membership.py)
    PRIMARY KEY (digest, registry, repository)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS traffic (
    hour            INTEGER PRIMARY KEY,  -- unix time // 3600
    cache_bytes     INTEGER NOT NULL DEFAULT 0,  -- blob bytes served without crossing the internet
    upstream_bytes  INTEGER NOT NULL DEFAULT 0,  -- blob bytes served from a download they started
    hits            INTEGER NOT NULL DEFAULT 0,  -- manifest and blob requests answered locally
    misses          INTEGER NOT NULL DEFAULT 0
);
-- Bytes and rows of `blobs`, kept by triggers in the transaction that changes them: `usage()`
-- is asked every few seconds (metrics) and, with a shared index, before each reservation; a
-- SUM over a million rows is 0.12 s of a core each time. The row is made after the triggers,
-- from a SUM in the same statement, so a blob inserted by another process meanwhile is counted
-- by one or the other, never both (an index older than version 3 is counted here once).
CREATE TABLE IF NOT EXISTS usage_totals (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    bytes   INTEGER NOT NULL,
    blobs   INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS usage_on_insert AFTER INSERT ON blobs BEGIN
    UPDATE usage_totals SET bytes = bytes + NEW.size, blobs = blobs + 1;
END;
CREATE TRIGGER IF NOT EXISTS usage_on_delete AFTER DELETE ON blobs BEGIN
    UPDATE usage_totals SET bytes = bytes - OLD.size, blobs = blobs - 1;
END;
INSERT INTO usage_totals (id, bytes, blobs)
    SELECT 1, (SELECT COALESCE(SUM(size), 0) FROM blobs), (SELECT COUNT(*) FROM blobs)
    WHERE NOT EXISTS (SELECT 1 FROM usage_totals);
"""


AUTOCHECKPOINT = 16384  # pages of WAL (64 MiB) after which a commit checkpoints
# ... while an eviction pass deletes: 1 GiB, which a pass of 10% at a million blobs (about
# 400 MiB of WAL) does not reach; the pass checkpoints at its end instead.
BULK_AUTOCHECKPOINT = 262144

# Schema 4: blob_repositories was a rowid table with two indexes, its key (registry,
# repository, digest) and digest alone. Its only questions are one row by all three columns
# and every row of a digest (forgetting a blob), so one B-tree keyed digest first answers
# both: an eviction pass deleting 10% of a million blobs rewrote three B-trees' pages all
# over them, and now one. Rebuilt once, in the transaction that records the version: a
# worker opening meanwhile waits (busy timeout) and finds it done. The columns are declared
# in the key's order: with any other, SQLite 3.40's `quick_check` (Debian 12's; start-up's
# damage check, recovery.py) reports every row's key columns as NULL, and the index would be
# moved aside as damaged.
_MIGRATE_TO_4 = """
CREATE TABLE blob_repositories_4 (
    digest      TEXT NOT NULL,
    registry    TEXT NOT NULL,
    repository  TEXT NOT NULL,
    PRIMARY KEY (digest, registry, repository)
) WITHOUT ROWID;
INSERT INTO blob_repositories_4 (digest, registry, repository)
    SELECT digest, registry, repository FROM blob_repositories ORDER BY digest;
DROP TABLE blob_repositories;
ALTER TABLE blob_repositories_4 RENAME TO blob_repositories;
"""

# Bound parameters per `IN (...)`: under SQLite's historical limit of 999 variables.
_IN_CHUNK = 500
# What else names a blob by digest, cleared with its row.
_RECORDS_ABOUT_A_BLOB = (
    ("manifests", "digest"),
    ("refs", "parent"),
    ("tags", "digest"),
    ("blob_repositories", "digest"),
)


class SchemaTooNew(Exception):
    """The file was written by a newer mirror: opened here, its newer shape would be marked
    with this version, and a later upgrade would migrate it a second time."""


async def _migrate(conn: aiosqlite.Connection) -> None:
    """Rebuild what an index of an older version holds in an older shape. The supervisor
    opens the index before it starts its workers, so it is the one that migrates; the
    version is read and written inside one IMMEDIATE transaction all the same, so that any
    other opener (`mirror` tools, a worker restarted meanwhile) waits for it and finds it
    done. A new file is left to `_SCHEMA`."""
    await conn.execute("BEGIN IMMEDIATE")
    try:
        async with conn.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"index schema version {version} is newer than this mirror's "
                f"{SCHEMA_VERSION}: written by a newer release"
            )
        async with conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'blob_repositories'"
        ) as cur:
            had_table = await cur.fetchone() is not None
        if had_table and version < 4:
            for statement in _MIGRATE_TO_4.split(";"):
                if statement.strip():
                    await conn.execute(statement)
            await conn.execute("PRAGMA user_version=4")
        await conn.commit()
    except BaseException:
        await conn.rollback()
        raise


def _checkpoint(path: Path) -> None:
    """A passive checkpoint of the WAL, on a connection opened and closed in this thread."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        conn.close()


def _in_chunks(digests: list[str]) -> Iterator[tuple[list[str], str]]:
    """`digests` in chunks of _IN_CHUNK, each with its `?,?,...` for an `IN (...)`."""
    for start in range(0, len(digests), _IN_CHUNK):
        chunk = digests[start : start + _IN_CHUNK]
        yield chunk, ",".join("?" * len(chunk))


def _like(text: str) -> str:
    """A LIKE pattern matching `text` anywhere, its own % and _ taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


P = ParamSpec("P")
R = TypeVar("R")


def _serialized(
    method: Callable[Concatenate[SqliteIndex, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[SqliteIndex, P], Coroutine[Any, Any, R]]:
    """One index operation at a time on the connection.

    aiosqlite runs statements one by one, but an operation awaits between them: without this,
    another operation's statements would run inside its transaction, or its BEGIN IMMEDIATE
    would come while a SELECT of this connection still holds an old snapshot, which SQLite
    answers with "database is locked" at once (no busy wait) when another worker has written.
    """

    @functools.wraps(method)
    async def serialized(self: SqliteIndex, /, *args: P.args, **kwargs: P.kwargs) -> R:
        async with self._lock:
            try:
                return await method(self, *args, **kwargs)
            except BaseException:
                # An operation that failed half-way (a value SQLite cannot bind, a
                # cancellation) leaves nothing behind: its open transaction would keep the
                # database's write lock from every other worker, and the next operation's
                # COMMIT would land its half.
                with contextlib.suppress(Exception):
                    if self._db.in_transaction:
                        await self._db.rollback()
                raise

    return serialized


class SqliteIndex:
    def __init__(
        self, conn: aiosqlite.Connection, reader: aiosqlite.Connection, path: Path
    ) -> None:
        self._path = path
        self._forgotten_in_bulk = 0  # blob rows forgotten since `deleting_in_bulk` began
        self._db = conn
        self._lock = asyncio.Lock()
        # The hit path's one question (`holds`, the first hit of a blob in a repository) goes
        # to a connection of its own: WAL lets it read while the writer's thread is in an
        # eviction pass's transaction, instead of queueing behind it on `_lock` (p99 at 1M).
        self._reader = reader

    @classmethod
    async def open(cls, path: Path) -> SqliteIndex:
        # Several worker processes write: wait for a busy database rather than fail. Writes
        # begin IMMEDIATE: a deferred transaction that reads first and then writes gets
        # SQLITE_BUSY at once, without waiting, when another process committed in between.
        conn = await aiosqlite.connect(path, timeout=30, isolation_level="IMMEDIATE")
        try:
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA synchronous=NORMAL")
            # 64 MiB of pages (default 2): an eviction pass deletes rows all over the digest
            # index (80 MB at a million blobs); re-reading its pages cost 15% of a pass.
            await conn.execute("PRAGMA cache_size=-65536")
            # Checkpoint at 64 MiB of WAL (default 4 MiB): an eviction pass's transactions
            # rewrite the same index pages again and again (blobs_by_access, the digest indexes
            # across batches), and each checkpoint copied them to the database and synced it
            # again: a 10% pass at a million blobs, 22 s -> 16 s. The price: the commit that
            # runs a checkpoint (any process's) takes longer, up to about 0.3 s; the WAL file
            # is truncated back to 64 MiB after one. A pass itself checkpoints once, at its
            # end (`deleting_in_bulk`).
            await conn.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT}")
            await conn.execute(f"PRAGMA journal_size_limit={64 * 1024 * 1024}")
            await _migrate(conn)
            await conn.executescript(_SCHEMA)
            await conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            await conn.commit()
        except BaseException:
            await conn.close()  # its worker thread would otherwise keep the process alive
            raise
        try:
            reader = await aiosqlite.connect(path, timeout=30, isolation_level=None)
            await reader.execute("PRAGMA query_only=1")
        except BaseException:
            await conn.close()
            raise
        return cls(conn, reader, path)

    @_serialized
    async def close(self) -> None:
        await self._reader.close()
        await self._db.close()

    @_serialized
    async def ping(self) -> bool:
        async with self._db.execute("SELECT 1") as cur:
            return await cur.fetchone() is not None

    @_serialized
    async def get_blob(self, digest: str) -> int | None:
        """The size of an indexed blob, or None."""
        async with self._db.execute("SELECT size FROM blobs WHERE digest=?", (digest,)) as cur:
            row = await cur.fetchone()
        return None if row is None else int(row[0])

    @_serialized
    async def stored(self, digests: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(digests), 500):  # SQLite's bound on host parameters
            batch = digests[start : start + 500]
            marks = ",".join("?" * len(batch))
            query = f"SELECT digest FROM blobs WHERE digest IN ({marks})"
            async with self._db.execute(query, batch) as cur:
                found.update(str(row[0]) for row in await cur.fetchall())
        return found

    async def _upsert_blob(
        self, digest: str, size: int, media_type: str | None, now: float
    ) -> bool:
        """Insert the row, or refresh its access time; True if it is new."""
        cur = await self._db.execute(
            "INSERT OR IGNORE INTO blobs (digest, size, media_type, created, last_access) "
            "VALUES (?, ?, ?, ?, ?)",
            (digest, size, media_type, now, now),
        )
        if cur.rowcount:
            return True
        await self._db.execute("UPDATE blobs SET last_access = ? WHERE digest = ?", (now, digest))
        return False

    @_serialized
    async def add_blob(self, digest: str, size: int, media_type: str | None) -> bool:
        new = await self._upsert_blob(digest, size, media_type, time.time())
        await self._db.commit()
        return new

    @_serialized
    async def get_manifest_type(self, registry: str, repository: str, digest: str) -> str | None:
        async with self._db.execute(
            "SELECT media_type FROM manifests WHERE registry=? AND repository=? AND digest=?",
            (registry, repository, digest),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    @_serialized
    async def add_manifest(
        self,
        registry: str,
        repository: str,
        digest: str,
        media_type: str,
        size: int,
        children: list[tuple[str, int]],
    ) -> bool:
        now = time.time()
        new = await self._upsert_blob(digest, size, media_type, now)
        await self._db.executemany(
            "INSERT OR IGNORE INTO refs (parent, child, size) VALUES (?, ?, ?)",
            [(digest, child, child_size) for child, child_size in children],
        )
        await self._db.execute(
            "INSERT OR IGNORE INTO manifests (registry, repository, digest, media_type, created) "
            "VALUES (?, ?, ?, ?, ?)",
            (registry, repository, digest, media_type, now),
        )
        await self._db.commit()
        return new

    @_serialized
    async def get_tag(self, registry: str, repository: str, tag: str) -> TagRow | None:
        async with self._db.execute(
            "SELECT digest, confirmed FROM tags WHERE registry=? AND repository=? AND tag=?",
            (registry, repository, tag),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else TagRow(str(row[0]), float(row[1]))

    @_serialized
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

    @_serialized
    async def claim_tag(
        self, registry: str, repository: str, tag: str, digest: str, confirmed: float
    ) -> str:
        key = (registry, repository, tag)
        await self._db.execute(
            "INSERT INTO tags (registry, repository, tag, digest, confirmed) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(registry, repository, tag) DO NOTHING",
            (*key, digest, confirmed),
        )
        await self._db.commit()
        async with self._db.execute(
            "SELECT digest FROM tags WHERE registry=? AND repository=? AND tag=?", key
        ) as cur:
            row = await cur.fetchone()
        return str(row[0]) if row else digest

    @_serialized
    async def delete_tag(self, registry: str, repository: str, tag: str) -> None:
        await self._db.execute(
            "DELETE FROM tags WHERE registry=? AND repository=? AND tag=?",
            (registry, repository, tag),
        )
        await self._db.commit()

    @_serialized
    async def list_tags(self, registry: str, repository: str) -> list[str]:
        async with self._db.execute(
            "SELECT tag FROM tags WHERE registry=? AND repository=? ORDER BY tag",
            (registry, repository),
        ) as cur:
            return [str(r[0]) async for r in cur]

    # -- lifecycle: access times, usage, eviction, pins ------------------------------------------
    @_serialized
    async def touch_many(self, accessed: dict[str, float]) -> None:
        """Record a batch of access times (never moving one backwards).

        One statement over a JSON object, not one per row: the connection's thread holds the
        GIL while it binds each row of an `executemany`, and a worker's event loop then waits
        for it between its own steps (a flush of thousands of rows every 10 s showed in the
        hit path's p99). Times travel as `repr` text, which SQLite reads back exactly."""
        await self._db.execute(
            "UPDATE blobs SET last_access = MAX(blobs.last_access, a.value) "
            "FROM json_each(?) AS a WHERE blobs.digest = a.key",
            (json.dumps(accessed),),
        )
        await self._db.commit()

    @_serialized
    async def usage(self) -> tuple[int, int, int]:
        """Bytes indexed, blob count (manifests included), distinct manifests."""
        async with self._db.execute("SELECT bytes, blobs FROM usage_totals") as cur:
            row = await cur.fetchone()
        async with self._db.execute("SELECT COUNT(DISTINCT digest) FROM manifests") as cur:
            manifests = await cur.fetchone()
        assert row is not None and manifests is not None
        return int(row[0]), int(row[1]), int(manifests[0])

    @_serialized
    async def eviction_candidates(
        self, fresh_since: float, limit: int, unused_before: float | None = None
    ) -> list[tuple[str, int]]:
        """Least recently used first; never pinned content or the manifest of a fresh tag."""
        where = "" if unused_before is None else "AND b.last_access < ?"
        params: tuple[float | int, ...] = (fresh_since,)
        if unused_before is not None:
            params += (unused_before,)
        async with self._db.execute(
            "SELECT b.digest, b.size FROM blobs b "
            "WHERE NOT EXISTS (SELECT 1 FROM pins p WHERE p.digest = b.digest) "
            "AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.digest = b.digest AND t.confirmed > ?) "
            f"{where} ORDER BY b.last_access ASC LIMIT ?",
            (*params, limit),
        ) as cur:
            # One hop to the connection's thread: `async for` makes one per 64 rows, and the
            # index lock is held meanwhile (50,000 rows: 0.25 s instead of 0.09 s, idle).
            return [(str(r[0]), int(r[1])) for r in await cur.fetchall()]

    @_serialized
    async def forget_blobs(self, digests: list[str]) -> int:
        """Delete these blobs' rows and everything recorded about them; the bytes of the blob
        rows this call deleted (a row another worker or recovery deleted first counts nothing,
        so the usage account is decremented once whoever gets there first).

        One statement per table and chunk (`IN (...)`), not one per digest: an eviction pass
        forgets 100,000 blobs, and a statement costs more than the rows it touches.
        """
        freed = 0
        self._forgotten_in_bulk += len(digests)
        for chunk, marks in _in_chunks(digests):
            async with self._db.execute(
                f"DELETE FROM blobs WHERE digest IN ({marks}) RETURNING size", chunk
            ) as cur:
                freed += sum([int(r[0]) async for r in cur])
            for table, column in _RECORDS_ABOUT_A_BLOB:
                await self._db.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", chunk)
        await self._db.commit()
        return freed

    @_serialized
    async def blobs_in_range(self, low: str, high: str) -> dict[str, int]:
        """Indexed blobs whose digest is in [low, high) (digest -> size): recovery compares one
        directory of files with its rows at a time, in memory bounded by the directory."""
        async with self._db.execute(
            "SELECT digest, size FROM blobs WHERE digest >= ? AND digest < ?", (low, high)
        ) as cur:
            return {str(r[0]): int(r[1]) async for r in cur}

    @contextlib.asynccontextmanager
    async def deleting_in_bulk(self) -> AsyncIterator[None]:
        """No checkpoint in the pass's commits, one at its end. At a million blobs the pass's
        WAL is about 400 MiB, and a checkpoint every 64 MiB copied the pages it rewrote
        again and again to the database file (and synced it) half a dozen times: a 10%
        pass's deletes took 6.1 s with them and 4.3 s with one at the end, in transactions of
        10,000 rows. The end's checkpoint runs on a connection of its own, in a thread:
        neither the writer nor the hit path's reader waits for it (PASSIVE: it copies what
        no reader still needs, and the next commit's checkpoint finishes the rest); if it
        fails, the pass does not (its deletes are committed), and a later commit checkpoints.

        Only this connection's commits put it off. Another worker process's connection keeps
        its threshold: a commit of its during a pass checkpoints what the WAL holds by then
        (1.6 s for 250 MiB, that worker's index writes waiting meanwhile), as any commit past
        64 MiB of WAL did before."""
        async with self._lock:
            await self._db.execute(f"PRAGMA wal_autocheckpoint={BULK_AUTOCHECKPOINT}")
        self._forgotten_in_bulk = 0
        try:
            yield
        finally:
            async with self._lock:
                await self._db.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT}")
        if not self._forgotten_in_bulk:
            return  # nothing was deleted (a max_age pass that found nothing): no WAL to copy
        try:  # not when cut short (shutdown): after the `finally`
            await asyncio.to_thread(_checkpoint, self._path)
        except sqlite3.Error as exc:  # the deletes are committed; a later commit checkpoints
            log.warning("checkpoint after an eviction pass failed: %s", exc)

    async def pinned_among(self, digests: list[str]) -> set[str]:
        """On the reader connection (see `holds`): no wait for the writer's transaction."""
        found: set[str] = set()
        for chunk, marks in _in_chunks(digests):
            async with self._reader.execute(
                f"SELECT DISTINCT digest FROM pins WHERE digest IN ({marks})", chunk
            ) as cur:
                found.update(str(r[0]) for r in await cur.fetchall())
        return found

    # -- which repository holds which blob ---------------------------------------------------------
    async def holds(self, registry: str, repository: str, digest: str) -> bool:
        """Is `digest` known to be in this repository: a cached manifest of it (the blob
        itself, or a manifest naming it), or a recorded fetch or upstream confirmation?
        On the reader connection, in autocommit: each call sees the last commit."""
        async with self._reader.execute(
            "SELECT 1 FROM blob_repositories WHERE registry=? AND repository=? AND digest=? "
            "UNION ALL SELECT 1 FROM manifests WHERE registry=? AND repository=? AND digest=? "
            "UNION ALL SELECT 1 FROM refs r JOIN manifests m ON m.digest = r.parent "
            "WHERE r.child=? AND m.registry=? AND m.repository=? LIMIT 1",
            (registry, repository, digest) * 2 + (digest, registry, repository),
        ) as cur:
            return await cur.fetchone() is not None

    @_serialized
    async def add_holder(self, registry: str, repository: str, digest: str) -> None:
        await self._db.execute(
            "INSERT OR IGNORE INTO blob_repositories (registry, repository, digest) "
            "VALUES (?, ?, ?)",
            (registry, repository, digest),
        )
        await self._db.commit()

    @_serialized
    async def closure(self, digest: str) -> dict[str, int]:
        """Every digest a manifest names, recursively (index -> manifests -> config, layers)."""
        async with self._db.execute(
            "WITH RECURSIVE c(d, size) AS ("
            "  SELECT ?, COALESCE((SELECT size FROM blobs WHERE digest = ?), 0)"
            "  UNION SELECT r.child, r.size FROM refs r JOIN c ON r.parent = c.d"
            ") SELECT d, size FROM c",
            (digest, digest),
        ) as cur:
            return {str(r[0]): int(r[1]) async for r in cur}

    @_serialized
    async def referenced_outside(self, digests: set[str]) -> set[str]:
        """Those of `digests` that some manifest outside the set also names."""
        found: set[str] = set()
        for digest in digests:
            async with self._db.execute(
                "SELECT parent FROM refs WHERE child = ?", (digest,)
            ) as cur:
                if any([str(r[0]) not in digests async for r in cur]):
                    found.add(digest)
        return found

    @_serialized
    async def tagged(self, digests: set[str]) -> set[str]:
        """Those of `digests` some cached tag (any repository) names."""
        found: set[str] = set()
        for digest in digests:
            async with self._db.execute(
                "SELECT 1 FROM tags WHERE digest = ? LIMIT 1", (digest,)
            ) as cur:
                if await cur.fetchone() is not None:
                    found.add(digest)
        return found

    @_serialized
    async def pin(self, registry: str, repository: str, reference: str, digests: set[str]) -> None:
        await self._db.executemany(
            "INSERT OR IGNORE INTO pins (registry, repository, reference, digest) "
            "VALUES (?, ?, ?, ?)",
            [(registry, repository, reference, d) for d in sorted(digests)],
        )
        await self._db.commit()

    @_serialized
    async def unpin(self, registry: str, repository: str, reference: str) -> int:
        cur = await self._db.execute(
            "DELETE FROM pins WHERE registry = ? AND repository = ? AND reference = ?",
            (registry, repository, reference),
        )
        await self._db.commit()
        return int(cur.rowcount)

    @_serialized
    async def pinned(self) -> set[str]:
        async with self._db.execute("SELECT DISTINCT digest FROM pins") as cur:
            return {str(r[0]) async for r in cur}

    @_serialized
    async def pinned_by(self, registry: str, digests: list[str]) -> set[str]:
        found: set[str] = set()
        for chunk, marks in _in_chunks(digests):
            async with self._db.execute(
                f"SELECT DISTINCT digest FROM pins WHERE registry = ? AND digest IN ({marks})",
                (registry, *chunk),
            ) as cur:
                found |= {str(r[0]) async for r in cur}
        return found

    @_serialized
    async def pinned_bytes(self, registry: str) -> int:
        async with self._db.execute(
            "SELECT COALESCE(SUM(size), 0) FROM blobs WHERE digest IN "
            "(SELECT digest FROM pins WHERE registry = ?)",
            (registry,),
        ) as cur:
            row = await cur.fetchone()
            return int(row[0]) if row else 0

    @_serialized
    async def collect_garbage(
        self, registry: str, unused_before: float, dry_run: bool = False
    ) -> list[tuple[str, int]]:
        async with self._db.execute(
            "DELETE FROM pins WHERE registry = ? "
            "AND EXISTS (SELECT 1 FROM pins c WHERE c.registry = pins.registry "
            "AND c.repository = pins.repository AND c.reference = pins.reference "
            "AND c.digest <> c.reference) "
            "AND NOT EXISTS (SELECT 1 FROM manifests m WHERE m.registry = pins.registry "
            "AND m.repository = pins.repository AND m.digest = pins.reference) "
            "RETURNING digest",
            (registry,),
        ) as cur:
            unpinned = {str(r[0]) async for r in cur}
        async with self._db.execute(
            "DELETE FROM pins WHERE registry = ? AND reference = digest "
            "AND NOT EXISTS (SELECT 1 FROM manifests m WHERE m.registry = pins.registry "
            "AND m.repository = pins.repository AND m.digest = pins.reference) "
            "AND NOT EXISTS (SELECT 1 FROM pins q WHERE q.registry = pins.registry "
            "AND q.repository = pins.repository AND q.digest = pins.digest "
            "AND q.reference <> pins.reference) "
            "AND NOT EXISTS (SELECT 1 FROM blobs b WHERE b.digest = pins.digest "
            "AND b.last_access >= ?) "
            "RETURNING digest",
            (registry, unused_before),
        ) as cur:
            unpinned |= {str(r[0]) async for r in cur}
        unkept: list[tuple[str, int]] = []
        for chunk, marks in _in_chunks(sorted(unpinned)):
            async with self._db.execute(
                f"SELECT b.digest, b.size FROM blobs b WHERE b.digest IN ({marks}) "
                "AND NOT EXISTS (SELECT 1 FROM pins p WHERE p.digest = b.digest) "
                "AND NOT EXISTS (SELECT 1 FROM manifests m WHERE m.digest = b.digest) "
                "AND NOT EXISTS (SELECT 1 FROM refs f JOIN manifests m ON m.digest = f.parent "
                "WHERE f.child = b.digest)",
                chunk,
            ) as cur:
                unkept += [(str(r[0]), int(r[1])) async for r in cur]
        if dry_run:
            await self._db.rollback()
        else:
            await self._db.commit()
        return unkept

    @_serialized
    async def manifests_of(self, registry: str, repository: str) -> list[str]:
        async with self._db.execute(
            "SELECT digest FROM manifests WHERE registry=? AND repository=? ORDER BY digest",
            (registry, repository),
        ) as cur:
            return [str(r[0]) async for r in cur]

    @_serialized
    async def delete_manifest(self, registry: str, repository: str, digest: str) -> list[str]:
        key = (registry, repository, digest)
        async with self._db.execute(
            "DELETE FROM tags WHERE registry=? AND repository=? AND digest=? RETURNING tag", key
        ) as cur:
            tags = sorted([str(r[0]) async for r in cur])
        await self._db.execute(
            "DELETE FROM manifests WHERE registry=? AND repository=? AND digest=?", key
        )
        await self._db.commit()
        return tags

    @_serialized
    async def repositories(self) -> list[tuple[str, str]]:
        """(registry, repository) of every repository with a cached manifest."""
        async with self._db.execute(
            "SELECT DISTINCT registry, repository FROM manifests ORDER BY registry, repository"
        ) as cur:
            return [(str(r[0]), str(r[1])) async for r in cur]

    @_serialized
    async def images(self) -> list[dict[str, object]]:
        """Every cached tag: registry, repository, tag, digest, media type, last access, pinned."""
        async with self._db.execute(
            "SELECT t.registry, t.repository, t.tag, t.digest, t.confirmed, b.media_type, "
            "b.last_access, EXISTS (SELECT 1 FROM pins p WHERE p.digest = t.digest) "
            "FROM tags t JOIN blobs b ON b.digest = t.digest "
            "ORDER BY t.registry, t.repository, t.tag"
        ) as cur:
            keys = ("registry", "repository", "tag", "digest", "confirmed", "media_type",
                    "last_access", "pinned")  # fmt: skip
            return [dict(zip(keys, row, strict=True)) async for row in cur]

    # -- what the web page shows ------------------------------------------------------------------
    @_serialized
    async def search_images(self, text: str, offset: int, limit: int) -> tuple[int, list[ImageRow]]:
        """Cached tags whose `registry/repository:tag` contains `text` (case-insensitive), one
        page of them in name order, and how many match in all.

        A substring cannot use a B-tree index; the scan is over tags only (one row per tag,
        not per blob), which SQLite does at millions of rows a second.
        """
        where = ""
        params: tuple[str, ...] = ()
        if text:
            where = "WHERE (t.registry || '/' || t.repository || ':' || t.tag) LIKE ? ESCAPE '\\'"
            params = (_like(text),)
        async with self._db.execute(f"SELECT COUNT(*) FROM tags t {where}", params) as cur:
            row = await cur.fetchone()
        total = int(row[0]) if row else 0
        async with self._db.execute(
            "SELECT t.registry, t.repository, t.tag, t.digest, COALESCE(b.media_type, ''), "
            "COALESCE(b.last_access, 0), EXISTS (SELECT 1 FROM pins p WHERE p.digest = t.digest) "
            f"FROM tags t LEFT JOIN blobs b ON b.digest = t.digest {where} "
            "ORDER BY t.registry, t.repository, t.tag LIMIT ? OFFSET ?",
            (*params, limit, offset),
        ) as cur:
            rows = [
                ImageRow(str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), float(r[5]),
                         bool(r[6]))
                async for r in cur
            ]  # fmt: skip
        return total, rows

    @_serialized
    async def blob_row(self, digest: str) -> tuple[int, str, float] | None:
        """Size, media type and last access of an indexed blob."""
        async with self._db.execute(
            "SELECT size, COALESCE(media_type, ''), last_access FROM blobs WHERE digest = ?",
            (digest,),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else (int(row[0]), str(row[1]), float(row[2]))

    @_serialized
    async def tags_of(self, registry: str, repository: str, digest: str) -> list[str]:
        async with self._db.execute(
            "SELECT tag FROM tags WHERE registry=? AND repository=? AND digest=? ORDER BY tag",
            (registry, repository, digest),
        ) as cur:
            return [str(r[0]) async for r in cur]

    @_serialized
    async def is_pinned(self, digest: str) -> bool:
        async with self._db.execute(
            "SELECT 1 FROM pins WHERE digest = ? LIMIT 1", (digest,)
        ) as cur:
            return await cur.fetchone() is not None

    @_serialized
    async def tags_sharing(self, child: str, outside: set[str]) -> list[tuple[str, str, str]]:
        """Cached tags (registry, repository, tag) that name `child`, directly or through an
        index, other than tags of the digests `outside`, in name order."""
        async with self._db.execute(
            "WITH RECURSIVE up(d) AS ("
            "  SELECT parent FROM refs WHERE child = ?"
            "  UNION SELECT r.parent FROM refs r JOIN up ON r.child = up.d"
            ") SELECT t.registry, t.repository, t.tag FROM tags t "
            "WHERE t.digest IN (SELECT d FROM up) "
            f"AND t.digest NOT IN ({','.join('?' * len(outside))}) "
            "ORDER BY t.registry, t.repository, t.tag",
            (child, *outside),
        ) as cur:
            return [(str(r[0]), str(r[1]), str(r[2])) async for r in cur]

    # -- traffic history (hourly) -----------------------------------------------------------------
    @_serialized
    async def add_traffic(self, hour: int, delta: Traffic) -> None:
        await self._db.execute(
            "INSERT INTO traffic (hour, cache_bytes, upstream_bytes, hits, misses) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(hour) DO UPDATE SET "
            "cache_bytes = cache_bytes + excluded.cache_bytes, "
            "upstream_bytes = upstream_bytes + excluded.upstream_bytes, "
            "hits = hits + excluded.hits, misses = misses + excluded.misses",
            (hour, delta.cache_bytes, delta.upstream_bytes, delta.hits, delta.misses),
        )
        await self._db.commit()

    @_serialized
    async def traffic_since(self, hour: int) -> dict[int, Traffic]:
        async with self._db.execute(
            "SELECT hour, cache_bytes, upstream_bytes, hits, misses FROM traffic "
            "WHERE hour >= ? ORDER BY hour",
            (hour,),
        ) as cur:
            return {
                int(r[0]): Traffic(int(r[1]), int(r[2]), int(r[3]), int(r[4])) async for r in cur
            }

    @_serialized
    async def traffic_total(self) -> Traffic:
        async with self._db.execute(
            "SELECT COALESCE(SUM(cache_bytes), 0), COALESCE(SUM(upstream_bytes), 0), "
            "COALESCE(SUM(hits), 0), COALESCE(SUM(misses), 0) FROM traffic"
        ) as cur:
            row = await cur.fetchone()
        assert row is not None
        return Traffic(int(row[0]), int(row[1]), int(row[2]), int(row[3]))

    @_serialized
    async def all_blobs(self) -> dict[str, int]:
        async with self._db.execute("SELECT digest, size FROM blobs") as cur:
            return {str(r[0]): int(r[1]) async for r in cur}

    @_serialized
    async def integrity_ok(self) -> bool:
        async with self._db.execute("PRAGMA quick_check") as cur:
            row = await cur.fetchone()
        return row is not None and row[0] == "ok"
