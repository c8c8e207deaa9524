"""The PostgreSQL index engine (asyncpg): one index that several replicas share.

Every query means what its twin in sqlite.py means (same rows, same order, same edge cases);
tests/integration/test_index_engines.py runs one suite against both. What differs is only what
sharing demands: the schema is migrated under an advisory lock so replicas starting together
never both migrate, multi-statement writes are transactions (SQLite had one connection and a
lock), upserts settle races between replicas, and rows are locked in digest order so two
replicas batching the same digests cannot deadlock.

Text columns are `COLLATE "C"`: byte order, as SQLite's BINARY collation sorts (a database
created with a linguistic locale would otherwise put `a` before `B`), and ILIKE then folds ASCII
letters only, as SQLite's LIKE does. Timestamps stay float epoch seconds (double precision),
taken from the replica's clock as SQLite's are, so callers see identical values.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

import asyncpg

from mirror.metrics import BACKEND_DURATION, BACKEND_ERRORS
from mirror.store.health import BackendUnavailable
from mirror.store.index.base import ImageRow, TagRow, Traffic

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = (
    10.0  # seconds for any one statement: a stuck database fails a request, not hangs it
)
CONNECT_TIMEOUT = 5.0  # an unreachable host (packets dropped) fails fast instead of after minutes
MIGRATION_TIMEOUT = 300.0  # waiting for another replica's migration, or running one, may take long

# pg_advisory_xact_lock key of schema migrations: fixed, so every replica of every version
# contends for the same lock ("mirror" and a 2-byte serial, as a signed 64-bit integer).
_MIGRATION_LOCK = 0x6D6972726F72_0001

# Version n is MIGRATIONS[n - 1]; each runs once, in order, in one transaction with the rest.
# Append only: a released script is never edited (databases already ran it).
MIGRATIONS: tuple[str, ...] = (
    # 1: the SQLite schema as of its version 2 (blob_repositories included).
    """
    CREATE TABLE blobs (
        digest      text COLLATE "C" PRIMARY KEY,
        size        bigint NOT NULL,
        media_type  text COLLATE "C",
        created     double precision NOT NULL,
        last_access double precision NOT NULL
    );
    CREATE TABLE manifests (
        registry    text COLLATE "C" NOT NULL,
        repository  text COLLATE "C" NOT NULL,
        digest      text COLLATE "C" NOT NULL,
        media_type  text COLLATE "C" NOT NULL,
        created     double precision NOT NULL,
        PRIMARY KEY (registry, repository, digest)
    );
    CREATE INDEX manifests_by_digest ON manifests (digest);
    CREATE INDEX blobs_by_access ON blobs (last_access);
    CREATE TABLE refs (
        parent      text COLLATE "C" NOT NULL,  -- a manifest digest
        child       text COLLATE "C" NOT NULL,  -- a config, layer or child manifest it names
        size        bigint NOT NULL,
        PRIMARY KEY (parent, child)
    );
    CREATE INDEX refs_by_child ON refs (child);
    CREATE TABLE pins (
        registry    text COLLATE "C" NOT NULL,
        repository  text COLLATE "C" NOT NULL,
        reference   text COLLATE "C" NOT NULL,
        digest      text COLLATE "C" NOT NULL,  -- everything the image names, a row each
        PRIMARY KEY (registry, repository, reference, digest)
    );
    CREATE INDEX pins_by_digest ON pins (digest);
    CREATE TABLE tags (
        registry    text COLLATE "C" NOT NULL,
        repository  text COLLATE "C" NOT NULL,
        tag         text COLLATE "C" NOT NULL,
        digest      text COLLATE "C" NOT NULL,
        confirmed   double precision NOT NULL,
        PRIMARY KEY (registry, repository, tag)
    );
    CREATE INDEX tags_by_digest ON tags (digest);
    CREATE TABLE blob_repositories (
        registry    text COLLATE "C" NOT NULL,  -- a blob this repository is known to hold
        repository  text COLLATE "C" NOT NULL,  -- without a cached manifest of it naming it
        digest      text COLLATE "C" NOT NULL,
        PRIMARY KEY (registry, repository, digest)
    );
    CREATE INDEX blob_repositories_by_digest ON blob_repositories (digest);
    CREATE TABLE traffic (
        hour            bigint PRIMARY KEY,  -- unix time // 3600
        cache_bytes     bigint NOT NULL DEFAULT 0,
        upstream_bytes  bigint NOT NULL DEFAULT 0,
        hits            bigint NOT NULL DEFAULT 0,
        misses          bigint NOT NULL DEFAULT 0
    );
    """,
    # 2: bytes and rows of `blobs` kept by statement triggers, in 16 rows (slots): `usage()`
    # is read before each reservation with a shared index, and a SUM over a million rows is a
    # scan each time. A transaction adds to the slot of its connection (backend pid modulo the
    # slots), so replicas committing at once seldom wait on the same row; `usage()` sums the
    # slots. Writers are locked out while the first totals are counted, so none is missed.
    """
    LOCK TABLE blobs IN SHARE MODE;
    CREATE TABLE usage_totals (
        slot    integer PRIMARY KEY,
        bytes   bigint NOT NULL,
        blobs   bigint NOT NULL
    );
    INSERT INTO usage_totals (slot, bytes, blobs)
        SELECT 0, COALESCE(SUM(size), 0), COUNT(*) FROM blobs;
    INSERT INTO usage_totals (slot, bytes, blobs) SELECT s, 0, 0 FROM generate_series(1, 15) s;
    CREATE FUNCTION usage_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE usage_totals u SET bytes = u.bytes + a.bytes, blobs = u.blobs + a.blobs
        FROM (SELECT COALESCE(SUM(size), 0) AS bytes, COUNT(*) AS blobs FROM added) a
        WHERE u.slot = pg_backend_pid() % 16 AND a.blobs > 0;
        RETURN NULL;
    END $$;
    CREATE FUNCTION usage_on_delete() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE usage_totals u SET bytes = u.bytes - r.bytes, blobs = u.blobs - r.blobs
        FROM (SELECT COALESCE(SUM(size), 0) AS bytes, COUNT(*) AS blobs FROM removed) r
        WHERE u.slot = pg_backend_pid() % 16 AND r.blobs > 0;
        RETURN NULL;
    END $$;
    CREATE TRIGGER usage_on_insert AFTER INSERT ON blobs REFERENCING NEW TABLE AS added
        FOR EACH STATEMENT EXECUTE FUNCTION usage_on_insert();
    CREATE TRIGGER usage_on_delete AFTER DELETE ON blobs REFERENCING OLD TABLE AS removed
        FOR EACH STATEMENT EXECUTE FUNCTION usage_on_delete();
    """,
    # 3: cluster-wide single flight (cluster/claims.py): who downloads what, and where from.
    """
    CREATE TABLE claims (
        key         text COLLATE "C" PRIMARY KEY,
        owner       text NOT NULL,
        peer        text,
        heartbeat   double precision NOT NULL
    );
    CREATE INDEX claims_by_owner ON claims (owner);
    """,
)

# What else names a blob by digest, cleared with its row.
_RECORDS_ABOUT_A_BLOB = (
    ("manifests", "digest"),
    ("refs", "parent"),
    ("tags", "digest"),
    ("blob_repositories", "digest"),
)

# Lock the blob rows of a batch in digest order: two replicas flushing or evicting overlapping
# batches in different orders would otherwise each hold a row the other waits for (a deadlock,
# which PostgreSQL breaks by failing one of them). Arrays join through unnest, never `= ANY($1)`:
# once PostgreSQL switched the prepared statement to its generic plan (after five runs), locking
# a batch of 2,000 with `= ANY` took seconds of CPU (measured), the join milliseconds.
_LOCK_BLOBS = (
    "SELECT 1 FROM blobs b JOIN unnest($1::text[]) AS u(d) ON b.digest = u.d "
    "ORDER BY b.digest FOR UPDATE OF b"
)

# What a failing database, network or driver raises; a programming error is not among them.
_DATABASE_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)


class PostgresIndexError(BackendUnavailable):
    """The database failed or could not be reached; the text never holds a password. A
    BackendUnavailable: a request it reaches is answered 503 (store/health.py)."""

    backend = "postgresql"

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class SchemaTooNewError(PostgresIndexError):
    """The database was migrated by a newer mirror than this one."""


def _secrets(dsn: str, password: str | None) -> tuple[str, ...]:
    """The strings error texts must not show: the password, as given and as the DSN spells it."""
    found = {password} if password else set()
    with contextlib.suppress(ValueError):
        in_dsn = urllib.parse.urlsplit(dsn).password
        if in_dsn:
            found |= {in_dsn, urllib.parse.unquote(in_dsn)}
    return tuple(sorted(found, key=len, reverse=True))  # a longer one first: it may hold another


def _redacted(exc: BaseException, secrets: tuple[str, ...], timeout: float) -> PostgresIndexError:
    """`exc` retold without the password. Raised outside the handler, so the original (whose
    text, or its cause's, might hold the DSN) is not chained into a logged traceback."""
    detail = str(exc) or (
        f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else ""
    )
    for secret in secrets:
        detail = detail.replace(secret, "***")
    return PostgresIndexError(f"PostgreSQL: {type(exc).__name__}: {detail}", exc_sqlstate(exc))


def exc_sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def _limit(n: int) -> int | None:
    """SQLite reads a negative LIMIT as none; PostgreSQL refuses it, and reads NULL as none."""
    return None if n < 0 else n


P = ParamSpec("P")
R = TypeVar("R")


def _guarded(
    method: Callable[Concatenate[PostgresIndex, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[PostgresIndex, P], Coroutine[Any, Any, R]]:
    """Database failures leave as PostgresIndexError, their text free of the password: a
    reconnecting pool raises what asyncpg's connect raised, and callers log what they catch."""

    operation = method.__name__

    @functools.wraps(method)
    async def guarded(self: PostgresIndex, /, *args: P.args, **kwargs: P.kwargs) -> R:
        started = time.perf_counter()
        try:
            return await method(self, *args, **kwargs)
        except _DATABASE_ERRORS as exc:
            error = _redacted(exc, self._secrets, self._timeout)
            BACKEND_ERRORS.labels("postgresql", operation).inc()
        finally:
            BACKEND_DURATION.labels("postgresql", operation).observe(time.perf_counter() - started)
        raise error  # outside the handler: no __context__ to carry the original along

    return guarded


class PostgresIndex:
    def __init__(self, pool: Any, secrets: tuple[str, ...], timeout: float) -> None:
        self._pool = pool
        self._secrets = secrets
        self._timeout = timeout

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        password: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = COMMAND_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> PostgresIndex:
        """Connect a pool (`dsn` as postgresql://user@host:port/database; `password` apart so
        it need not sit in a URL) and bring the schema up to date."""
        secrets = _secrets(dsn, password)
        try:
            pool = await asyncpg.create_pool(
                dsn,
                password=password,
                min_size=min_size,
                max_size=max_size,
                command_timeout=command_timeout,
                timeout=connect_timeout,
            )
        except ValueError:
            # asyncpg's parse errors quote pieces of the DSN: with a password holding a `/`,
            # `postgresql://u:pa/ss@h/db` reads as host `u`, port `pa`. Say nothing of it.
            error = PostgresIndexError(
                "invalid PostgreSQL DSN: expected postgresql://user@host:port/database, "
                "special characters percent-encoded"
            )
        except _DATABASE_ERRORS as exc:
            error = _redacted(exc, secrets, connect_timeout)
        else:
            return await cls._started(pool, secrets, command_timeout)
        raise error  # outside the handler: no __context__ to carry the original along

    @classmethod
    async def _started(cls, pool: Any, secrets: tuple[str, ...], timeout: float) -> PostgresIndex:
        index = cls(pool, secrets, timeout)
        try:
            await index._migrate()
        except BaseException:
            await index.close()
            raise
        return index

    @_guarded
    async def _migrate(self) -> None:
        """Apply pending migrations, all in one transaction under an advisory lock: a replica
        starting beside another waits for its migration, then finds nothing left to do."""
        async with self._pool.acquire(timeout=MIGRATION_TIMEOUT) as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK, timeout=MIGRATION_TIMEOUT
            )
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, applied_at timestamptz NOT NULL)"
            )
            current = int(
                await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            )
            if current > len(MIGRATIONS):
                raise SchemaTooNewError(
                    f"the index database is at schema version {current}, newer than this "
                    f"mirror knows ({len(MIGRATIONS)}): run a newer mirror, or another database"
                )
            for version in range(current + 1, len(MIGRATIONS) + 1):
                await conn.execute(MIGRATIONS[version - 1], timeout=MIGRATION_TIMEOUT)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, now())",
                    version,
                )
                log.info("index database migrated to schema version %d", version)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), self._timeout)
        except TimeoutError:
            self._pool.terminate()  # a connection stuck on a dead peer must not hold shutdown

    async def ping(self) -> bool:
        try:
            return bool(await self._pool.fetchval("SELECT 1", timeout=self._timeout) == 1)
        except Exception:
            return False

    @contextlib.asynccontextmanager
    async def _transaction(self, **options: Any) -> AsyncIterator[Any]:
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction(**options):
            yield conn

    async def _fetch(self, query: str, *args: object) -> list[Any]:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            return list(await conn.fetch(query, *args))

    async def _fetchrow(self, query: str, *args: object) -> Any:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            return await conn.fetchrow(query, *args)

    async def _execute(self, query: str, *args: object) -> None:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            await conn.execute(query, *args)

    @_guarded
    async def get_blob(self, digest: str) -> int | None:
        """The size of an indexed blob, or None."""
        row = await self._fetchrow("SELECT size FROM blobs WHERE digest = $1", digest)
        return None if row is None else int(row[0])

    @_guarded
    async def stored(self, digests: list[str]) -> set[str]:
        """Those of `digests` that have a blob row (a bucket sweep asks a listing page at a
        time)."""
        rows = await self._fetch(
            "SELECT b.digest FROM blobs b JOIN unnest($1::text[]) AS u(d) ON b.digest = u.d",
            digests,
        )
        return {str(row[0]) for row in rows}

    @contextlib.asynccontextmanager
    async def deleting_in_bulk(self) -> AsyncIterator[None]:
        """Nothing to put off: PostgreSQL's checkpoints and vacuum run in its own processes."""
        yield

    @_guarded
    async def pinned_among(self, digests: list[str]) -> set[str]:
        rows = await self._fetch(
            "SELECT DISTINCT p.digest FROM pins p JOIN unnest($1::text[]) AS u(d) "
            "ON p.digest = u.d",
            digests,
        )
        return {str(row[0]) for row in rows}

    @staticmethod
    async def _upsert_blob(
        conn: Any, digest: str, size: int, media_type: str | None, now: float
    ) -> bool:
        """Insert the row, or refresh its access time; True if it is new. Of two replicas
        inserting at once, the second waits for the first's commit and then updates."""
        new = await conn.fetchval(
            "INSERT INTO blobs (digest, size, media_type, created, last_access) "
            "VALUES ($1, $2, $3, $4, $4) ON CONFLICT (digest) DO NOTHING RETURNING true",
            digest,
            size,
            media_type,
            now,
        )
        if new:
            return True
        await conn.execute("UPDATE blobs SET last_access = $2 WHERE digest = $1", digest, now)
        return False

    @_guarded
    async def add_blob(self, digest: str, size: int, media_type: str | None) -> bool:
        async with self._transaction() as conn:
            return await self._upsert_blob(conn, digest, size, media_type, time.time())

    @_guarded
    async def get_manifest_type(self, registry: str, repository: str, digest: str) -> str | None:
        row = await self._fetchrow(
            "SELECT media_type FROM manifests WHERE registry = $1 AND repository = $2 "
            "AND digest = $3",
            registry,
            repository,
            digest,
        )
        return None if row is None else str(row[0])

    @_guarded
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
        ordered = sorted(children)
        async with self._transaction() as conn:
            new = await self._upsert_blob(conn, digest, size, media_type, now)
            await conn.execute(
                "INSERT INTO refs (parent, child, size) "
                "SELECT $1, c, s FROM unnest($2::text[], $3::bigint[]) AS u(c, s) "
                "ON CONFLICT DO NOTHING",
                digest,
                [c for c, _ in ordered],
                [s for _, s in ordered],
            )
            await conn.execute(
                "INSERT INTO manifests (registry, repository, digest, media_type, created) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                registry,
                repository,
                digest,
                media_type,
                now,
            )
        return new

    @_guarded
    async def get_tag(self, registry: str, repository: str, tag: str) -> TagRow | None:
        row = await self._fetchrow(
            "SELECT digest, confirmed FROM tags WHERE registry = $1 AND repository = $2 "
            "AND tag = $3",
            registry,
            repository,
            tag,
        )
        return None if row is None else TagRow(str(row[0]), float(row[1]))

    @_guarded
    async def set_tag(
        self, registry: str, repository: str, tag: str, digest: str, confirmed: float
    ) -> None:
        await self._execute(
            "INSERT INTO tags (registry, repository, tag, digest, confirmed) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (registry, repository, tag) DO UPDATE SET "
            "digest = excluded.digest, confirmed = excluded.confirmed",
            registry,
            repository,
            tag,
            digest,
            confirmed,
        )

    @_guarded
    async def claim_tag(
        self, registry: str, repository: str, tag: str, digest: str, confirmed: float
    ) -> str:
        row = await self._fetchrow(
            "WITH added AS (INSERT INTO tags (registry, repository, tag, digest, confirmed) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (registry, repository, tag) DO NOTHING "
            "RETURNING digest) SELECT digest FROM added UNION ALL SELECT digest FROM tags "
            "WHERE registry = $1 AND repository = $2 AND tag = $3 LIMIT 1",
            registry, repository, tag, digest, confirmed,
        )  # fmt: skip
        if row is None:
            # Another transaction inserted it while this one waited on the conflict; this
            # statement's snapshot is older than that commit. A new statement sees it.
            row = await self._fetchrow(
                "SELECT digest FROM tags WHERE registry = $1 AND repository = $2 AND tag = $3",
                registry, repository, tag,
            )  # fmt: skip
        return str(row[0]) if row else digest

    @_guarded
    async def delete_tag(self, registry: str, repository: str, tag: str) -> None:
        await self._execute(
            "DELETE FROM tags WHERE registry = $1 AND repository = $2 AND tag = $3",
            registry,
            repository,
            tag,
        )

    @_guarded
    async def list_tags(self, registry: str, repository: str) -> list[str]:
        rows = await self._fetch(
            "SELECT tag FROM tags WHERE registry = $1 AND repository = $2 ORDER BY tag",
            registry,
            repository,
        )
        return [str(r[0]) for r in rows]

    # -- lifecycle: access times, usage, eviction, pins ------------------------------------------
    @_guarded
    async def touch_many(self, accessed: dict[str, float]) -> None:
        """Record a batch of access times (never moving one backwards); rows locked in digest
        order first (_LOCK_BLOBS)."""
        if not accessed:
            return
        digests = list(accessed)
        async with self._transaction() as conn:
            await conn.execute(_LOCK_BLOBS, digests)
            await conn.execute(
                "UPDATE blobs b SET last_access = GREATEST(b.last_access, u.t) "
                "FROM unnest($1::text[], $2::float8[]) AS u(d, t) WHERE b.digest = u.d",
                digests,
                list(accessed.values()),
            )

    @_guarded
    async def usage(self) -> tuple[int, int, int]:
        """Bytes indexed, blob count (manifests included), distinct manifests."""
        row = await self._fetchrow(
            "SELECT COALESCE(SUM(bytes), 0), COALESCE(SUM(blobs), 0), "
            "(SELECT COUNT(DISTINCT digest) FROM manifests) FROM usage_totals"
        )
        return int(row[0]), int(row[1]), int(row[2])

    @_guarded
    async def eviction_candidates(
        self, fresh_since: float, limit: int, unused_before: float | None = None
    ) -> list[tuple[str, int]]:
        """Least recently used first; never pinned content or the manifest of a fresh tag."""
        rows = await self._fetch(
            "SELECT b.digest, b.size FROM blobs b "
            "WHERE NOT EXISTS (SELECT 1 FROM pins p WHERE p.digest = b.digest) "
            "AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.digest = b.digest AND t.confirmed > $1) "
            "AND ($2::float8 IS NULL OR b.last_access < $2) "
            "ORDER BY b.last_access ASC LIMIT $3",
            fresh_since,
            unused_before,
            _limit(limit),
        )
        return [(str(r[0]), int(r[1])) for r in rows]

    @_guarded
    async def forget_blobs(self, digests: list[str]) -> int:
        """Delete these blobs' rows and everything recorded about them; the bytes of the blob
        rows this call deleted. Of two replicas forgetting the same blob at once, the second
        waits for the first's commit, finds the row gone and counts nothing: the usage account
        is decremented once.
        """
        if not digests:
            return 0
        digests = list(dict.fromkeys(digests))
        async with self._transaction() as conn:
            await conn.execute(_LOCK_BLOBS, digests)  # as touch_many: overlapping evictions
            freed = await conn.fetchval(
                "WITH gone AS (DELETE FROM blobs b USING unnest($1::text[]) AS u(d) "
                "WHERE b.digest = u.d RETURNING b.size) SELECT COALESCE(SUM(size), 0) FROM gone",
                digests,
            )
            for table, column in _RECORDS_ABOUT_A_BLOB:
                await conn.execute(
                    f"DELETE FROM {table} t USING unnest($1::text[]) AS u(d) "
                    f"WHERE t.{column} = u.d",
                    digests,
                )
        return int(freed)

    @_guarded
    async def blobs_in_range(self, low: str, high: str) -> dict[str, int]:
        """Indexed blobs whose digest is in [low, high) (digest -> size), in byte order: the
        column's "C" collation decides the comparison."""
        rows = await self._fetch(
            "SELECT digest, size FROM blobs WHERE digest >= $1 AND digest < $2", low, high
        )
        return {str(r[0]): int(r[1]) for r in rows}

    # -- which repository holds which blob ---------------------------------------------------------
    @_guarded
    async def holds(self, registry: str, repository: str, digest: str) -> bool:
        """Is `digest` known to be in this repository: a cached manifest of it (the blob
        itself, or a manifest naming it), or a recorded fetch or upstream confirmation?"""
        row = await self._fetchrow(
            "SELECT 1 FROM blob_repositories WHERE registry = $1 AND repository = $2 "
            "AND digest = $3 "
            "UNION ALL SELECT 1 FROM manifests WHERE registry = $1 AND repository = $2 "
            "AND digest = $3 "
            "UNION ALL SELECT 1 FROM refs r JOIN manifests m ON m.digest = r.parent "
            "WHERE r.child = $3 AND m.registry = $1 AND m.repository = $2 LIMIT 1",
            registry,
            repository,
            digest,
        )
        return row is not None

    @_guarded
    async def add_holder(self, registry: str, repository: str, digest: str) -> None:
        await self._execute(
            "INSERT INTO blob_repositories (registry, repository, digest) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING",
            registry,
            repository,
            digest,
        )

    @_guarded
    async def closure(self, digest: str) -> dict[str, int]:
        """Every digest a manifest names, recursively (index -> manifests -> config, layers)."""
        rows = await self._fetch(
            "WITH RECURSIVE c(d, size) AS ("
            '  SELECT $1::text COLLATE "C", '
            "         COALESCE((SELECT size FROM blobs WHERE digest = $1), 0::bigint)"
            "  UNION SELECT r.child, r.size FROM refs r JOIN c ON r.parent = c.d"
            ") SELECT d, size FROM c",
            digest,
        )
        return {str(r[0]): int(r[1]) for r in rows}

    @_guarded
    async def referenced_outside(self, digests: set[str]) -> set[str]:
        """Those of `digests` that some manifest outside the set also names."""
        rows = await self._fetch(
            "SELECT DISTINCT r.child FROM refs r JOIN unnest($1::text[]) AS u(d) ON r.child = u.d "
            "WHERE NOT EXISTS (SELECT 1 FROM unnest($1::text[]) AS p(d) WHERE p.d = r.parent)",
            list(digests),
        )
        return {str(r[0]) for r in rows}

    @_guarded
    async def tagged(self, digests: set[str]) -> set[str]:
        """Those of `digests` some cached tag (any repository) names."""
        rows = await self._fetch(
            "SELECT DISTINCT t.digest FROM tags t "
            "JOIN unnest($1::text[]) AS u(d) ON t.digest = u.d",
            list(digests),
        )
        return {str(r[0]) for r in rows}

    @_guarded
    async def pin(self, registry: str, repository: str, reference: str, digests: set[str]) -> None:
        await self._execute(
            "INSERT INTO pins (registry, repository, reference, digest) "
            "SELECT $1, $2, $3, d FROM unnest($4::text[]) AS d ORDER BY d "
            "ON CONFLICT DO NOTHING",
            registry,
            repository,
            reference,
            sorted(digests),
        )

    @_guarded
    async def unpin(self, registry: str, repository: str, reference: str) -> int:
        row = await self._fetchrow(
            "WITH gone AS (DELETE FROM pins WHERE registry = $1 AND repository = $2 "
            "AND reference = $3 RETURNING 1) SELECT COUNT(*) FROM gone",
            registry,
            repository,
            reference,
        )
        return int(row[0])

    @_guarded
    async def pinned(self) -> set[str]:
        return {str(r[0]) for r in await self._fetch("SELECT DISTINCT digest FROM pins")}

    @_guarded
    async def pinned_by(self, registry: str, digests: list[str]) -> set[str]:
        rows = await self._fetch(
            "SELECT DISTINCT digest FROM pins WHERE registry = $1 AND digest = ANY($2::text[])",
            registry,
            digests,
        )
        return {str(r[0]) for r in rows}

    @_guarded
    async def pinned_bytes(self, registry: str) -> int:
        row = await self._fetchrow(
            "SELECT COALESCE(SUM(size), 0) FROM blobs WHERE digest IN "
            "(SELECT digest FROM pins WHERE registry = $1)",
            registry,
        )
        return int(row[0])

    @_guarded
    async def collect_garbage(
        self, registry: str, unused_before: float, dry_run: bool = False
    ) -> list[tuple[str, int]]:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                rows = await conn.fetch(
                    "DELETE FROM pins WHERE registry = $1 "
                    "AND EXISTS (SELECT 1 FROM pins c WHERE c.registry = pins.registry "
                    "AND c.repository = pins.repository AND c.reference = pins.reference "
                    "AND c.digest <> c.reference) "
                    "AND NOT EXISTS (SELECT 1 FROM manifests m WHERE m.registry = pins.registry "
                    "AND m.repository = pins.repository AND m.digest = pins.reference) "
                    "RETURNING digest",
                    registry,
                )
                rows += await conn.fetch(
                    "DELETE FROM pins WHERE registry = $1 AND reference = digest "
                    "AND NOT EXISTS (SELECT 1 FROM manifests m WHERE m.registry = pins.registry "
                    "AND m.repository = pins.repository AND m.digest = pins.reference) "
                    "AND NOT EXISTS (SELECT 1 FROM pins q WHERE q.registry = pins.registry "
                    "AND q.repository = pins.repository AND q.digest = pins.digest "
                    "AND q.reference <> pins.reference) "
                    "AND NOT EXISTS (SELECT 1 FROM blobs b WHERE b.digest = pins.digest "
                    "AND b.last_access >= $2) "
                    "RETURNING digest",
                    registry,
                    unused_before,
                )
                unpinned = sorted({str(r[0]) for r in rows})
                unkept = await conn.fetch(
                    "SELECT b.digest, b.size FROM blobs b WHERE b.digest = ANY($1::text[]) "
                    "AND NOT EXISTS (SELECT 1 FROM pins p WHERE p.digest = b.digest) "
                    "AND NOT EXISTS (SELECT 1 FROM manifests m WHERE m.digest = b.digest) "
                    "AND NOT EXISTS (SELECT 1 FROM refs f JOIN manifests m ON m.digest = f.parent "
                    "WHERE f.child = b.digest)",
                    unpinned,
                )
            except BaseException:
                await transaction.rollback()
                raise
            if dry_run:
                await transaction.rollback()
            else:
                await transaction.commit()
        return [(str(r[0]), int(r[1])) for r in unkept]

    @_guarded
    async def manifests_of(self, registry: str, repository: str) -> list[str]:
        rows = await self._fetch(
            "SELECT digest FROM manifests WHERE registry = $1 AND repository = $2 "
            'ORDER BY digest COLLATE "C"',
            registry,
            repository,
        )
        return [str(r[0]) for r in rows]

    @_guarded
    async def delete_manifest(self, registry: str, repository: str, digest: str) -> list[str]:
        async with self._transaction() as conn:
            rows = await conn.fetch(
                "DELETE FROM tags WHERE registry = $1 AND repository = $2 AND digest = $3 "
                "RETURNING tag",
                registry, repository, digest,
            )  # fmt: skip
            await conn.execute(
                "DELETE FROM manifests WHERE registry = $1 AND repository = $2 AND digest = $3",
                registry, repository, digest,
            )  # fmt: skip
        return sorted(str(r[0]) for r in rows)

    @_guarded
    async def repositories(self) -> list[tuple[str, str]]:
        """(registry, repository) of every repository with a cached manifest."""
        rows = await self._fetch(
            "SELECT DISTINCT registry, repository FROM manifests ORDER BY registry, repository"
        )
        return [(str(r[0]), str(r[1])) for r in rows]

    @_guarded
    async def images(self) -> list[dict[str, object]]:
        """Every cached tag: registry, repository, tag, digest, media type, last access, pinned.

        `pinned` is 0 or 1, as SQLite's EXISTS gives it (`mirror ls --json` prints it).
        """
        rows = await self._fetch(
            "SELECT t.registry, t.repository, t.tag, t.digest, t.confirmed, b.media_type, "
            "b.last_access, EXISTS (SELECT 1 FROM pins p WHERE p.digest = t.digest)::int "
            "FROM tags t JOIN blobs b ON b.digest = t.digest "
            "ORDER BY t.registry, t.repository, t.tag"
        )
        keys = ("registry", "repository", "tag", "digest", "confirmed", "media_type",
                "last_access", "pinned")  # fmt: skip
        return [dict(zip(keys, tuple(row), strict=True)) for row in rows]

    # -- what the web page shows ------------------------------------------------------------------
    @_guarded
    async def search_images(self, text: str, offset: int, limit: int) -> tuple[int, list[ImageRow]]:
        """Cached tags whose `registry/repository:tag` contains `text` (case-insensitive), one
        page of them in name order, and how many match in all.

        The count and the page come from one snapshot (a repeatable-read transaction): another
        replica's writes between them would otherwise make the total disagree with the pages.
        """
        pattern = _like(text) if text else None
        where = "WHERE $1::text IS NULL OR (t.registry || '/' || t.repository || ':' || t.tag) "
        where += "ILIKE $1 ESCAPE '\\'"
        async with self._transaction(isolation="repeatable_read", readonly=True) as conn:
            total = int(await conn.fetchval(f"SELECT COUNT(*) FROM tags t {where}", pattern))
            rows = await conn.fetch(
                "SELECT t.registry, t.repository, t.tag, t.digest, COALESCE(b.media_type, ''), "
                "COALESCE(b.last_access, 0), "
                "EXISTS (SELECT 1 FROM pins p WHERE p.digest = t.digest) "
                f"FROM tags t LEFT JOIN blobs b ON b.digest = t.digest {where} "
                "ORDER BY t.registry, t.repository, t.tag LIMIT $2 OFFSET $3",
                pattern,
                _limit(limit),
                max(offset, 0),  # SQLite reads a negative OFFSET as 0; PostgreSQL refuses it
            )
        return total, [
            ImageRow(str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), float(r[5]),
                     bool(r[6]))
            for r in rows
        ]  # fmt: skip

    @_guarded
    async def blob_row(self, digest: str) -> tuple[int, str, float] | None:
        """Size, media type and last access of an indexed blob."""
        row = await self._fetchrow(
            "SELECT size, COALESCE(media_type, ''), last_access FROM blobs WHERE digest = $1",
            digest,
        )
        return None if row is None else (int(row[0]), str(row[1]), float(row[2]))

    @_guarded
    async def tags_of(self, registry: str, repository: str, digest: str) -> list[str]:
        rows = await self._fetch(
            "SELECT tag FROM tags WHERE registry = $1 AND repository = $2 AND digest = $3 "
            "ORDER BY tag",
            registry,
            repository,
            digest,
        )
        return [str(r[0]) for r in rows]

    @_guarded
    async def is_pinned(self, digest: str) -> bool:
        row = await self._fetchrow("SELECT 1 FROM pins WHERE digest = $1 LIMIT 1", digest)
        return row is not None

    @_guarded
    async def tags_sharing(self, child: str, outside: set[str]) -> list[tuple[str, str, str]]:
        """Cached tags (registry, repository, tag) that name `child`, directly or through an
        index, other than tags of the digests `outside`, in name order."""
        rows = await self._fetch(
            "WITH RECURSIVE up(d) AS ("
            "  SELECT parent FROM refs WHERE child = $1"
            "  UNION SELECT r.parent FROM refs r JOIN up ON r.child = up.d"
            ") SELECT t.registry, t.repository, t.tag FROM tags t "
            "WHERE t.digest IN (SELECT d FROM up) "
            "AND NOT EXISTS (SELECT 1 FROM unnest($2::text[]) AS o(d) WHERE o.d = t.digest) "
            "ORDER BY t.registry, t.repository, t.tag",
            child,
            list(outside),
        )
        return [(str(r[0]), str(r[1]), str(r[2])) for r in rows]

    # -- traffic history (hourly) -----------------------------------------------------------------
    @_guarded
    async def add_traffic(self, hour: int, delta: Traffic) -> None:
        await self._execute(
            "INSERT INTO traffic (hour, cache_bytes, upstream_bytes, hits, misses) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (hour) DO UPDATE SET "
            "cache_bytes = traffic.cache_bytes + excluded.cache_bytes, "
            "upstream_bytes = traffic.upstream_bytes + excluded.upstream_bytes, "
            "hits = traffic.hits + excluded.hits, misses = traffic.misses + excluded.misses",
            hour,
            delta.cache_bytes,
            delta.upstream_bytes,
            delta.hits,
            delta.misses,
        )

    @_guarded
    async def traffic_since(self, hour: int) -> dict[int, Traffic]:
        rows = await self._fetch(
            "SELECT hour, cache_bytes, upstream_bytes, hits, misses FROM traffic "
            "WHERE hour >= $1 ORDER BY hour",
            hour,
        )
        return {int(r[0]): Traffic(int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows}

    @_guarded
    async def traffic_total(self) -> Traffic:
        row = await self._fetchrow(
            "SELECT COALESCE(SUM(cache_bytes), 0), COALESCE(SUM(upstream_bytes), 0), "
            "COALESCE(SUM(hits), 0), COALESCE(SUM(misses), 0) FROM traffic"
        )
        return Traffic(int(row[0]), int(row[1]), int(row[2]), int(row[3]))

    @_guarded
    async def all_blobs(self) -> dict[str, int]:
        return {str(r[0]): int(r[1]) for r in await self._fetch("SELECT digest, size FROM blobs")}

    async def integrity_ok(self) -> bool:
        """PostgreSQL checks its own pages (and recovers from its WAL); nothing to ask here."""
        return True


def _like(text: str) -> str:
    """A LIKE pattern matching `text` anywhere, its own % and _ taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


# The cluster's own connections (cluster/claims.py) fail and are retold the same way.
DATABASE_ERRORS = _DATABASE_ERRORS
redacted = _redacted
secrets_of = _secrets
