"""Shared storage: blobs in a real bucket (SeaweedFS), the index in a real PostgreSQL.

What the bucket engine adds to the pull path (which test_pull_path.py runs on both backends):
a blob not on the replica's disk is streamed from the bucket (Range passed through) or
redirected to a presigned URL; a restarted replica with an empty disk pulls everything from
the bucket; a replica killed mid-download leaves no object; outages of either backend cost no
500 and no half-recorded content, and service comes back without a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from mirror.keys import EVICTOR, FETCHER
from mirror.store.blobs.bucket import BucketContent
from mirror.store.blobs.local import BlobStore
from mirror.store.blobs.s3 import ObjectStore, S3Settings
from mirror.store.index.postgres import PostgresIndex
from mirror.store.sweep import sweep_bucket
from tests.conftest import StartAdmin, StartMirror
from tests.fixtures.backends import Backend
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import big_image, make_image, random_bytes, small_image
from tests.fixtures.procs import mirror_process, run, skopeo_pull_and_verify
from tests.integration.test_pull_path import get, mirror_url, pull

pytestmark = [pytest.mark.integration, pytest.mark.backends("s3")]
MiB = 1 << 20


def objects_of(backend: Backend) -> S3Settings:
    assert backend.seaweed is not None and backend.bucket is not None
    return backend.seaweed.settings(backend.bucket, prefix="cache/")


async def index_of(backend: Backend) -> PostgresIndex:
    assert backend.postgres is not None and backend.database is not None
    return await PostgresIndex.open(
        backend.postgres.dsn(backend.database), password=backend.postgres.password
    )


async def settled(server: TestServer) -> None:
    """Every download committed: clients get their last byte before the upload completes."""
    async with asyncio.timeout(30):
        while len(server.app[FETCHER]):
            await asyncio.sleep(0.02)


def wipe_local_blobs(data: Path) -> None:
    shutil.rmtree(data / "blobs")
    (data / "blobs").mkdir()


async def test_a_blob_not_on_local_disk_is_streamed_from_the_bucket_ranges_too(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    image = make_image([{"big.bin": random_bytes(12 * MiB, 7)}, {"etc/x": b"x\n"}])
    hub.add("team/app", "v1", image)
    data = tmp_path / "mirror-data"
    server = await start_mirror(hub.registry_url, data=data)
    base = mirror_url(server)
    await pull(http, base, "team/app", "v1")
    layer = image.layers()[0]
    await settled(server)
    wipe_local_blobs(data)
    hub.reset_log()
    status, headers, body = await get(http, f"{base}/v2/team/app/blobs/{layer.digest}")
    assert status == 200 and body == layer.data
    assert headers["Content-Length"] == str(len(layer.data))
    assert headers["X-Mirror-Cache"] == "hit"
    for first, last in ((0, 0), (5 * MiB - 3, 9 * MiB + 4), (len(layer.data) - 10, None)):
        spec = f"bytes={first}-{'' if last is None else last}"
        status, headers, body = await get(
            http, f"{base}/v2/team/app/blobs/{layer.digest}", Range=spec
        )
        end = len(layer.data) - 1 if last is None else last
        assert status == 206, spec
        assert body == layer.data[first : end + 1], spec
        assert headers["Content-Range"] == f"bytes {first}-{end}/{len(layer.data)}"
    assert hub.blob_gets() == [], "the bucket had it: upstream must not be asked"
    # The whole read left a verified local copy: the hot tier serves it from now on.
    copy = data / "blobs" / "sha256" / layer.digest[7:9] / layer.digest[7:]
    assert copy.read_bytes() == layer.data


async def test_an_object_altered_in_the_bucket_is_never_served_whole(
    hub: FakeHub,
    start_mirror: StartMirror,
    http: aiohttp.ClientSession,
    backend: Backend,
    tmp_path: Path,
) -> None:
    image = make_image([{"big.bin": random_bytes(3 * MiB, 8)}])
    hub.add("team/altered", "v1", image)
    data = tmp_path / "mirror-data"
    server = await start_mirror(hub.registry_url, data=data)
    base = mirror_url(server)
    await pull(http, base, "team/altered", "v1")
    await settled(server)
    layer = image.layers()[0]
    wipe_local_blobs(data)
    forged = bytes(b ^ 0xFF for b in layer.data[:16]) + layer.data[16:]
    assert backend.seaweed is not None and backend.bucket is not None
    async with backend.seaweed.client() as s3:
        key = f"cache/blobs/sha256/{layer.digest[7:9]}/{layer.digest[7:]}"
        await s3.put_object(Bucket=backend.bucket, Key=key, Body=forged)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(f"{base}/v2/team/altered/blobs/{layer.digest}") as resp:
            assert resp.status == 200
            await resp.read()
    assert not (data / "blobs" / "sha256" / layer.digest[7:9] / layer.digest[7:]).exists()


async def test_redirect_mode_sends_clients_to_a_presigned_bucket_url(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession, backend: Backend
) -> None:
    image = small_image("redirect")
    hub.add("team/redirect", "v1", image)
    assert backend.config["s3"] is not None
    s3 = backend.config["s3"]
    from dataclasses import replace

    server = await start_mirror(hub.registry_url, s3=replace(s3, redirect=True))  # type: ignore[type-var]
    base = mirror_url(server)
    await pull(http, base, "team/redirect", "v1")  # cold: the mirror downloads and streams it
    await settled(server)
    layer = image.layers()[0]
    url = f"{base}/v2/team/redirect/blobs/{layer.digest}"
    async with http.get(url, allow_redirects=False) as resp:
        assert resp.status == 307
        location = resp.headers["Location"]
        assert resp.headers["Docker-Content-Digest"] == layer.digest
    assert location.startswith(backend.seaweed.endpoint if backend.seaweed else "")
    assert "Signature" in location or "X-Amz-Signature" in location
    async with http.get(location) as resp:
        assert resp.status == 200
        assert await resp.read() == layer.data
    async with http.head(url, allow_redirects=False) as resp:
        assert resp.status == 200  # a HEAD is answered here: it carries no bytes
        assert resp.headers["Content-Length"] == str(len(layer.data))
    assert len(hub.blob_gets(layer.digest)) == 1


async def test_a_restarted_replica_with_an_empty_disk_pulls_everything_from_the_bucket(
    hub: FakeHub, backend: Backend, tmp_path: Path
) -> None:
    images = {
        "library/alpine:3.19": small_image("alpine", layers=3),
        "team/big:v1": big_image("big", 20 * MiB, seed=3),
    }
    for ref, image in images.items():
        name, tag = ref.split(":")
        hub.add(name, tag, image)
    data = tmp_path / "data"
    async with mirror_process(data, hub.registry_url, *backend.flags, env=backend.env) as mirror:
        host = mirror.url.removeprefix("http://")
        for ref, image in images.items():
            await skopeo_pull_and_verify(f"{host}/{ref}", tmp_path / "cold" / ref, image)
    shutil.rmtree(data)
    hub.reset_log()
    async with mirror_process(data, hub.registry_url, *backend.flags, env=backend.env) as mirror:
        host = mirror.url.removeprefix("http://")
        for ref, image in images.items():
            await skopeo_pull_and_verify(f"{host}/{ref}", tmp_path / "warm" / ref, image)
    assert hub.requests() == [], "every byte came from the bucket and the database"
    # `mirror ls` reads the shared index, wherever it runs.
    assert backend.postgres is not None and backend.database is not None
    listed = await run(
        sys.executable, "-m", "mirror", "ls", "--json",
        "--index", backend.postgres.dsn(backend.database),
        env={**os.environ, **backend.env},
    )  # fmt: skip
    assert {f"{e['repository']}:{e['tag']}" for e in json.loads(listed)} == set(images)


async def test_kill_9_mid_download_leaves_no_object_and_the_retry_works(
    hub: FakeHub, backend: Backend, tmp_path: Path
) -> None:
    image = big_image("crash", 40 * MiB, seed=5)
    hub.add("team/crash", "v1", image)
    layer = image.layers()[0]
    data = tmp_path / "data"
    async with aiohttp.ClientSession() as http:
        async with mirror_process(
            data, hub.registry_url, *backend.flags, env=backend.env
        ) as mirror:
            hub.slow = 0.003
            resp = await http.get(f"{mirror.url}/v2/team/crash/blobs/{layer.digest}")
            await resp.content.readexactly(20 * MiB)  # two 8 MiB parts are in the bucket by now
            mirror.proc.send_signal(signal.SIGKILL)
            await mirror.proc.wait()
            resp.close()
        hub.slow = 0
        objects = await ObjectStore.open(objects_of(backend))
        bucket = BucketContent(BlobStore(tmp_path / "sweeper"), objects, 0, redirect=False)
        index = await index_of(backend)
        try:
            assert await objects.stat(layer.digest) is None, "a partial object became visible"
            assert await index.get_blob(layer.digest) is None
            swept = await sweep_bucket(bucket, index, grace=0)
            assert swept.uploads == 1, "the killed download's multipart upload was not found"
            async with mirror_process(
                data, hub.registry_url, *backend.flags, env=backend.env
            ) as mirror:
                got = await pull(http, mirror.url, "team/crash", "v1")
            assert got[layer.digest] == layer.data
            assert await index.get_blob(layer.digest) == len(layer.data)
            stored = await objects.get(layer.digest)
            assert stored is not None and hashlib.sha256(stored).hexdigest() == layer.digest[7:]
            assert (await sweep_bucket(bucket, index, grace=0)).objects == 0
        finally:
            await index.close()
            await objects.close()


async def _pull_loop(
    http: aiohttp.ClientSession, base: str, names: list[str], statuses: list[int]
) -> None:
    """Pull every image in turn, recording every status; a 200 must carry the right bytes."""
    for name in names:
        async with http.get(
            f"{base}/v2/{name}/manifests/v1",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        ) as resp:
            statuses.append(resp.status)
            if resp.status != 200:
                assert resp.status == 503, await resp.text()
                assert resp.headers.get("Retry-After"), "a 503 must say when to retry"
                continue
            doc = await resp.json(content_type=None)
        for desc in (doc["config"], *doc["layers"]):
            async with http.get(f"{base}/v2/{name}/blobs/{desc['digest']}") as resp:
                statuses.append(resp.status)
                if resp.status != 200:
                    assert resp.status == 503, await resp.text()
                    assert resp.headers.get("Retry-After")
                    continue
                body = await resp.read()
            assert "sha256:" + hashlib.sha256(body).hexdigest() == desc["digest"]


@pytest.mark.parametrize("outage", ["bucket", "database"])
async def test_an_outage_of_either_backend_costs_no_500_and_heals_without_restart(
    hub: FakeHub,
    start_mirror: StartMirror,
    http: aiohttp.ClientSession,
    backend: Backend,
    outage: str,
) -> None:
    warm = [f"team/warm{n}" for n in range(3)]
    cold = [f"team/cold{n}" for n in range(6)]
    for n, name in enumerate(warm + cold):
        hub.add(name, "v1", small_image(f"{name}-{n}"))
    server = await start_mirror(hub.registry_url)
    base = mirror_url(server)
    for name in warm:
        await pull(http, base, name, "v1")
    await settled(server)
    assert backend.seaweed is not None and backend.postgres is not None
    statuses: list[int] = []
    if outage == "bucket":
        await backend.seaweed.stop()
    else:
        await asyncio.to_thread(backend.postgres.stop)
    try:
        loop = asyncio.get_running_loop()
        until = loop.time() + 10
        while loop.time() < until:
            await _pull_loop(http, base, warm, statuses)  # hits: still served
            await _pull_loop(http, base, cold[:3], statuses)  # misses: 503 + Retry-After
            await asyncio.sleep(0.2)
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 503
    finally:
        if outage == "bucket":
            await backend.seaweed.start()
        else:
            await asyncio.to_thread(backend.postgres.start)
    assert 500 not in statuses
    assert statuses.count(200) > 0 and statuses.count(503) > 0
    # Back without a restart: within a few seconds every pull, misses included, succeeds.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:
        after: list[int] = []
        await _pull_loop(http, base, warm + cold, after)
        if set(after) == {200}:
            break
        assert loop.time() < deadline, f"still failing after the {outage} came back: {after}"
        await asyncio.sleep(0.5)
    async with http.get(f"{base}/readyz") as resp:
        assert resp.status == 200
    # Nothing half-recorded: every indexed blob is in the bucket, whole and verified.
    objects = await ObjectStore.open(objects_of(backend))
    index = await index_of(backend)
    try:
        indexed = await index.all_blobs()
        assert len(indexed) >= 2 * len(warm + cold)
        for digest, size in indexed.items():
            stored = await objects.get(digest)
            assert stored is not None and len(stored) == size, digest
            assert hashlib.sha256(stored).hexdigest() == digest[7:], digest
    finally:
        await index.close()
        await objects.close()


async def test_eviction_under_max_size_deletes_from_the_bucket_and_the_index_alike(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession, backend: Backend
) -> None:
    """`max_size` caps the bucket's bytes: evicted blobs leave the bucket, not just the disk,
    and what stays indexed is exactly what the bucket holds."""
    images = [make_image([{"big.bin": random_bytes(3 * MiB, 20 + n)}]) for n in range(5)]
    for n, image in enumerate(images):
        hub.add(f"team/evict{n}", "v1", image)
    server = await start_mirror(hub.registry_url, max_size=8 * MiB)
    base = mirror_url(server)
    for n in range(len(images)):
        await pull(http, base, f"team/evict{n}", "v1")
        await settled(server)
        await server.app[EVICTOR].settled()
    objects = await ObjectStore.open(objects_of(backend))
    index = await index_of(backend)
    try:
        indexed = await index.all_blobs()
        in_bucket = {digest: size async for digest, size, _ in objects.listing()}
        assert in_bucket == indexed
        assert sum(indexed.values()) <= 8 * MiB
        first = images[0].layers()[0].digest
        assert first not in in_bucket, "the least recently used layer should have gone"
        assert images[-1].layers()[0].digest in in_bucket
    finally:
        await index.close()
        await objects.close()


async def test_a_purge_while_the_database_is_down_is_refused_with_503_not_500(
    hub: FakeHub,
    start_mirror: StartMirror,
    start_admin: StartAdmin,
    http: aiohttp.ClientSession,
    backend: Backend,
) -> None:
    hub.add("team/purge", "v1", small_image("purge"))
    server = await start_mirror(hub.registry_url)
    admin = mirror_url(await start_admin(server))
    await pull(http, mirror_url(server), "team/purge", "v1")
    await settled(server)
    assert backend.postgres is not None
    await asyncio.to_thread(backend.postgres.stop)
    try:
        async with http.post(f"{admin}/admin/purge", json={"image": "team/purge:v1"}) as resp:
            assert resp.status == 503, await resp.text()
            assert resp.headers["Retry-After"] == "10"
            assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
    finally:
        await asyncio.to_thread(backend.postgres.start)
