"""A download's digest computed on a pool thread (store/hashing.py) is the digest of its bytes in
write order, bounded in memory, and never read before every byte was hashed."""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mirror.store.blobs import BlobStore, DigestMismatch
from mirror.store.hashing import BEHIND, INLINE, StreamHash


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as executor:
        yield executor


def chunks(seed: int) -> list[bytes]:
    """Small and large pieces interleaved: small ones are hashed inline when nothing is queued,
    large ones on the thread; order must hold across both."""
    rng = random.Random(seed)
    sizes = [rng.choice((1, 100, INLINE - 1, INLINE, 300_000, 1 << 20)) for _ in range(60)]
    return [rng.randbytes(size) for size in sizes]


@pytest.mark.parametrize("seed", range(5))
async def test_the_digest_is_that_of_the_bytes_in_write_order(
    pool: ThreadPoolExecutor, seed: int
) -> None:
    pieces = chunks(seed)
    stream = StreamHash("sha256", pool)
    rng = random.Random(seed)
    for piece in pieces:
        stream.update(piece)
        if rng.random() < 0.3:
            await asyncio.sleep(0)  # let the thread drain now and then
    await stream.settled()
    assert stream.hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert stream.copy().hexdigest() == stream.hexdigest()


async def test_the_producer_is_told_to_wait_and_memory_stays_bounded() -> None:
    gate = threading.Event()
    with ThreadPoolExecutor(1) as blocked:
        blocked.submit(gate.wait)  # the only hashing thread is busy elsewhere
        stream = StreamHash("sha256", blocked)
        piece = b"x" * (1 << 20)
        sent = 0
        while not stream.behind:
            stream.update(piece)
            sent += len(piece)
        assert sent == BEHIND
        waiting = asyncio.create_task(stream.caught_up())
        await asyncio.sleep(0.05)
        assert not waiting.done()  # nothing hashed: the producer must not go on
        gate.set()
        await asyncio.wait_for(waiting, 10)
        assert not stream.behind
        await stream.settled()
        assert stream.hexdigest() == hashlib.sha256(piece * (sent // len(piece))).hexdigest()


async def test_reading_the_digest_before_it_settled_is_refused() -> None:
    gate = threading.Event()
    with ThreadPoolExecutor(1) as blocked:
        blocked.submit(gate.wait)
        stream = StreamHash("sha256", blocked)
        stream.update(b"y" * (INLINE * 2))
        with pytest.raises(RuntimeError):
            stream.hexdigest()
        with pytest.raises(RuntimeError):
            stream.copy()
        gate.set()
        await stream.settled()
        assert stream.hexdigest() == hashlib.sha256(b"y" * (INLINE * 2)).hexdigest()


async def test_closing_drops_the_queue_and_releases_a_waiter() -> None:
    gate = threading.Event()
    with ThreadPoolExecutor(1) as blocked:
        blocked.submit(gate.wait)
        stream = StreamHash("sha256", blocked)
        for _ in range(BEHIND // (1 << 20)):
            stream.update(b"z" * (1 << 20))
        waiting = asyncio.create_task(stream.settled())
        await asyncio.sleep(0.01)
        stream.close()
        await asyncio.wait_for(waiting, 5)
        assert not stream.behind
        gate.set()


async def test_a_blob_writer_commits_only_the_right_bytes(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.prepare()
    data = random.Random(7).randbytes(3 << 20)
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"

    wrong = store.writer(digest)
    wrong.write(data[:-1] + b"!")
    with pytest.raises(DigestMismatch):
        await wrong.commit()
    wrong.discard()
    assert not store.path(digest).exists()
    assert list(store.tmp.iterdir()) == []

    right = store.writer(digest)
    for n in range(0, len(data), 200_000):
        right.write(data[n : n + 200_000])
    path = await right.commit()
    assert path.read_bytes() == data
