"""Cluster-wide coherence: what one replica removes or moves, every replica forgets at once.

Memory caches (manifests, fresh tags, per-repository blob membership) are dropped on a
machine whenever its shared generation moves (shared.py): on an eviction, a purge, a tag that
moved upstream. In a cluster each worker process also LISTENs on one PostgreSQL channel: a
change here is NOTIFYed there, and every other replica's workers move their own machine's
generation when they hear it, within milliseconds (the issue's bound is 1 s). A connection
that drops may have missed notifications, so a reconnect drops the caches too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any

import asyncpg

from mirror.shared import SharedState
from mirror.store.index.postgres import CONNECT_TIMEOUT, DATABASE_ERRORS, redacted, secrets_of

log = logging.getLogger(__name__)

CHANNEL = "mirror_coherence"
WATCH = 1.0  # seconds between checks of the listening connection
SEND_TIMEOUT = 5.0


class Coherence:
    def __init__(self, dsn: str, password: str | None, shared: SharedState) -> None:
        self._dsn = dsn
        self._password = password
        self._hidden = secrets_of(dsn, password)
        self._shared = shared
        self._me = secrets.token_hex(8)  # this process: its own notifications are ignored
        self._conn: Any = None
        self._wake = asyncio.Event()
        self._unsent = False
        self._tasks: list[asyncio.Task[None]] = []
        shared.on_change(self._wake.set)

    async def start(self) -> None:
        await self._connect()
        self._tasks = [asyncio.create_task(self._send()), asyncio.create_task(self._watch())]

    async def _connect(self) -> None:
        try:
            conn = await asyncpg.connect(
                self._dsn, password=self._password, timeout=CONNECT_TIMEOUT
            )
            await conn.add_listener(CHANNEL, self._heard)
        except DATABASE_ERRORS as exc:
            error = redacted(exc, self._hidden, CONNECT_TIMEOUT)
        else:
            self._conn = conn
            return
        raise error

    def _heard(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload != self._me:
            self._shared.changed_elsewhere()

    async def _send(self) -> None:
        """One NOTIFY per wake-up, however many changes came meanwhile (they all mean the
        same: drop the caches)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                async with asyncio.timeout(SEND_TIMEOUT):
                    await self._conn.execute("SELECT pg_notify($1, $2)", CHANNEL, self._me)
            except (*DATABASE_ERRORS, AttributeError) as exc:
                # Sent again once the connection is back (_watch): the other replicas must
                # hear of every change, however late.
                self._unsent = True
                log.warning("cluster notification not sent: %s", redacted(exc, self._hidden, 0))

    async def _watch(self) -> None:
        """Reconnect a dropped listening connection; what it may have missed: drop caches."""
        while True:
            await asyncio.sleep(WATCH)
            if self._conn is not None and not self._conn.is_closed():
                if self._unsent:  # a send failed on a connection that is fine again
                    self._unsent = False
                    self._wake.set()
                continue
            try:
                await self._connect()
            except Exception as exc:
                log.warning("cluster notifications: reconnect failed: %s", exc)
                continue
            log.info("cluster notifications: reconnected; memory caches dropped")
            self._shared.changed_elsewhere()
            if self._unsent:
                self._unsent = False
                self._wake.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._conn is not None:
            with contextlib.suppress(*DATABASE_ERRORS):
                await self._conn.close(timeout=SEND_TIMEOUT)
