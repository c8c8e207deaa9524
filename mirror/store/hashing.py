"""A digest computed beside the event loop: a download's SHA-256 runs on a pool thread.

Hashing is the largest per-byte cost of a miss (0.15 s for 256 MiB with SHA-NI, more without),
and on the loop's thread it is time no other connection gets, and time the download's own
receive waits for. hashlib releases the GIL for buffers over 2 KiB, so a pool thread hashes
while the loop receives the next bytes and writes them to the file its readers follow: readers
wait for the hash only when it falls behind (below), and the final byte always does (fetch.py's
integrity rule).

Chunks are queued as the immutable `bytes` the receive produced (no copy), in order, and at
most one pool task at a time drains a stream's queue, so the digest is that of the bytes in
write order. A task hashes at most SLICE bytes, then goes to the back of the pool's queue: a
stream the hash cannot keep up with does not keep a thread from the others. The producer is
bounded: `behind` says when to wait (`caught_up`): at BEHIND bytes queued for its stream, or
at BATCH once the streams of the process hold BUDGET between them, so memory stays flat
whatever the blob size or the number of downloads when the network outruns the hash.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import threading
from concurrent.futures import Executor
from typing import Any

INLINE = 64 * 1024  # smaller updates with nothing queued are hashed on the caller's thread
BATCH = 1024 * 1024  # queued bytes worth a hand-over to the pool (it costs ~0.1 ms each)
BEHIND = 8 * 1024 * 1024  # bytes one stream may queue before its producer waits
BUDGET = 32 * 1024 * 1024  # bytes all streams of a Budget may queue before each waits at BATCH
SLICE = 4 * 1024 * 1024  # bytes one pool task hashes before other streams get the thread


class Budget:
    """The bytes queued by all the streams of one pool (one process): the memory bound."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.queued = 0

    def add(self, count: int) -> None:
        with self._lock:
            self.queued += count


class StreamHash:
    """`hashlib` object semantics for one stream of `update`s, the work done on `pool`.

    One producer (the loop's thread) calls `update` and awaits `caught_up` and `settled`, one
    at a time. The digest and a copy are read after `settled()`; reading them while bytes are
    still queued is a programming error and raises. After `close()` nothing is hashed any more
    and `settled()` returns at once."""

    def __init__(self, algorithm: str, pool: Executor, budget: Budget | None = None) -> None:
        self.name = algorithm
        self._hash = hashlib.new(algorithm)
        self._pool = pool
        self._budget = budget if budget is not None else Budget()
        self._lock = threading.Lock()
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0  # bytes in the queue or being hashed now
        self._running = False  # a drain is scheduled or under way
        self._draining = False  # a drain is under way (at most one: byte order)
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None], int] | None = None
        self._error: BaseException | None = None
        self._closed = False

    def update(self, data: bytes) -> None:
        """Queue `data` (kept by reference: it must not change afterwards)."""
        if not data or self._closed:
            return
        with self._lock:
            if not self._running and not self._queue and len(data) < INLINE:
                # Nothing ahead of it: small updates (manifests, tiny blobs) are cheaper here
                # than a thread hop; no other update can be queued meanwhile (one producer).
                self._hash.update(data)
                return
            self._queue.append(data)
            self._queued += len(data)
            self._budget.add(len(data))
            if self._running or self._queued < BATCH:
                return  # a slow link's small pieces wait for company: one hand-over a batch
            self._running = True
        self._start()

    @property
    def behind(self) -> bool:
        """The producer should await `caught_up` before it queues more (see module doc)."""
        queued = self._queued
        return queued >= BEHIND or (queued >= BATCH and self._budget.queued >= BUDGET)

    async def caught_up(self) -> None:
        """Wait until less than a BATCH is queued: hysteresis, one wake-up per few MiB."""
        await self._wait(BATCH - 1)

    async def settled(self) -> None:
        """Wait until every byte given to `update` was hashed. The tail of a stream (less
        than a BATCH nobody is hashing yet) is hashed here, on the caller's thread, rather
        than queued behind other streams' work in the pool: under a millisecond."""
        with self._lock:
            tail = not self._running and 0 < self._queued < BATCH and not self._closed
            if tail:
                self._running = True
        if tail and self._drain(resubmit=False):
            self._start()
        await self._wait(0)

    def hexdigest(self) -> str:
        self._check_settled()
        return self._hash.hexdigest()

    def copy(self) -> Any:
        """A plain hashlib object with the state so far."""
        self._check_settled()
        return self._hash.copy()

    def fork(self) -> StreamHash:
        """Another StreamHash on the same pool that goes on from the state so far."""
        other = StreamHash(self.name, self._pool, self._budget)
        other._hash = self.copy()
        return other

    def close(self) -> None:
        """Drop what is queued: the stream was discarded and its digest is not wanted."""
        self._closed = True
        with self._lock:
            dropped = sum(len(data) for data in self._queue)
            self._queue.clear()
            self._queued -= dropped  # a chunk being hashed now is subtracted by its drain
            waiter, self._waiter = self._waiter, None
        self._budget.add(-dropped)
        if waiter is not None:
            _wake(waiter)

    async def _wait(self, at_most: int) -> None:
        with self._lock:
            if self._queued <= at_most or self._closed:
                self._raise_error()
                return
            assert self._waiter is None, "one producer: one wait at a time"
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            self._waiter = (loop, future, at_most)
            start = not self._running  # less than a batch is queued: hand it over now
            self._running = True
        if start:
            self._start()
        try:
            await future
        finally:
            with self._lock:
                if self._waiter is not None and self._waiter[1] is future:
                    self._waiter = None
        self._raise_error()

    def _start(self) -> None:
        """Hand the queue to the pool; drain it here if the pool takes no more work (the
        process is stopping). A submit that raised for another reason may still have queued
        the task: `_drain` runs one at a time whoever calls it."""
        while True:
            try:
                self._pool.submit(self._drain)
                return
            except RuntimeError:
                if not self._drain(resubmit=False):
                    return

    def _drain(self, resubmit: bool = True) -> bool:
        """Hash the queue in order, at most SLICE bytes. What is left goes back to the pool,
        behind other streams' work (`resubmit`), or True is returned for the caller to."""
        with self._lock:
            if self._draining or not self._running:
                return False  # a duplicate: the drain under way goes on
            self._draining = True
        hashed = 0
        while True:
            with self._lock:
                if not self._queue or hashed >= SLICE:
                    more = bool(self._queue)
                    self._draining = False
                    self._running = more
                    waiter = self._waiter if not more else None
                    if waiter is not None:
                        self._waiter = None
                    break
                data = self._queue.popleft()
            try:
                self._hash.update(data)
            except BaseException as exc:  # MemoryError: the producer learns it when it waits
                self._error = exc
            hashed += len(data)
            self._budget.add(-len(data))
            with self._lock:
                self._queued -= len(data)
                waiter = self._waiter
                if waiter is not None and self._queued <= waiter[2]:
                    self._waiter = None
                else:
                    waiter = None
            if waiter is not None:
                _wake(waiter)
        if waiter is not None:
            _wake(waiter)
        if more and resubmit:
            self._start()
            return False
        return more

    def _check_settled(self) -> None:
        with self._lock:
            if self._queued:
                raise RuntimeError("StreamHash read before settled()")
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error


def _wake(waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None], int]) -> None:
    loop, future, _ = waiter

    def done() -> None:
        if not future.done():
            future.set_result(None)

    if not loop.is_closed():
        loop.call_soon_threadsafe(done)
