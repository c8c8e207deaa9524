"""LRU eviction under a size cap, with watermarks, pins and fresh-tag protection.

The cap is a promise about the disk: bytes under `blobs/` never exceed it by more than what is
being downloaded right now. So every commit first asks `make_room` for its own size; when the
total would pass the high watermark (95%), least recently used content is deleted until it is
under the low watermark (90%). A pass deletes files first, then index rows: a crash in between
leaves rows without files, which recovery drops cheaply. A client already reading an evicted
file keeps its open descriptor and completes.

With several worker processes, usage lives in the shared state and the lock is a file lock,
so reservations and passes from all workers add up against the one cap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mirror.access import AccessTracker
from mirror.metrics import CACHE_BLOBS, CACHE_BYTES, CACHE_MANIFESTS, EVICTED_BYTES, EVICTIONS
from mirror.shared import FileLock, SharedState
from mirror.store.blobs import BlobStore
from mirror.store.index import Index
from mirror.webhooks import EventSink, ignore_event

log = logging.getLogger(__name__)

HIGH_WATERMARK = 0.95
LOW_WATERMARK = 0.90
BATCH = 500
PERIODIC = 10.0  # seconds between flushes of access times, count refreshes and max_age passes


@dataclass(frozen=True, slots=True)
class Evicted:
    count: int
    bytes: int


class Evictor:
    def __init__(
        self,
        index: Index,
        store: BlobStore,
        access: AccessTracker,
        max_size: int,
        tag_ttls: Mapping[str, float],
        max_age: float | None = None,
        *,
        shared: SharedState,
        primary: bool = True,
        events: EventSink = ignore_event,
    ) -> None:
        self._events = events
        self._index = index
        self._store = store
        self._access = access
        self.max_size = max_size
        self._max_ttl = max(tag_ttls.values(), default=0.0)
        self._max_age = max_age
        self._shared = shared
        self._lock = FileLock(store.root / "evict.lock")
        self._primary = primary  # the one process that sets usage at start and runs max_age
        self._task: asyncio.Task[None] | None = None

    @property
    def usage(self) -> int:
        return self._shared.usage

    async def start(self) -> None:
        if self._primary:
            usage, _, _ = await self._index.usage()
            self._shared.set_usage(usage)
        CACHE_BYTES.set(self.usage)
        await self.refresh_counts()
        self._task = asyncio.create_task(self._periodic())
        if self._primary and self.usage > self.max_size * HIGH_WATERMARK:
            async with self._lock.hold():
                target = int(self.max_size * LOW_WATERMARK)
                await self._evict(lambda usage: usage > target)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._access.flush()

    def release(self, size: int) -> None:
        """Give back a reservation whose bytes did not land (failed commit, already indexed)."""
        CACHE_BYTES.set(self._shared.add_usage(-size))

    async def make_room(self, incoming: int) -> Evicted:
        """Reserve `incoming` bytes; evict to the low watermark first if they would pass the high.

        The reservation is taken under the lock, so concurrent commits cannot all see the same
        free space: the cap holds whatever the number of downloads finishing at once.
        """
        async with self._lock.hold():
            evicted = Evicted(0, 0)
            if self.usage + incoming > self.max_size * HIGH_WATERMARK:
                target = int(self.max_size * LOW_WATERMARK) - incoming
                evicted = await self._evict(lambda usage: usage > target)
            CACHE_BYTES.set(self._shared.add_usage(incoming))
            return evicted

    async def expire(self, unused_for: float) -> Evicted:
        """Evict everything not used for `unused_for` seconds (pins and fresh tags excepted)."""
        async with self._lock.hold():
            return await self._evict(
                lambda _usage: True, unused_before=time.time() - unused_for, reason="max_age"
            )

    async def remove(self, digests: list[tuple[str, int]]) -> Evicted:
        """Delete these blobs now (purge), whatever their age."""
        async with self._lock.hold():
            return await self._delete(digests, "purge")

    def forgotten(self) -> None:
        """Index rows were removed without content (a purged tag): every worker drops its
        memory caches, as after a deletion, so none keeps serving the tag from memory."""
        self._shared.content_removed()

    async def _evict(
        self, over: Callable[[int], bool], unused_before: float | None = None, reason: str = "size"
    ) -> Evicted:
        await self._access.flush()
        total = Evicted(0, 0)
        while over(self.usage):
            fresh_since = time.time() - self._max_ttl
            batch = await self._index.eviction_candidates(fresh_since, BATCH, unused_before)
            if not batch:
                if unused_before is None:
                    log.warning(
                        "cache is over its cap (%d of %d bytes) but everything left is pinned "
                        "or a fresh tag", self.usage, self.max_size,
                    )  # fmt: skip
                break
            chosen: list[tuple[str, int]] = []
            projected = self.usage
            for digest, size in batch:
                if not over(projected):
                    break
                chosen.append((digest, size))
                projected -= size
            done = await self._delete(chosen, reason)
            total = Evicted(total.count + done.count, total.bytes + done.bytes)
        if total.count:
            log.info(
                "evicted %d blobs, %d bytes; %d of %d bytes used",
                total.count, total.bytes, self.usage, self.max_size,
            )  # fmt: skip
        return total

    async def _delete(self, blobs: list[tuple[str, int]], reason: str) -> Evicted:
        await self._store.remove([digest for digest, _ in blobs])
        await self._index.forget_blobs([d for d, _ in blobs])
        self._shared.content_removed()  # workers drop what their memory caches hold
        freed = sum(s for _, s in blobs)
        CACHE_BYTES.set(self._shared.add_usage(-freed))
        EVICTIONS.inc(len(blobs))
        EVICTED_BYTES.inc(freed)
        for digest, size in blobs:
            self._events("blob.evicted", {"digest": digest, "size": size, "reason": reason})
        return Evicted(len(blobs), freed)

    async def refresh_counts(self) -> None:
        _, blobs, manifests = await self._index.usage()
        CACHE_BLOBS.set(blobs)
        CACHE_MANIFESTS.set(manifests)

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(PERIODIC)
            try:
                await self._access.flush()
                await self.refresh_counts()
                CACHE_BYTES.set(self.usage)
                self._store.refresh_full()
                if self._max_age and self._primary:
                    await self.expire(self._max_age)
            except Exception:
                log.exception("periodic cache maintenance failed")
