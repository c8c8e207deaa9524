"""Recovery and eviction order on a real store and index in a temp dir (no sockets)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mirror.access import AccessTracker
from mirror.evict import Evictor
from mirror.recovery import recover
from mirror.shared import SharedState
from mirror.store.blobs import BlobStore, LocalContent, digest_of


async def put(store: BlobStore, data: bytes) -> str:
    digest = digest_of(data)
    await store.put(digest, data)
    return digest


async def test_recovery_reconciles_index_and_disk(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    index, report = await recover(store, tmp_path / "index.db")
    assert not report.repaired
    kept = await put(store, b"kept")
    await index.add_blob(kept, 4, None)
    ghost = digest_of(b"ghost")
    await index.add_blob(ghost, 5, None)  # a row whose file is gone
    orphan = await put(store, b"orphan")  # a file whose row is missing
    corrupt = digest_of(b"right")
    store.path(corrupt).parent.mkdir(parents=True, exist_ok=True)
    store.path(corrupt).write_bytes(b"wrong")
    (store.tmp / "partial.123").write_bytes(b"half")
    await index.close()

    index, report = await recover(store, tmp_path / "index.db")
    counts = (report.temp_removed, report.rows_dropped, report.files_indexed, report.files_deleted)
    assert counts == (1, 1, 1, 1)
    assert "incomplete download" in report.describe()
    assert set(await index.all_blobs()) == {kept, orphan}
    assert not store.path(corrupt).exists()
    await index.close()


async def test_a_damaged_index_is_rebuilt_from_disk(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    index, _ = await recover(store, tmp_path / "index.db")
    digest = await put(store, b"survivor")
    await index.add_blob(digest, 8, None)
    await index.close()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"index.db{suffix}").unlink(missing_ok=True)
    (tmp_path / "index.db").write_bytes(b"this is not a database" * 100)
    index, report = await recover(store, tmp_path / "index.db")
    assert report.index_rebuilt and report.files_indexed == 1
    assert set(await index.all_blobs()) == {digest}
    await index.close()


async def test_eviction_order_is_lru_and_spares_pins_and_fresh_tags(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    index, _ = await recover(store, tmp_path / "index.db")
    digests = [await put(store, bytes([n]) * 100) for n in range(6)]
    for digest in digests:
        await index.add_blob(digest, 100, None)
    now = time.time()
    await index.touch_many({d: now - 1000 + n for n, d in enumerate(digests)})  # 0 is oldest
    await index.pin("docker.io", "library/a", "v1", {digests[0]})
    await index.set_tag("docker.io", "library/b", "v1", digests[1], now)  # fresh tag
    access = AccessTracker(index)
    access.touch(digests[2])  # just used (pending, flushed by the evictor)
    shared = SharedState(tmp_path / "state")
    shared.set_usage((await index.usage())[0])
    evictor = Evictor(
        index,
        LocalContent(store),
        access,
        max_size=700,
        tag_ttls={"docker.io": 300.0},
        shared=shared,
    )
    await evictor.start()  # 600 is under the high watermark (665): nothing yet
    await evictor.make_room(300)  # 900 > 665: a pass evicts to 630, LRU first
    done = await evictor.settled()
    remaining = set(await index.all_blobs())
    assert done.count == 3
    assert remaining == {digests[0], digests[1], digests[2]}
    assert all(os.path.exists(store.path(d)) == (d in remaining) for d in digests)
    await evictor.close()
    await index.close()


async def test_a_reservation_is_given_back_unless_the_index_takes_its_bytes(
    tmp_path: Path,
) -> None:
    """`reserving`: a new row lands the bytes (the account keeps them), a row that was there
    or a failure before the index answered gives them back (an index outage mid-commit
    kept them counted for good)."""
    store = BlobStore(tmp_path)
    index, _ = await recover(store, tmp_path / "index.db")
    shared = SharedState(tmp_path / "state")
    evictor = Evictor(
        index,
        LocalContent(store),
        AccessTracker(index),
        max_size=10_000,
        tag_ttls={},
        shared=shared,
    )
    await evictor.start()
    async with evictor.reserving(100) as room:
        assert evictor.usage == 100
        room.settle(True)
    assert evictor.usage == 100
    async with evictor.reserving(50) as room:
        room.settle(False)  # indexed already: counted before
    assert evictor.usage == 100
    with pytest.raises(OSError):
        async with evictor.reserving(70):
            assert evictor.usage == 170
            raise OSError("the index went away")
    assert evictor.usage == 100
    await evictor.close()
    await index.close()
