"""The S3 object store against a real SeaweedFS on loopback: multipart uploads, ranged reads,
presigned URLs, deletes, listing, stale uploads and an outage."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import pytest

from mirror.store.blobs.local import digest_of
from mirror.store.blobs.s3 import (
    MAX_PARTS,
    MiB,
    ObjectMissing,
    ObjectStore,
    ObjectStoreError,
    S3Settings,
    part_size_for,
)
from tests.fixtures.seaweed import SeaweedFS, s3_settings

__all__ = ["s3_settings"]  # a fixture (a bucket per test); `seaweed` comes from conftest.py
pytestmark = pytest.mark.integration

PART = 5 * MiB  # S3's smallest part, so that a few parts stay quick


@pytest.fixture
async def store(s3_settings: S3Settings) -> AsyncIterator[ObjectStore]:
    opened = await ObjectStore.open(replace(s3_settings, part_size=PART))
    yield opened
    await opened.close()


async def read_all(store: ObjectStore, digest: str, start: int, end: int) -> bytes:
    return b"".join([chunk async for chunk in await store.read(digest, start, end)])


async def pending_uploads(seaweed: SeaweedFS, bucket: str) -> list[str]:
    """Keys with an incomplete multipart upload, asked of the server directly."""
    async with seaweed.client() as s3:
        response = await s3.list_multipart_uploads(Bucket=bucket)
    return [u["Key"] for u in response.get("Uploads", [])]


async def test_multipart_upload_reads_back_whole_and_by_range(
    store: ObjectStore, seaweed: SeaweedFS
) -> None:
    data = os.urandom(3 * PART + 12345)
    digest = digest_of(data)
    upload = await store.begin_upload(digest)
    for offset in range(0, len(data), 1_000_003):  # writes that straddle part boundaries
        await upload.write(data[offset : offset + 1_000_003])
    await upload.complete()

    assert await store.stat(digest) == len(data)
    assert await store.get(digest) == data
    assert await read_all(store, digest, 0, 100) == data[:100]
    middle = PART - 50  # across the first part boundary
    assert await read_all(store, digest, middle, middle + 100) == data[middle : middle + 100]
    assert await read_all(store, digest, len(data) - 100, len(data)) == data[-100:]
    assert await read_all(store, digest, 0, len(data)) == data
    async with seaweed.client() as s3:  # the server saw four parts
        head = await s3.head_object(Bucket=store.settings.bucket, Key=store.key(digest))
    assert head["ETag"].strip('"').endswith("-4")


async def test_ranged_read_streams_in_chunks(store: ObjectStore) -> None:
    data = os.urandom(2 * PART)
    digest = digest_of(data)
    await store.put(digest, data)
    stream = await store.read(digest, 0, len(data))
    first = await anext(stream)
    assert 0 < len(first) < len(data)
    await stream.aclose()
    assert [chunk async for chunk in stream] == []


async def test_a_range_the_server_does_not_answer_whole_is_an_error_before_any_byte(
    store: ObjectStore,
) -> None:
    """An object shorter than its index row says (replaced in the bucket): S3 answers the
    part of the range it has (Content-Range bytes 0-299999/300000), and the read fails before
    a byte is relayed, so the client's response is never completed short."""
    data = os.urandom(300_000)
    digest = digest_of(data)
    await store.put(digest, data)
    with pytest.raises(ObjectStoreError, match="asked for bytes 0-599999, answered bytes 0-299999"):
        await store.read(digest, 0, 2 * len(data))
    assert await read_all(store, digest, 0, len(data)) == data  # the store still answers


async def test_abort_leaves_no_object_and_no_pending_upload(
    store: ObjectStore, seaweed: SeaweedFS
) -> None:
    data = os.urandom(PART + 1000)
    digest = digest_of(data)
    upload = await store.begin_upload(digest)
    await upload.write(data)
    assert await pending_uploads(seaweed, store.settings.bucket) == [store.key(digest)]

    await upload.abort()
    await upload.abort()  # again: nothing to do, no error

    assert await pending_uploads(seaweed, store.settings.bucket) == []
    assert await store.stat(digest) is None


async def test_object_is_invisible_until_complete(store: ObjectStore) -> None:
    data = os.urandom(2 * PART + 7)
    digest = digest_of(data)
    upload = await store.begin_upload(digest)
    await upload.write(data)
    assert upload.upload_id is not None  # parts are on the server already

    assert await store.stat(digest) is None
    assert await store.get(digest) is None
    with pytest.raises(ObjectMissing):
        await store.read(digest, 0, 10)

    await upload.complete()
    assert await store.stat(digest) == len(data)


async def test_presigned_url_serves_the_bytes_until_it_expires(store: ObjectStore) -> None:
    data = os.urandom(4096)
    digest = digest_of(data)
    await store.put(digest, data)
    url = await store.presign(digest, 60)
    short = await store.presign(digest, 1)
    signature = url.index("X-Amz-Signature=") + len("X-Amz-Signature=")
    forged = url[:signature] + ("0" if url[signature] != "0" else "1") + url[signature + 1 :]

    async with aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            assert response.status == 200
            assert await response.read() == data
        async with http.get(forged) as response:
            assert response.status == 403
        await asyncio.sleep(2.1)
        async with http.get(short) as response:
            assert response.status == 403


async def test_delete_of_present_and_missing_objects(store: ObjectStore) -> None:
    kept, deleted, never = (os.urandom(100) for _ in range(3))
    await store.put(digest_of(kept), kept)
    await store.put(digest_of(deleted), deleted)

    await store.delete([digest_of(deleted), digest_of(never)])

    assert await store.stat(digest_of(deleted)) is None
    assert await store.get(digest_of(kept)) == kept


async def test_listing_names_every_blob_under_the_prefix_and_nothing_else(
    store: ObjectStore, seaweed: SeaweedFS
) -> None:
    blobs = [os.urandom(n) for n in (1, 1000, 70000)]
    before = time.time()
    for blob in blobs:
        await store.put(digest_of(blob), blob)
    bucket = store.settings.bucket
    async with seaweed.client() as s3:  # keys that are not blobs of this store's
        await s3.put_object(
            Bucket=bucket, Key=f"{store.prefix}blobs/sha256/ab/not-a-digest", Body=b"x"
        )
        wrong_fanout = store.key(digest_of(b"y")).replace("/blobs/sha256/", "/blobs/sha256/00", 1)
        await s3.put_object(Bucket=bucket, Key=wrong_fanout, Body=b"y")
        await s3.put_object(Bucket=bucket, Key=f"elsewhere/{store.key(digest_of(b'z'))}", Body=b"z")

    listed = [entry async for entry in store.listing()]

    assert sorted((d, size) for d, size, _ in listed) == sorted(
        (digest_of(b), len(b)) for b in blobs
    )
    assert all(before - 5 < mtime < time.time() + 5 for _, _, mtime in listed)


async def test_abort_stale_uploads_aborts_old_ones_under_the_prefix_only(
    store: ObjectStore, seaweed: SeaweedFS
) -> None:
    other = await ObjectStore.open(replace(store.settings, prefix="other/"))
    try:
        mine = await store.begin_upload(digest_of(b"mine"))
        await mine.write(os.urandom(PART))
        theirs = await other.begin_upload(digest_of(b"theirs"))
        await theirs.write(os.urandom(PART))

        assert await store.abort_stale_uploads(older_than=3600) == 0
        await asyncio.sleep(2)  # Initiated has whole seconds
        assert await store.abort_stale_uploads(older_than=1) == 1

        assert await pending_uploads(seaweed, store.settings.bucket) == [theirs.key]
        await theirs.abort()
    finally:
        await other.close()


async def test_ping_follows_an_outage_with_the_same_store(
    store: ObjectStore, seaweed: SeaweedFS
) -> None:
    data = os.urandom(1000)
    await store.put(digest_of(data), data)
    assert await store.ping() is True

    await seaweed.stop()
    try:
        began = time.monotonic()
        assert await store.ping() is False
        assert time.monotonic() - began < 5
        with pytest.raises(ObjectStoreError):
            await store.stat(digest_of(data))
    finally:
        await seaweed.start()

    assert await store.ping() is True
    assert await store.get(digest_of(data)) == data  # the data survived the restart


async def test_ping_is_false_for_a_missing_bucket(s3_settings: S3Settings) -> None:
    store = await ObjectStore.open(replace(s3_settings, bucket="no-such-bucket"))
    try:
        assert await store.ping() is False
    finally:
        await store.close()


async def test_missing_object(store: ObjectStore) -> None:
    digest = digest_of(b"never written")
    with pytest.raises(ObjectMissing):
        await store.read(digest, 0, 1)
    assert await store.get(digest) is None
    assert await store.stat(digest) is None


async def test_errors_never_carry_the_secret(s3_settings: S3Settings) -> None:
    wrong = replace(s3_settings, secret_key="wrong-" + (s3_settings.secret_key or ""))
    assert "wrong-" not in repr(wrong)
    store = await ObjectStore.open(wrong)
    try:
        with pytest.raises(ObjectStoreError) as caught:
            await store.put(digest_of(b"x"), b"x")
        assert "SignatureDoesNotMatch" in str(caught.value)
        assert "wrong-" not in str(caught.value) and "wrong-" not in repr(store)
    finally:
        await store.close()


async def test_parts_grow_so_that_a_huge_announced_size_fits_in_10000_parts(
    store: ObjectStore,
) -> None:
    huge = 200 * 1024**3  # 200 GiB: 8 MiB parts would need 25,600
    upload = await store.begin_upload(digest_of(b"huge"), size=huge)
    assert upload.part_size % MiB == 0
    assert -(-huge // upload.part_size) <= MAX_PARTS
    assert upload.part_size < 2 * huge / MAX_PARTS  # not needlessly large
    await upload.abort()
    assert part_size_for(None) == part_size_for(1000) == 8 * MiB
