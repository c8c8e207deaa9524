"""store/hashing.py under stress: many streams on a small pool keep their byte order, a lagging
stream does not starve the others, a stream's tail is not queued behind them, queued memory is
bounded across streams, and a failed thread start or a close during a drain breaks nothing."""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import pytest
import uvloop

from mirror.store.hashing import BATCH, BEHIND, BUDGET, INLINE, Budget, StreamHash


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as executor:
        yield executor


async def _produce(stream: StreamHash, pieces: list[bytes], rng: random.Random) -> str:
    """A download's producer: updates, waits when behind, now and then yields to the loop."""
    for piece in pieces:
        stream.update(piece)
        if stream.behind:
            await stream.caught_up()
        elif rng.random() < 0.2:
            await asyncio.sleep(0)
        elif rng.random() < 0.05:
            await asyncio.sleep(rng.random() / 1000)
    await stream.settled()
    return stream.hexdigest()


def _pieces(rng: random.Random, count: int) -> list[bytes]:
    sizes = (1, 2047, 2048, INLINE - 1, INLINE, INLINE + 1, 256 * 1024, BATCH - 1, BATCH, 3 << 20)
    return [rng.randbytes(rng.choice(sizes)) for _ in range(count)]


@pytest.mark.parametrize("seed", range(4))
async def test_many_streams_on_a_small_pool_keep_write_order(
    pool: ThreadPoolExecutor, seed: int
) -> None:
    """Passes: order across inline and queued updates holds with streams sharing two threads."""
    rng = random.Random(seed)
    streams = [_pieces(rng, 40) for _ in range(6)]
    hashes = [StreamHash("sha256", pool) for _ in streams]
    got = await asyncio.gather(
        *(
            _produce(h, p, random.Random(seed * 100 + n))
            for n, (h, p) in enumerate(zip(hashes, streams, strict=True))
        )
    )
    assert got == [hashlib.sha256(b"".join(p)).hexdigest() for p in streams]


def test_write_order_holds_under_uvloop(pool: ThreadPoolExecutor) -> None:
    """Passes: the production loop (uvloop) wakes waiters from the pool threads as well."""
    rng = random.Random(99)
    streams = [_pieces(rng, 30) for _ in range(4)]

    async def main() -> list[str]:
        hashes = [StreamHash("sha256", pool) for _ in streams]
        return await asyncio.gather(
            *(
                _produce(h, p, random.Random(n))
                for n, (h, p) in enumerate(zip(hashes, streams, strict=True))
            )
        )

    assert uvloop.run(main()) == [hashlib.sha256(b"".join(p)).hexdigest() for p in streams]


async def test_a_cancelled_waiter_leaves_the_stream_usable() -> None:
    """Passes: cancelling caught_up/settled neither loses bytes nor a later wake."""
    gate = threading.Event()
    with ThreadPoolExecutor(1) as blocked:
        blocked.submit(gate.wait)
        stream = StreamHash("sha256", blocked)
        piece = b"c" * (1 << 20)
        for _ in range(BEHIND // len(piece)):
            stream.update(piece)
        waiting = asyncio.create_task(stream.caught_up())
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        gate.set()
        await asyncio.wait_for(stream.settled(), 10)
        assert stream.hexdigest() == hashlib.sha256(piece * (BEHIND // len(piece))).hexdigest()


class _SlowSha256:
    """SHA-256 at about 100 MiB/s (a core without SHA extensions, shared with the loop and
    other workers): the hash, not the producer, is the bottleneck, deterministically."""

    name = "sha256"

    def __init__(self) -> None:
        self._inner = hashlib.sha256()

    def update(self, data: bytes) -> None:
        time.sleep(len(data) / (100 << 20))  # releases the GIL, as hashlib does
        self._inner.update(data)

    def hexdigest(self) -> str:
        return self._inner.hexdigest()

    def copy(self) -> Any:
        return self._inner.copy()


async def test_a_lagging_stream_does_not_starve_another() -> None:
    """A stream whose producer outruns the hash keeps its queue near BEHIND: `caught_up`
    releases it at BEHIND - 1, so its `_drain` never finds the queue empty and never returns.
    With as many such streams as pool threads (1 here, os.cpu_count() in BlobStore), every
    other stream's drain waits in the executor's FIFO queue until they end: here a 2 MiB blob,
    whose download is over, cannot be verified (its last byte cannot be sent) while a large
    download goes on."""
    with ThreadPoolExecutor(1) as single:
        big = StreamHash("sha256", single)
        big._hash = _SlowSha256()  # type: ignore[assignment]
        piece = b"L" * (1 << 20)
        stop = time.monotonic() + 2.0

        async def large_download() -> None:
            while time.monotonic() < stop:
                big.update(piece)  # a fast link: the producer is ahead of the hash
                if big.behind:
                    await big.caught_up()
            big.close()  # the rest is not needed here

        large = asyncio.create_task(large_download())
        await asyncio.sleep(0.3)  # the large download is lagging: its drain holds the thread
        small = StreamHash("sha256", single)
        data = random.Random(2).randbytes(2 << 20)
        small.update(data)
        started = time.monotonic()
        try:
            await asyncio.wait_for(small.settled(), 30)
            waited = time.monotonic() - started
        finally:
            await large
        assert small.hexdigest() == hashlib.sha256(data).hexdigest()
        assert waited < 0.5, f"a 2 MiB blob waited {waited:.2f} s for its digest"


async def test_a_small_tail_at_settle_is_not_queued_behind_other_streams() -> None:
    """The end of a download: less than BATCH queued, no drain running. `settled()` hands the
    tail to the pool, whose FIFO queue may hold other streams' drains of up to BEHIND each
    (or a monopolizing one, test above): a large manifest (>= INLINE) or a blob's last
    < 1 MiB waits for all of them. Here one busy thread stands for them."""
    gate = threading.Event()
    with ThreadPoolExecutor(1) as busy:
        busy.submit(gate.wait)
        stream = StreamHash("sha256", busy)
        data = b"m" * (INLINE * 2)  # a 128 KiB manifest, stored with BlobStore.put
        stream.update(data)
        try:
            await asyncio.wait_for(stream.settled(), 0.5)
        finally:
            gate.set()
        assert stream.hexdigest() == hashlib.sha256(data).hexdigest()


async def test_queued_bytes_are_bounded_across_streams() -> None:
    """The pool's threads busy elsewhere: each download may queue up to BEHIND, but once the
    streams of the budget hold BUDGET between them every one is told to wait at BATCH."""
    gate = threading.Event()
    budget = Budget()
    with ThreadPoolExecutor(1) as busy:
        busy.submit(gate.wait)
        streams = [StreamHash("sha256", busy, budget) for _ in range(32)]
        piece = b"p" * (256 * 1024)  # a socket piece
        for stream in streams:
            while not stream.behind:
                stream.update(piece)
        total = sum(stream._queued for stream in streams)
        assert total == budget.queued
        gate.set()
        for stream in streams:
            stream.close()
        assert total <= BUDGET + len(streams) * (BATCH + len(piece)), f"{total >> 20} MiB"
        assert budget.queued <= 0 or all(s._running for s in streams)


class _StartFails(Executor):
    """CPython's ThreadPoolExecutor.submit when starting a thread fails ("can't start new
    thread": a pids cgroup limit, RLIMIT_NPROC): the work item is already on the queue, an
    existing worker thread will run it, and submit still raises RuntimeError."""

    def __init__(self, inner: ThreadPoolExecutor) -> None:
        self.inner = inner

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.inner.submit(fn, *args, **kwargs)
        raise RuntimeError("can't start new thread")


async def test_a_failed_thread_start_does_not_run_two_drains() -> None:
    """`_submit` treats every RuntimeError as "the pool is shut down" and drains on the
    caller's thread; when the work item was queued anyway, a pool thread drains the same
    queue at the same time: chunks are popped in order but hashed in whatever order the two
    threads get to `self._hash.update` (a false DigestMismatch, never a false match)."""
    rng = random.Random(5)
    mismatches = 0
    with ThreadPoolExecutor(1) as inner:
        for _ in range(20):
            stream = StreamHash("sha256", _StartFails(inner))
            pieces = [rng.randbytes(rng.choice((INLINE, 200_000, 700_000))) for _ in range(40)]
            for piece in pieces:
                stream.update(piece)
            await stream.settled()
            for _ in range(5000):  # let the other drain finish too
                if not stream._running and stream._queued == 0:
                    break
                await asyncio.sleep(0.001)
            if stream.hexdigest() != hashlib.sha256(b"".join(pieces)).hexdigest():
                mismatches += 1
    assert mismatches == 0, f"{mismatches} of 20 streams hashed out of order"


async def test_close_during_a_drain_leaves_no_negative_count() -> None:
    """close() zeroes `_queued` while the thread still hashes a chunk; the thread then
    subtracts it, and the count goes negative (harmless today: nothing reads a closed
    stream, but `_check_settled` would then call it unsettled forever)."""
    started, release = threading.Event(), threading.Event()

    class Slow:
        name = "sha256"

        def __init__(self) -> None:
            self.inner = hashlib.sha256()

        def update(self, data: bytes) -> None:
            started.set()
            release.wait(5)
            self.inner.update(data)

    with ThreadPoolExecutor(1) as one:
        stream = StreamHash("sha256", one)
        stream._hash = Slow()  # type: ignore[assignment]
        stream.update(b"q" * BATCH)
        assert started.wait(5)
        stream.close()
        release.set()
        for _ in range(500):
            if not stream._running:
                break
            await asyncio.sleep(0.01)
        assert stream._queued == 0
