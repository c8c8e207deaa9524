"""The claims heartbeat (cluster/claims.py) against a real PostgreSQL: a claim taken, or
released and taken again, while the heartbeat's UPDATE runs is not reported lost. (It was: the
UPDATE's snapshot does not see a row committed after it began, and a replica dropped and retook
its own download.) The UPDATE is held on a row lock the test takes, so the order is certain."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from mirror.cluster import claims as claims_module
from mirror.cluster.claims import Claims
from mirror.store.index.postgres import PostgresIndex
from tests.fixtures.postgres import PostgresServer

pytestmark = pytest.mark.integration


async def heartbeat_waiting_on_a_lock(conn: asyncpg.Connection, timeout: float) -> None:
    """Until the heartbeat's UPDATE is blocked on the row the test holds locked. Asked on a
    connection outside any transaction: pg_stat_activity is read once per transaction."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE 'UPDATE claims SET heartbeat%'"
        )
        if waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the heartbeat never ran into the lock")


@contextlib.asynccontextmanager
async def heartbeat_held_on(
    pg_server: PostgresServer, *keys: str
) -> AsyncIterator[tuple[Claims, asyncpg.transaction.Transaction]]:
    """Claims of a fresh database holding `keys` (taken in this order), and the first key's
    row locked by another connection once the heartbeat's UPDATE (snapshot taken) waits on it;
    the caller commits the returned transaction to let the UPDATE go on."""
    database = await pg_server.create_database()
    dsn = pg_server.dsn(database)
    await (await PostgresIndex.open(dsn, password=pg_server.password)).close()  # the schema
    claims = await Claims.open(dsn, pg_server.password, peer=None)
    blocker = await asyncpg.connect(dsn, password=pg_server.password)
    watcher = await asyncpg.connect(dsn, password=pg_server.password)
    try:
        for key in keys:
            await claims.take(key)
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("SELECT 1 FROM claims WHERE key = $1 FOR UPDATE", keys[0])
        await heartbeat_waiting_on_a_lock(watcher, timeout=3 * claims_module.HEARTBEAT)
        yield claims, transaction
    finally:
        await watcher.close()
        await blocker.close()
        await claims.close()
        await pg_server.drop_database(database)


async def test_a_claim_taken_during_a_heartbeat_is_not_lost(pg_server: PostgresServer) -> None:
    # The UPDATE waits on the first claim's row; meanwhile a second claim is taken and
    # committed, unseen by its snapshot.
    async with heartbeat_held_on(pg_server, "blob:first") as (claims, transaction):
        await claims.take("blob:second")
        await transaction.commit()
        await asyncio.sleep(2.5 * claims_module.HEARTBEAT)  # that beat answers, and the next
        assert not claims.lost("blob:second")
        assert not claims.lost("blob:first")
        holder = await claims.take("blob:second")
        assert holder.owner == claims.owner


async def test_a_claim_released_and_taken_again_during_a_heartbeat_is_not_lost(
    pg_server: PostgresServer,
) -> None:
    """Released and taken again while the UPDATE waits: the row it sees (the old one) is gone
    and the new one is after its snapshot, so its answer lacks the key; the holding is a new
    one, not the one the heartbeat set out to refresh."""
    # Taken in this order, the UPDATE meets the first row first and waits there, before it
    # has touched the second.
    async with heartbeat_held_on(pg_server, "blob:first", "blob:second") as (claims, transaction):
        await claims.release("blob:second")
        await claims.take("blob:second")
        await transaction.commit()
        await asyncio.sleep(2.5 * claims_module.HEARTBEAT)
        assert not claims.lost("blob:second")
        assert not claims.lost("blob:first")
        assert (await claims.take("blob:second")).owner == claims.owner
