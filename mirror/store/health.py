"""Is the bucket or the database answering? What a request does when one is not.

A backend error (BackendUnavailable: the bucket's ObjectStoreError, the database's
PostgresIndexError) reaching the error middleware becomes a 503 with Retry-After, never a 500,
and marks that backend down. While a backend is down, misses are refused with the same 503
before any download starts (nothing could be stored, and the retry would cost the upstream a
second transfer), while hits from local files and manifests from memory keep being served.
A watcher pings a down backend every second and marks it up the moment it answers: recovery
needs no restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from mirror.errors import RegistryError
from mirror.metrics import BACKEND_UP

log = logging.getLogger(__name__)

RETRY_AFTER = 10  # seconds a client is asked to wait before retrying a refused miss
WATCH_EVERY = 1.0  # seconds between pings of a backend that is down


class BackendUnavailable(Exception):
    """A storage engine (bucket, database) failed or did not answer; the message holds no
    credential. Engines raise subclasses of it, naming themselves in `backend`; a subclass
    that is an answer rather than an outage (an object not found) sets `outage` False."""

    backend = "storage"
    outage = True


Probe = Callable[[], Awaitable[bool]]


class BackendHealth:
    def __init__(self, probes: Mapping[str, Probe]) -> None:
        self._probes = dict(probes)  # backend name ("s3", "postgresql") -> ping
        self._down: dict[str, float] = {}
        self._watch: asyncio.Task[None] | None = None
        for name in self._probes:
            BACKEND_UP.labels(name).set(1)

    def failed(self, backend: str, error: BaseException) -> None:
        if backend not in self._probes:
            return
        if backend not in self._down:
            log.warning("%s unavailable (%s): misses refused until it answers", backend, error)
            self._down[backend] = time.monotonic()
            BACKEND_UP.labels(backend).set(0)
        if self._watch is None:
            self._watch = asyncio.create_task(self._watch_down())

    def unavailable(self, backend: str) -> RegistryError:
        return RegistryError(
            503, "UNAVAILABLE", f"{backend} unavailable: try again shortly",
            headers={"Retry-After": str(RETRY_AFTER)},
        )  # fmt: skip

    def refused(self, error: BackendUnavailable) -> RegistryError:
        """What a request that met `error` answers: 503 with Retry-After; an outage marks
        the backend down (an answer such as "object not found" does not)."""
        if error.outage:
            self.failed(error.backend, error)
        return self.unavailable(error.backend)

    def check(self) -> None:
        """Raise the 503 a miss gets while a backend is down."""
        if self._down:
            raise self.unavailable(next(iter(self._down)))

    @property
    def down(self) -> list[str]:
        return list(self._down)

    async def probe_all(self) -> list[str]:
        """Ping every backend now (for /readyz); the names of those that did not answer."""
        names = list(self._probes)
        answers = await asyncio.gather(*(self._probes[n]() for n in names))
        return [name for name, ok in zip(names, answers, strict=True) if not ok]

    async def _watch_down(self) -> None:
        try:
            while self._down:
                await asyncio.sleep(WATCH_EVERY)
                for name in list(self._down):
                    if await self._probes[name]():
                        since = self._down.pop(name)
                        BACKEND_UP.labels(name).set(1)
                        log.info("%s answers again after %.1f s", name, time.monotonic() - since)
        finally:
            self._watch = None

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
