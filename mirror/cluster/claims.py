"""Cluster-wide single flight: claims in PostgreSQL, rows with heartbeats.

Whatever replica first claims a key (`blob:<digest>`, `manifest:<registry>/<repo>:<ref>`)
does the upstream work; every other replica that wants it meanwhile follows the claimant (for
a blob: streams it from the claimant's peer endpoint, peers.py; for a manifest: waits, then
reads what the claimant stored). A claim is a row naming its owner (one process of one
replica) and where followers reach it; the owner refreshes the heartbeat of all its rows
every HEARTBEAT seconds with one statement. A row whose heartbeat is older than STALE seconds
belongs to a dead or cut-off process and is taken over by the next replica that asks: a
replica killed mid-download is replaced within a few seconds, and nothing is ever held by a
process that no longer exists. Times are the database's own clock, so replicas' clocks may
differ.

The table is created by the index's migrations (store/index/postgres.py, version 3).

Rows rather than advisory locks: a session lock needs its connection held for the whole
download (one per download in flight, per replica), and its owner cannot be read by the
others, who need to know where to stream from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg

from mirror.errors import RegistryError
from mirror.metrics import BACKEND_DURATION, BACKEND_ERRORS
from mirror.store.index.postgres import (
    CONNECT_TIMEOUT,
    DATABASE_ERRORS,
    PostgresIndexError,
    redacted,
    secrets_of,
)

log = logging.getLogger(__name__)

HEARTBEAT = 1.0  # seconds between refreshes of this process's claims
STALE = 3.5  # seconds without a heartbeat after which a claim is taken over
WAIT_POLL = 0.05  # seconds between looks at a claim someone else holds (manifests)
WAIT_LIMIT = 120.0  # seconds a request waits for another replica's manifest exchange
TIMEOUT = 5.0  # seconds for one claim statement


_NOW = "extract(epoch from clock_timestamp())"
_TAKE = f"""
INSERT INTO claims (key, owner, peer, heartbeat) VALUES ($1, $2, $3, {_NOW})
ON CONFLICT (key) DO UPDATE SET owner = EXCLUDED.owner, peer = EXCLUDED.peer,
    heartbeat = EXCLUDED.heartbeat
WHERE claims.heartbeat < {_NOW} - $4 OR claims.owner = EXCLUDED.owner
RETURNING owner
"""


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a claim: its owner and where its followers reach it (None for manifests)."""

    owner: str
    peer: str | None


class Claims:
    """This process's side of the claims table: take, follow, refresh, release."""

    def __init__(self, pool: Any, owner: str, peer: str | None, hidden: tuple[str, ...]) -> None:
        self._pool = pool
        self.owner = owner  # unique per process and start
        self.peer = peer  # this replica's peer endpoint, for followers of its downloads
        self._hidden = hidden
        # Held claims, each with the number of the take that got it: a claim released and
        # taken again is another holding, which an older heartbeat knows nothing of.
        self._held: dict[str, int] = {}
        self._takes = 0
        self._lost: set[str] = set()
        self._heartbeat: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, dsn: str, password: str | None, peer: str | None) -> Claims:
        hidden = secrets_of(dsn, password)
        try:
            pool = await asyncpg.create_pool(
                dsn, password=password, min_size=1, max_size=4, timeout=CONNECT_TIMEOUT,
                command_timeout=TIMEOUT,
            )  # fmt: skip
        except DATABASE_ERRORS as exc:
            error = redacted(exc, hidden, TIMEOUT)
        else:
            claims = cls(pool, f"{secrets.token_hex(8)}", peer, hidden)
            claims._heartbeat = asyncio.create_task(claims._beat())
            return claims
        raise error

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        with contextlib.suppress(*DATABASE_ERRORS, PostgresIndexError):
            await self._run("release_all", "DELETE FROM claims WHERE owner = $1", self.owner)
        await self._pool.close()

    async def _run(self, operation: str, query: str, *args: object) -> Any:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            return await self._pool.fetch(query, *args, timeout=TIMEOUT)
        except DATABASE_ERRORS as exc:
            BACKEND_ERRORS.labels("postgresql", f"claims.{operation}").inc()
            error = redacted(exc, self._hidden, TIMEOUT)
        finally:
            BACKEND_DURATION.labels("postgresql", f"claims.{operation}").observe(
                loop.time() - started
            )
        raise error

    async def take(self, key: str, peer: str | None = None) -> Holder:
        """Claim `key`, or learn who holds it. The answer names this process as owner when
        the claim is ours now (new, taken over from a stale holder, or already ours)."""
        rows = await self._run("take", _TAKE, key, self.owner, peer, STALE)
        if rows:
            self._takes += 1
            self._held[key] = self._takes
            self._lost.discard(key)
            return Holder(self.owner, peer)
        rows = await self._run("holder", "SELECT owner, peer FROM claims WHERE key = $1", key)
        if not rows:  # released between the two statements: try again
            return await self.take(key, peer)
        return Holder(str(rows[0]["owner"]), rows[0]["peer"])

    async def release(self, key: str) -> None:
        self._held.pop(key, None)
        self._lost.discard(key)
        await self._run(
            "release", "DELETE FROM claims WHERE key = $1 AND owner = $2", key, self.owner
        )

    @contextlib.asynccontextmanager
    async def exclusive(self, key: str) -> AsyncIterator[None]:
        """Hold `key` for the block, waiting while another live process holds it, at most
        WAIT_LIMIT seconds (then the request fails with a 503 rather than wait on)."""
        deadline = asyncio.get_running_loop().time() + WAIT_LIMIT
        while (await self.take(key)).owner != self.owner:
            if asyncio.get_running_loop().time() > deadline:
                raise RegistryError.unavailable(f"another replica still holds {key}")
            await asyncio.sleep(WAIT_POLL)
        try:
            yield
        finally:
            with contextlib.suppress(PostgresIndexError):
                await self.release(key)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            if not self._held:
                continue
            # Only holdings that began before the UPDATE was sent can be missing from its
            # answer for being lost: a claim taken while it ran (its row committed after the
            # UPDATE's snapshot), or released and taken again meanwhile, is ours, and calling
            # it lost made a replica drop and retake its own download (seen in CI: a pull
            # then stalled).
            beating = dict(self._held)
            try:
                rows = await self._run(
                    "heartbeat",
                    f"UPDATE claims SET heartbeat = {_NOW} WHERE owner = $1 RETURNING key",
                    self.owner,
                )  # fmt: skip
            except PostgresIndexError as exc:
                log.warning("claims heartbeat failed: %s", exc)
                continue
            # A claim that is not ours any more was taken over while this process could not
            # beat (frozen, cut off from the database): its work is someone else's now.
            answered = {str(row["key"]) for row in rows}
            lost = {
                key
                for key, take in beating.items()
                if self._held.get(key) == take and key not in answered
            }
            if lost:
                log.warning("claims taken over by another replica: %s", ", ".join(sorted(lost)))
                for key in lost:
                    del self._held[key]
                self._lost |= lost

    def lost(self, key: str) -> bool:
        """Was `key` taken over from this process while it held it (see _beat)?"""
        return key in self._lost
