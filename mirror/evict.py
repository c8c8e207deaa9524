"""LRU eviction under a size cap, with watermarks, pins and fresh-tag protection.

The cap is a promise about the disk: bytes under `blobs/` never exceed it by more than what is
being downloaded right now. Every commit first reserves its size (`make_room`); once the total
passes the high watermark (95%), least recently used content is deleted until it is under the
low watermark (90%). The pass runs in the background: a commit reserves and returns at once,
so a download finishing during a pass of 100,000 deletions does not wait for it. Only a commit
that would pass the cap itself (the 5% between watermark and cap used up by what landed since
the pass began) waits, and only until the pass has freed room for it: its first parts, not the
whole pass. A pass that cannot free anything (all pinned or fresh) ends, and such a commit
lands over the cap, as before, with a warning.

A pass deletes files first, then index rows: a crash in between leaves rows without files,
which recovery drops, and a row without a file is a miss meanwhile. A client already reading
an evicted file keeps its open descriptor and completes.

With several worker processes, usage lives in the shared state (reservations are atomic adds
there) and one pass runs at a time across them (a file lock), so reservations and passes from
all workers add up against the one cap. A reservation that finds a pass running, here or in
another worker, leaves the work to it: the pass looks at usage again after releasing the lock.

The primary process also owns the background recovery (recovery.py): it corrects the same
usage account, and a pass may follow when the files it finds push the cache over the cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from mirror.access import AccessTracker
from mirror.cluster.claims import Claims
from mirror.metrics import CACHE_BLOBS, CACHE_BYTES, CACHE_MANIFESTS, EVICTED_BYTES, EVICTIONS
from mirror.recovery import ReconcileTask, RecoveryReport, pending
from mirror.shared import POLL, FileLock, SharedState
from mirror.store.blobs.base import ContentStore
from mirror.store.index import Index
from mirror.webhooks import EventSink, ignore_event

log = logging.getLogger(__name__)

HIGH_WATERMARK = 0.95
LOW_WATERMARK = 0.90
# Candidates per query. A pass deletes them in digest order (see _evict): the larger the batch,
# the fewer times each page of the digest indexes is rewritten. The first is small: a
# download waiting for room (make_room past the cap) waits for the first rows to go.
FIRST_BATCH = 5000
BATCH = 50_000
PART = 500  # files unlinked (objects deleted) per step of a pass
# Steps at once: a bucket's DeleteObjects mostly waits on the server, so several are sent;
# on a local disk the unlink threads (local.py) are shared by all steps, so it changes little.
PARTS_IN_FLIGHT = 4
ROWS = 10_000  # rows forgotten per index transaction at most: another worker's commit waits
# for one at most (0.8 s at a million rows on a virtual disk, rows in digest order). Fewer,
# larger transactions rewrite the pages every one touches (blobs_by_access, the table's
# own) fewer times: SQLite's deletes of a 10% pass at a million, 5.2 s in transactions of
# 10,000 rows against 6.1 s in ones of 2,500.
PERIODIC = 10.0  # seconds between flushes of access times, count refreshes and max_age passes


@dataclass(frozen=True, slots=True)
class Evicted:
    count: int
    bytes: int


class Reservation:
    """Room `Evictor.reserving` took for bytes being stored, settled once by the index's
    answer (`settle`) or given back when the block is left without one."""

    def __init__(self, evictor: Evictor, size: int) -> None:
        self._evictor = evictor
        self._size = size

    def settle(self, new: bool) -> None:
        """The index answered: a new row counts the bytes from now on (the reservation
        landed); a row that was there counted them already (the room goes back)."""
        size, self._size = self._size, 0
        if size:
            (self._evictor.landed if new else self._evictor.release)(size)


class Evictor:
    def __init__(
        self,
        index: Index,
        content: ContentStore,
        access: AccessTracker,
        max_size: int,
        tag_ttls: Mapping[str, float],
        max_age: float | None = None,
        *,
        shared: SharedState,
        primary: bool = True,
        events: EventSink = ignore_event,
        index_shared: bool = False,
        claims: Claims | None = None,
    ) -> None:
        self._events = events
        self._claims = claims
        # This process's reservations whose rows are not in the index yet: added to the
        # shared index's usage when it is read again (_resync_usage).
        self._pending = 0
        # Other replicas commit to this index (PostgreSQL): this machine's account of usage
        # misses their bytes, so it is set again from the index (see _resync_usage).
        self._index_shared = index_shared
        self._index = index
        self._content = content
        self._store = content.files  # the local files: recovery, the lock, disk-full mode
        self._access = access
        self.max_size = max_size
        self._max_ttl = max(tag_ttls.values(), default=0.0)
        self._max_age = max_age
        self._shared = shared
        self._lock = FileLock(self._store.root / "evict.lock")
        # Eviction parts (shared, side by side) against a pin made of a blob found stored
        # (exclusive; hosted pushes and mounts): see `pinning`.
        self._pins = FileLock(self._store.root / "pins.lock")
        self._primary = primary  # the one process that sets usage at start and runs max_age
        self._task: asyncio.Task[None] | None = None
        self._pass: asyncio.Task[Evicted] | None = None
        self._recovery: ReconcileTask | None = None

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
        if self._primary and pending(self._store.root):
            self._recovery = ReconcileTask(
                self._store, self._index, self.correct_usage, self._after_recovery
            )
            self._recovery.start()
        if self._primary and self._over_high():
            self._start_pass()

    async def close(self) -> None:
        for task in (self._task, self._pass):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._recovery is not None:
            await self._recovery.close()
        await self._access.flush()

    def release(self, size: int) -> None:
        """Give back a reservation whose bytes did not land (failed commit, already indexed)."""
        self._pending = max(0, self._pending - size)
        CACHE_BYTES.set(self._shared.add_usage(-size))

    def landed(self, size: int) -> None:
        """A reservation's bytes are indexed now: the index's usage counts them from here."""
        self._pending = max(0, self._pending - size)

    @contextlib.asynccontextmanager
    async def reserving(self, size: int) -> AsyncIterator[Reservation]:
        """Room for `size` incoming bytes (make_room) while they are stored and indexed,
        settled by the index's answer; left unsettled (an exception, an early return), the
        room goes back, so the account never keeps bytes that did not land. 0: none."""
        if size:
            await self.make_room(size)
        reservation = Reservation(self, size)
        try:
            yield reservation
        finally:
            reservation.settle(False)

    def correct_usage(self, delta: int) -> None:
        """Recovery found indexed bytes the account did not hold (files indexed: positive) or
        held without content (rows dropped: negative)."""
        CACHE_BYTES.set(self._shared.add_usage(delta))

    async def make_room(self, incoming: int) -> None:
        """Reserve `incoming` bytes; past the high watermark, start an eviction pass in the
        background (unless one runs) and return without waiting for it, unless the bytes
        would pass the cap itself: then only until the pass has freed room for them.

        The reservation is one atomic add to the shared usage, so concurrent commits in any
        worker cannot all see the same free space: each pass sees every reservation made
        before it looks at usage, and a reservation made after a pass's last look starts one.
        """
        if self._index_shared:
            await self._resync_usage()
        self._pending += incoming
        usage = self._shared.add_usage(incoming)
        CACHE_BYTES.set(usage)
        if usage > self.max_size * HIGH_WATERMARK:
            self._start_pass()
        # Past the cap itself (the 5% over the watermark used up), wait until the pass has
        # freed enough for these bytes: its first parts, milliseconds, not the whole pass.
        # A pass that frees nothing (all pinned) ends, and the bytes land over the cap.
        while self.usage > self.max_size and self._pass is not None and not self._pass.done():
            await asyncio.sleep(POLL)

    async def settled(self) -> Evicted:
        """Wait for this process's eviction pass, if one runs (tests, the bench); what it
        evicted."""
        if self._pass is None:
            return Evicted(0, 0)
        return await asyncio.shield(self._pass)

    async def recovered(self) -> RecoveryReport | None:
        """Wait for the background recovery this process runs, if any (tests, the bench)."""
        return None if self._recovery is None else await self._recovery.wait()

    def _over_high(self) -> bool:
        return self.usage > self.max_size * HIGH_WATERMARK

    def _over_low(self, usage: int) -> bool:
        return usage > self.max_size * LOW_WATERMARK

    def _start_pass(self) -> None:
        if self._pass is None or self._pass.done():
            self._pass = asyncio.create_task(self._passes(), name="eviction pass")

    async def _passes(self) -> Evicted:
        """Passes to the low watermark while usage is over the high one. The condition is
        looked at after the lock is released, with no await before returning, so a
        reservation that saw this task still running is never left unserved."""
        total = Evicted(0, 0)
        try:
            while self._over_high():
                async with self._exclusive():
                    done = await self._evict(self._over_low)
                total = Evicted(total.count + done.count, total.bytes + done.bytes)
                if not done.count:
                    break  # all pinned or fresh (logged); the next reservation tries again
        except Exception:
            log.exception("eviction pass failed")
        return total

    async def _after_recovery(self) -> None:
        CACHE_BYTES.set(self.usage)
        await self.refresh_counts()
        if self._over_high():
            self._start_pass()

    async def expire(self, unused_for: float) -> Evicted:
        """Evict everything not used for `unused_for` seconds (pins and fresh tags excepted)."""
        async with self._exclusive():
            return await self._evict(
                lambda _usage: True, unused_before=time.time() - unused_for, reason="max_age"
            )

    async def remove(self, digests: list[tuple[str, int]], reason: str = "purge") -> Evicted:
        """Delete these blobs now (purge, hosted GC), whatever their age."""
        async with self._exclusive():
            return await self._delete(digests, reason)

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """One eviction pass at a time: on this machine (a file lock across its workers) and,
        in a cluster, across replicas (a claim, cluster/claims.py), so two replicas never
        both evict to the low watermark for the same excess."""
        async with self._lock.hold():
            if self._claims is None:
                yield
                return
            async with self._claims.exclusive("evict"):
                yield

    def pinning(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Held while a pin is made and its blob is looked at: no eviction part on this
        machine is then between its look at the pins and its deletes, so a blob found stored
        under a new pin stays. A lock of this machine: another replica's pass is not held off."""
        return self._pins.hold()

    def forgotten(self) -> None:
        """Index rows were removed without content (a purged tag): every worker drops its
        memory caches, as after a deletion, so none keeps serving the tag from memory."""
        self._shared.content_removed()

    async def _evict(
        self, over: Callable[[int], bool], unused_before: float | None = None, reason: str = "size"
    ) -> Evicted:
        await self._access.flush()
        async with self._index.deleting_in_bulk():
            return await self._evict_batches(over, unused_before, reason)

    async def _evict_batches(
        self, over: Callable[[int], bool], unused_before: float | None, reason: str
    ) -> Evicted:
        total = Evicted(0, 0)
        while over(self.usage):
            fresh_since = time.time() - self._max_ttl
            limit = BATCH if total.count else FIRST_BATCH
            batch = await self._index.eviction_candidates(fresh_since, limit, unused_before)
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
            # Least recently used decides what goes; digest order decides in which order. The
            # pages of the digest indexes (blobs' and blob_repositories' keys) are then
            # touched by one transaction each, instead of by every transaction of the pass
            # (the tables themselves, and blobs_by_access, get more scattered writes; the WAL
            # of a 10% pass shrank by a third in all). A pass cut short (shutdown, a crash)
            # has removed blobs of its batch's least recently used, not necessarily the oldest
            # of them first.
            chosen.sort()
            done = await self._delete(chosen, reason)
            total = Evicted(total.count + done.count, total.bytes + done.bytes)
        if total.count:
            log.info(
                "evicted %d blobs, %d bytes; %d of %d bytes used",
                total.count, total.bytes, self.usage, self.max_size,
            )  # fmt: skip
        return total

    async def _delete(self, blobs: list[tuple[str, int]], reason: str) -> Evicted:
        """Files first, then rows, but the two run side by side: unlinks go on, PART files a
        step and PARTS_IN_FLIGHT steps at once, while the rows of files already gone are
        forgotten, in one transaction of whatever has gathered since the last one (up to
        ROWS). The unlinks never wait for the
        index, and the index deletes in large batches: at a million rows a transaction of 500
        cost 0.18 ms a row (each touches a page of every digest index and is written to the
        WAL and checkpointed again), one of 5,000 0.12 ms. A crash leaves rows of files
        already unlinked, never a file without its row being kept (recovery.py drops them)."""
        gone: list[tuple[str, int]] = []
        ready = asyncio.Event()
        finished = False
        removed = 0
        slots = asyncio.Semaphore(PARTS_IN_FLIGHT)

        async def unlink_part(part: list[tuple[str, int]]) -> None:
            nonlocal removed
            async with slots, self._pins.share():
                # The batch may take seconds: a pin committed since its candidates were chosen
                # protects its blobs, looked at again just before each part goes, and no pin
                # of a blob found stored is made between that look and the deletes.
                pinned = await self._index.pinned_among([digest for digest, _ in part])
                part = [blob for blob in part if blob[0] not in pinned]
                await self._content.remove([digest for digest, _ in part])
            removed += len(part)
            gone.extend(part)
            ready.set()

        async def unlink() -> None:
            nonlocal finished
            try:
                parts = [blobs[n : n + PART] for n in range(0, len(blobs), PART)]
                results = await asyncio.gather(*map(unlink_part, parts), return_exceptions=True)
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
            finally:
                finished = True
                ready.set()

        unlinking = asyncio.create_task(unlink(), name="eviction unlinks")
        freed = 0
        try:
            while not (finished and not gone):
                await ready.wait()
                ready.clear()
                while gone:
                    rows, gone[:ROWS] = gone[:ROWS], []
                    freed += await self._forget(rows, reason)
        finally:
            if not unlinking.done():
                unlinking.cancel()
            await asyncio.gather(unlinking, return_exceptions=True)
        unlinking.result()  # a failed unlink fails the pass, after the rows of what went
        return Evicted(removed, freed)

    async def _forget(self, blobs: list[tuple[str, int]], reason: str) -> int:
        """Rows of blobs whose files are gone; the bytes subtracted from the usage account:
        only the rows this call deleted (recovery may drop a row whose file a pass just
        deleted, before the pass forgets it)."""
        freed = await self._index.forget_blobs([digest for digest, _ in blobs])
        self._shared.content_removed()  # workers drop what their memory caches hold
        if self._index_shared:
            # Usage is the index's (every replica's bytes) plus this process's pending
            # reservations: set from it again, as `_resync_usage` does, not decremented. A
            # reservation that read the index after this commit has set usage without these
            # bytes already, and a decrement then took them off twice: usage below the bytes
            # stored, and a commit landing past the cap.
            await self._usage_from_index()
            CACHE_BYTES.set(self.usage)
        else:
            CACHE_BYTES.set(self._shared.add_usage(-freed))
        EVICTIONS.inc(len(blobs))
        EVICTED_BYTES.inc(freed)
        for digest, size in blobs:
            self._events("blob.evicted", {"digest": digest, "size": size, "reason": reason})
        return freed

    async def refresh_counts(self) -> None:
        _, blobs, manifests = await self._index.usage()
        CACHE_BLOBS.set(blobs)
        CACHE_MANIFESTS.set(manifests)

    async def _resync_usage(self) -> None:
        """Usage from the shared index: every replica's committed bytes, read before each
        reservation and every PERIODIC seconds, plus this process's own reservations not indexed
        yet. What is missed: other processes' reservations not indexed yet (their downloads
        commit within moments), so the cap can be passed by the downloads the other replicas
        and workers are storing at that moment; a pass starts as soon as it is."""
        await self._usage_from_index()
        if self._over_high():
            self._start_pass()

    async def _usage_from_index(self) -> None:
        """Usage as a shared index has it (every replica's committed bytes), plus this
        process's reservations not indexed yet."""
        usage, _, _ = await self._index.usage()
        self._shared.set_usage(usage + self._pending)

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(PERIODIC)
            try:
                await self._access.flush()
                await self.refresh_counts()
                if self._index_shared and self._primary:
                    await self._resync_usage()
                CACHE_BYTES.set(self.usage)
                self._store.refresh_full()
                if self._max_age and self._primary:
                    await self.expire(self._max_age)
            except Exception:
                log.exception("periodic cache maintenance failed")
