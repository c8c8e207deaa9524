"""Recovery's scan of every file runs after serving starts, and eviction passes run beside
commits: what a start and a pass must still guarantee (a real store and index in a temp dir)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from mirror import recovery
from mirror.access import AccessTracker
from mirror.evict import Evictor
from mirror.keys import EVICTOR
from mirror.recovery import PENDING, RecoveryReport, mark_pending, open_checked, recover
from mirror.reference import DOCKER_HUB
from mirror.shared import FileLock, SharedState
from mirror.store.blobs import BlobStore, LocalContent, digest_of
from mirror.store.index import Index
from tests.conftest import StartMirror


async def put(store: BlobStore, data: bytes) -> str:
    digest = digest_of(data)
    await store.put(digest, data)
    return digest


async def damaged_cache(store: BlobStore, index: Index) -> dict[str, str]:
    """One of everything recovery repairs, and a blob that needs nothing."""
    kept = await put(store, b"kept")
    await index.add_blob(kept, 4, None)
    ghost = digest_of(b"ghost")
    await index.add_blob(ghost, 5, None)  # a row whose file is gone
    orphan = await put(store, b"orphan")  # a file whose row is missing
    corrupt = digest_of(b"right")
    store.path(corrupt).parent.mkdir(parents=True, exist_ok=True)
    store.path(corrupt).write_bytes(b"wrong")
    (store.tmp / "partial.123").write_bytes(b"half")
    return {"kept": kept, "ghost": ghost, "orphan": orphan, "corrupt": corrupt}


async def test_background_recovery_repairs_what_a_blocking_one_did_and_fixes_usage(
    tmp_path: Path,
) -> None:
    store = BlobStore(tmp_path)
    index, _ = await recover(store, tmp_path / "index.db")
    blobs = await damaged_cache(store, index)
    await index.close()

    index, started = await open_checked(store, tmp_path / "index.db")
    assert (started.temp_removed, started.rows_dropped, started.files_indexed) == (1, 0, 0)
    assert not (store.tmp / "partial.123").exists()  # before anything serves
    assert set(await index.all_blobs()) == {blobs["kept"], blobs["ghost"]}  # the rest waits
    mark_pending(tmp_path)
    shared = SharedState(tmp_path / "state")
    evictor = Evictor(
        index, LocalContent(store), AccessTracker(index), 1 << 30, {}, shared=shared, primary=True
    )
    await evictor.start()
    assert evictor.usage == 4 + 5  # what the index said at start: the ghost, not the orphan
    report = await evictor.recovered()
    assert report == RecoveryReport(0, 1, 1, 1, False)
    assert set(await index.all_blobs()) == {blobs["kept"], blobs["orphan"]}
    assert not store.path(blobs["corrupt"]).exists()
    assert evictor.usage == 4 + 6  # kept and orphan: the account matches the index again
    assert not (tmp_path / PENDING).exists()
    await evictor.close()
    await index.close()
    shared.close()


class SlowRemovals(BlobStore):
    """A store whose deletions wait until the test lets them go: a pass caught mid-way."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.entered = asyncio.Event()
        self.go = asyncio.Event()

    async def remove(self, digests: list[str]) -> None:
        self.entered.set()
        await self.go.wait()
        await super().remove(digests)


async def full_cache(tmp_path: Path) -> tuple[SlowRemovals, Index, Evictor, list[str]]:
    store = SlowRemovals(tmp_path)
    index, _ = await recover(store, tmp_path / "index.db")
    digests = [await put(store, bytes([n]) * 100) for n in range(10)]
    for digest in digests:
        await index.add_blob(digest, 100, None)
    shared = SharedState(tmp_path / "state")
    evictor = Evictor(index, LocalContent(store), AccessTracker(index), 2000, {}, shared=shared)
    await evictor.start()
    evictor.max_size = 1050  # 1000 bytes cached: 997.5 is the high watermark, 945 the low
    return store, index, evictor, digests


async def test_a_reservation_during_a_pass_returns_without_waiting_for_it(
    tmp_path: Path,
) -> None:
    store, index, evictor, digests = await full_cache(tmp_path)
    await asyncio.wait_for(evictor.make_room(40), 1)  # past the watermark: starts the pass
    await asyncio.wait_for(store.entered.wait(), 5)  # the pass is deleting now
    await asyncio.wait_for(evictor.make_room(10), 1)  # a second commit, mid-pass
    assert evictor.usage == 1050  # both reserved, nothing freed yet
    assert set(await index.all_blobs()) == set(digests)
    store.go.set()
    done = await asyncio.wait_for(evictor.settled(), 5)
    assert (done.count, evictor.usage) == (2, 850)  # to the low watermark, both included
    await evictor.close()
    await index.close()


async def test_a_reservation_past_the_cap_waits_only_until_the_pass_made_room(
    tmp_path: Path,
) -> None:
    store, index, evictor, _ = await full_cache(tmp_path)
    reserving = asyncio.ensure_future(evictor.make_room(200))  # 1200: over the cap itself
    await asyncio.wait_for(store.entered.wait(), 5)
    await asyncio.sleep(0.05)
    assert not reserving.done()  # the cap holds: nothing was freed yet
    store.go.set()
    await asyncio.wait_for(reserving, 5)
    assert evictor.usage <= 1050
    assert (await evictor.settled()).count == 3  # 1200 -> 900, under 945
    await evictor.close()
    await index.close()


async def test_a_pass_in_another_worker_does_not_hold_up_a_reservation(tmp_path: Path) -> None:
    store, index, evictor, _ = await full_cache(tmp_path)
    store.go.set()
    other_worker = FileLock(tmp_path / "evict.lock")
    async with other_worker.hold():  # its pass runs
        await asyncio.wait_for(evictor.make_room(40), 1)
        await asyncio.sleep(0.05)
        assert evictor.usage == 1040  # reserved; this worker's pass waits for the lock
    done = await asyncio.wait_for(evictor.settled(), 5)  # then it runs
    assert (done.count, evictor.usage) == (1, 940)
    await evictor.close()
    await index.close()


async def test_serving_starts_before_recovery_finishes_and_never_serves_a_temp_file(
    tmp_path: Path,
    start_mirror: StartMirror,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "data"
    store = BlobStore(data)
    index, _ = await recover(store, data / "index.db")
    blobs = await damaged_cache(store, index)
    half = b"only half of a blob"
    unfinished = digest_of(half + b" and the rest")
    (store.tmp / f"{unfinished.replace(':', '-')}.0123456789ab").write_bytes(half)
    for digest in (blobs["kept"], unfinished):
        await index.add_holder(DOCKER_HUB, "library/app", digest)
    await index.close()

    held = asyncio.Event()
    reconcile_directory = recovery._reconcile_directory

    async def held_back(*args: object, **kwargs: object) -> RecoveryReport:
        await held.wait()
        return await reconcile_directory(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(recovery, "_reconcile_directory", held_back)
    mirror = await start_mirror("http://127.0.0.1:9", data=data)
    url = f"http://127.0.0.1:{mirror.port}/v2/library/app/blobs/"

    async def get(digest: str) -> tuple[int, bytes]:
        async with http.get(url + digest) as response:
            return response.status, await response.read()

    assert await get(blobs["kept"]) == (200, b"kept")
    status, body = await get(unfinished)  # only a temp file had it: a miss (upstream is down)
    assert status == 503 and half not in body
    evictor = mirror.app[EVICTOR]
    assert (data / PENDING).exists()
    held.set()
    report = await asyncio.wait_for(evictor.recovered(), 10)
    assert report == RecoveryReport(0, 1, 1, 1, False)
    assert not (data / PENDING).exists()
