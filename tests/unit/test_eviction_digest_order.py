"""An eviction pass deletes its candidates in digest order (evict.py `_evict`): the set it
evicts is still exactly the least recently used one, a pass cut short has removed only blobs of
its batch, and a pin committed while the batch is being deleted protects its blobs."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from mirror import evict
from mirror.access import AccessTracker
from mirror.evict import Evictor
from mirror.recovery import recover
from mirror.shared import SharedState
from mirror.store.blobs import BlobStore, LocalContent, digest_of
from mirror.store.index import Index


async def put(store: BlobStore, data: bytes) -> str:
    digest = digest_of(data)
    await store.put(digest, data)
    return digest


async def cache_of(tmp_path: Path, count: int) -> tuple[BlobStore, Index, list[str], float]:
    """`count` blobs of 100 bytes, least recently used first in the list returned; their
    access order is the reverse of their digest order, so the two orders never agree."""
    store = BlobStore(tmp_path)
    index, _ = await recover(store, tmp_path / "index.db")
    digests = sorted([await put(store, bytes([n]) * 100) for n in range(count)], reverse=True)
    for digest in digests:
        await index.add_blob(digest, 100, None)
    now = time.time()
    # touch_many never moves an access time backwards: set them directly
    with sqlite3.connect(tmp_path / "index.db") as db:
        db.executemany(
            "UPDATE blobs SET last_access = ? WHERE digest = ?",
            [(now - 10_000 + n, d) for n, d in enumerate(digests)],
        )
    db.close()
    return store, index, digests, now


async def test_the_evicted_set_is_exactly_lru_across_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evict, "FIRST_BATCH", 2)
    monkeypatch.setattr(evict, "BATCH", 3)
    store, index, digests, now = await cache_of(tmp_path, 20)  # 2000 bytes
    await index.pin("docker.io", "library/a", "v1", {digests[0], digests[4]})
    await index.set_tag("docker.io", "library/b", "v1", digests[2], time.time())  # fresh
    shared = SharedState(tmp_path / "state")
    evictor = Evictor(
        index, LocalContent(store), AccessTracker(index), 4000, {"docker.io": 300.0},
        shared=shared,
    )  # fmt: skip
    await evictor.start()
    evictor.max_size = 1500  # high 1425, low 1350: 2000 -> 1300, 7 blobs
    await evictor.make_room(0)
    done = await evictor.settled()
    expected = [d for n, d in enumerate(digests) if n not in (0, 2, 4)][:7]
    remaining = set(await index.all_blobs())
    assert done.count == 7
    assert remaining == set(digests) - set(expected)
    assert all(store.path(d).exists() == (d in remaining) for d in digests)
    # max_age: everything older than the cut, over several queries, pins and fresh tag kept
    cut = now - 10_000 + 14.5  # blobs 0..14 are older
    done = await evictor._evict(lambda _u: True, unused_before=cut, reason="max_age")
    remaining = set(await index.all_blobs())
    assert remaining == {digests[0], digests[2], digests[4]} | set(digests[15:])
    await evictor.close()
    await index.close()
    shared.close()


@pytest.fixture
def one_blob_a_part(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass removes one blob a step, one step at a time: tests can act between blobs."""
    monkeypatch.setattr(evict, "PART", 1)
    monkeypatch.setattr(evict, "PARTS_IN_FLIGHT", 1)


async def over_its_cap(
    tmp_path: Path, index: Index, content: LocalContent
) -> tuple[Evictor, SharedState]:
    """An evictor for `cache_of(tmp_path, 10)` (1000 bytes) with its cap lowered to 700:
    high watermark 665, low 630, so a pass evicts the 4 oldest blobs."""
    shared = SharedState(tmp_path / "state")
    evictor = Evictor(index, content, AccessTracker(index), 2000, {}, shared=shared)
    await evictor.start()
    evictor.max_size = 700
    return evictor, shared


class Stalls(LocalContent):
    """Removals go through until `allowed` parts are done; the next waits forever (a pass
    caught part-way when the worker shuts down, crashes or a part fails)."""

    def __init__(self, files: BlobStore, allowed: int) -> None:
        super().__init__(files)
        self.allowed = allowed
        self.stalled = asyncio.Event()

    async def remove(self, digests: list[str]) -> None:
        if self.allowed == 0:
            self.stalled.set()
            await asyncio.Event().wait()
        self.allowed -= 1
        await super().remove(digests)


@pytest.mark.usefixtures("one_blob_a_part")
async def test_a_pass_cut_short_has_removed_only_blobs_of_its_batch(tmp_path: Path) -> None:
    store, index, digests, _ = await cache_of(tmp_path, 10)
    content = Stalls(store, allowed=2)
    evictor, shared = await over_its_cap(tmp_path, index, content)  # the pass would evict 4
    # A reservation past the cap starts the pass and waits for room (never, here: it stalls).
    waiting = asyncio.create_task(evictor.make_room(0))
    await asyncio.wait_for(content.stalled.wait(), 5)
    await evictor.close()  # shutdown mid-pass: the pass is cancelled
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    gone = {d for d in digests if not store.path(d).exists()}
    assert len(gone) == 2
    assert gone < set(digests[:4]), "a pass cut short removed a blob outside its batch"
    await index.close()
    shared.close()


class PinsMidBatch(LocalContent):
    """An admin pin commits while the pass deletes its batch: at the first removal, one of the
    batch's blobs still to go is pinned (what `POST /admin/pin` does while a pass runs)."""

    def __init__(self, files: BlobStore, index: Index, batch: list[str]) -> None:
        super().__init__(files)
        self.index = index
        self.batch = batch
        self.victim: str | None = None

    async def remove(self, digests: list[str]) -> None:
        if self.victim is None:
            self.victim = next(d for d in self.batch if d not in digests)
            await self.index.pin("docker.io", "library/pinned", "v1", {self.victim})
        await super().remove(digests)


@pytest.mark.usefixtures("one_blob_a_part")
async def test_a_pin_committed_during_a_batch_protects_its_blobs(tmp_path: Path) -> None:
    store, index, digests, _ = await cache_of(tmp_path, 10)
    content = PinsMidBatch(store, index, digests[:4])  # the pass evicts the 4 oldest
    evictor, shared = await over_its_cap(tmp_path, index, content)
    await evictor.make_room(0)
    await evictor.settled()
    victim = content.victim
    assert victim is not None and victim in await index.pinned(), "the pin row stays"
    assert store.path(victim).exists(), "pinned content was evicted after its pin committed"
    await evictor.close()
    await index.close()
    shared.close()
