"""A digest computed beside the event loop: a download's SHA-256 runs on a pool thread.

Hashing is the largest per-byte cost of a miss (0.15 s for 256 MiB with SHA-NI, more without),
and on the loop's thread it is time no other connection gets, and time the download's own
receive waits for. hashlib releases the GIL for buffers over 2 KiB, so a pool thread hashes
while the loop receives the next bytes and writes them to the file its readers follow: the
readers never wait for the hash, only the final byte does (fetch.py's integrity rule).

Chunks are queued as the immutable `bytes` the receive produced (no copy), in order, and one
pool task at a time drains a stream's queue, so the digest is that of the bytes in write order.
The queue is bounded by the producer: `behind` says when it should wait (`caught_up`), which
keeps memory flat whatever the blob size when the disk and network outrun the hash.
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
BEHIND = 16 * 1024 * 1024  # queued bytes at which the producer should wait for the hash


class StreamHash:
    """`hashlib` object semantics for one stream of `update`s, the work done on `pool`.

    The digest, a copy, and the end of the work are asked for with `settled()` awaited first;
    asking while bytes are still queued is a programming error and raises."""

    def __init__(self, algorithm: str, pool: Executor) -> None:
        self.name = algorithm
        self._hash = hashlib.new(algorithm)
        self._pool = pool
        self._lock = threading.Lock()
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0  # bytes in the queue or being hashed now
        self._running = False  # a pool task is draining the queue
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None], int] | None = None
        self._error: BaseException | None = None
        self._closed = False

    def update(self, data: bytes) -> None:
        """Queue `data` (kept by reference: it must not change afterwards)."""
        if not data or self._closed:
            return
        with self._lock:
            idle = not self._running and not self._queue
            if idle and len(data) < INLINE:
                # Nothing ahead of it: small updates (manifests, tiny blobs) are cheaper here
                # than a thread hop; no other update can be queued meanwhile (one producer).
                self._hash.update(data)
                return
            self._queue.append(data)
            self._queued += len(data)
            if self._running or self._queued < BATCH:
                return  # a slow link's small pieces wait for company: one hand-over a batch
            self._running = True
        self._submit()

    def _submit(self) -> None:
        try:
            self._pool.submit(self._drain)
        except RuntimeError:  # the pool is shut down (the process is stopping)
            self._drain()

    @property
    def behind(self) -> bool:
        """The producer is BEHIND bytes ahead of the hash: time to await `caught_up`."""
        return self._queued >= BEHIND

    async def caught_up(self) -> None:
        """Wait until fewer than BEHIND bytes are queued."""
        await self._wait(BEHIND - 1)

    async def settled(self) -> None:
        """Wait until every byte given to `update` was hashed."""
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
        other = StreamHash(self.name, self._pool)
        other._hash = self.copy()
        return other

    def close(self) -> None:
        """Drop what is queued: the stream was discarded and its digest is not wanted."""
        self._closed = True
        with self._lock:
            self._queue.clear()
            self._queued = 0
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            _wake(waiter)

    async def _wait(self, at_most: int) -> None:
        with self._lock:
            if self._queued <= at_most or self._closed:
                self._raise_error()
                return
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            self._waiter = (loop, future, at_most)
            start = not self._running  # less than a batch is queued: hand it over now
            self._running = True
        if start:
            self._submit()
        try:
            await future
        finally:
            with self._lock:
                if self._waiter is not None and self._waiter[1] is future:
                    self._waiter = None
        self._raise_error()

    def _drain(self) -> None:
        """On a pool thread: hash the queue in order until it is empty."""
        while True:
            with self._lock:
                if not self._queue:
                    self._running = False
                    waiter, self._waiter = self._waiter, None
                    break
                data = self._queue.popleft()
            try:
                self._hash.update(data)
            except BaseException as exc:  # MemoryError: the producer learns it when it waits
                self._error = exc
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
