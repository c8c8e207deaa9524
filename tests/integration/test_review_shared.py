"""Review of shared storage (a SeaweedFS bucket and a PostgreSQL index, both real): what an
operator on a bad day, or a second replica, can do to the promises of the README's section
"When one machine is not enough". Each test names the promise it checks.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from mirror.config import S3Config
from mirror.keys import EVICTOR, FETCHER
from mirror.store.blobs.bucket import BucketContent
from mirror.store.blobs.local import BlobStore
from mirror.store.blobs.s3 import ObjectStore
from mirror.store.index.postgres import PostgresIndex
from mirror.store.sweep import sweep_bucket
from tests.conftest import StartAdmin, StartMirror
from tests.fixtures.backends import Backend
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import make_image, random_bytes
from tests.integration.test_pull_path import get, mirror_url, pull

pytestmark = [pytest.mark.integration, pytest.mark.backends("s3")]
MiB = 1 << 20
HEADERS_PATIENCE = 30.0  # seconds containerd waits for response headers before giving up


async def settled(server: TestServer) -> None:
    """Every download stored and indexed, every eviction done."""
    async with asyncio.timeout(30):
        while len(server.app[FETCHER]):
            await asyncio.sleep(0.02)
    await server.app[EVICTOR].settled()


def hot_file(data: Path, digest: str) -> Path:
    return data / "blobs" / "sha256" / digest[7:9] / digest[7:]


async def index_of(backend: Backend) -> PostgresIndex:
    assert backend.postgres is not None and backend.database is not None
    return await PostgresIndex.open(
        backend.postgres.dsn(backend.database), password=backend.postgres.password
    )


async def test_max_size_caps_the_bucket_when_two_replicas_fill_it(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession, backend: Backend,
    tmp_path: Path,
) -> None:  # fmt: skip
    """README: "With s3 storage `max_size` caps the bucket's bytes". Two replicas on one bucket
    and database, each pulling two 3 MiB images under an 8 MiB cap: the bucket must stay
    under the cap, whichever replica stored what."""
    images = [make_image([{"big.bin": random_bytes(3 * MiB, 40 + n)}]) for n in range(4)]
    for n, image in enumerate(images):
        hub.add(f"team/cap{n}", "v1", image)
    one = await start_mirror(hub.registry_url, data=tmp_path / "one", max_size=8 * MiB)
    two = await start_mirror(hub.registry_url, data=tmp_path / "two", max_size=8 * MiB)
    for n in range(4):
        server = one if n < 2 else two
        await pull(http, mirror_url(server), f"team/cap{n}", "v1")
        await settled(server)
        await server.app[EVICTOR].settled()
    index = await index_of(backend)
    try:
        indexed = await index.all_blobs()
    finally:
        await index.close()
    assert sum(indexed.values()) <= 8 * MiB, f"{sum(indexed.values())} bytes under an 8 MiB cap"


async def test_a_purge_on_one_replica_stops_every_replica_serving_the_blob(
    hub: FakeHub, start_mirror: StartMirror, start_admin: StartAdmin,
    http: aiohttp.ClientSession, tmp_path: Path,
) -> None:  # fmt: skip
    """A purge removes content "now" (README, operator commands). Replica two served the layer
    and keeps a hot-tier copy; after replica one purged the image, replica two must not go on
    serving that copy as a cache hit (README only concedes memory caches until they expire)."""
    image = make_image([{"big.bin": random_bytes(2 * MiB, 60)}])
    layer = image.layers()[0]
    hub.add("team/purged", "v1", image)
    one = await start_mirror(hub.registry_url, data=tmp_path / "one")
    two = await start_mirror(hub.registry_url, data=tmp_path / "two")
    await pull(http, mirror_url(two), "team/purged", "v1")
    await settled(two)
    assert hot_file(tmp_path / "two", layer.digest).exists()
    admin = str((await start_admin(one)).make_url("")).rstrip("/")
    async with http.post(f"{admin}/admin/purge", json={"image": "team/purged:v1"}) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["removed_blobs"] >= 2
    hub.reset_log()
    status, headers, body = await get(
        http, f"{mirror_url(two)}/v2/team/purged/blobs/{layer.digest}"
    )
    assert status == 200 and body == layer.data
    assert headers["X-Mirror-Cache"] == "miss", "a purged blob was served from replica two's disk"


async def test_a_blob_purged_while_streamed_from_the_bucket_is_not_resurrected_on_disk(
    hub: FakeHub, start_mirror: StartMirror, start_admin: StartAdmin,
    http: aiohttp.ClientSession, tmp_path: Path,
) -> None:  # fmt: skip
    """One replica. A whole read from the bucket writes a hot-tier copy as it streams; a purge
    meanwhile deletes the object, the row and the local file. The copy must not be renamed into
    place afterwards: the purged blob would be a hit again, with no index row, forever."""
    image = make_image([{"big.bin": random_bytes(24 * MiB, 61)}])
    layer = image.layers()[0]
    hub.add("team/resurrect", "v1", image)
    data = tmp_path / "data"
    server = await start_mirror(hub.registry_url, data=data)
    base = mirror_url(server)
    admin = str((await start_admin(server)).make_url("")).rstrip("/")
    await pull(http, base, "team/resurrect", "v1")
    await settled(server)
    hot_file(data, layer.digest).unlink()  # not in the hot tier: the bucket path serves it
    async with http.get(f"{base}/v2/team/resurrect/blobs/{layer.digest}") as resp:
        assert resp.headers["X-Mirror-Cache"] == "hit"
        first = await resp.content.readexactly(1 * MiB)
        async with http.post(f"{admin}/admin/purge", json={"image": "team/resurrect:v1"}) as p:
            assert (await p.json())["removed_blobs"] >= 2
        try:
            rest = await resp.read()
        except aiohttp.ClientPayloadError:
            rest = b""  # the bucket cut the stream: a short body is an honest failure
    if rest:
        assert hashlib.sha256(first + rest).hexdigest() == layer.digest[7:]
    await asyncio.sleep(0.5)
    assert not hot_file(data, layer.digest).exists(), "the purged blob is back on local disk"


async def test_a_prefixless_bucket_sweep_leaves_other_applications_uploads_alone(
    backend: Backend, tmp_path: Path
) -> None:
    """`storage = "s3://bucket"` (no prefix) in a bucket another tool also writes to: the sweep
    may abort only the mirror's own abandoned uploads (`<prefix>blobs/...`), not a backup
    tool's multipart upload of `backups/db.tar` that has been running for over an hour."""
    assert backend.seaweed is not None and backend.bucket is not None
    async with backend.seaweed.client() as s3:
        created = await s3.create_multipart_upload(Bucket=backend.bucket, Key="backups/db.tar")
        upload_id = created["UploadId"]
        objects = await ObjectStore.open(backend.seaweed.settings(backend.bucket, prefix=""))
        content = BucketContent(BlobStore(tmp_path / "sweeper"), objects, 0, redirect=False)
        index = await index_of(backend)
        try:
            await sweep_bucket(content, index, grace=0)
        finally:
            await index.close()
            await objects.close()
        listed = await s3.list_multipart_uploads(Bucket=backend.bucket)
        alive = [u["UploadId"] for u in listed.get("Uploads", [])]
        with_abort = upload_id in alive
        if with_abort:
            await s3.abort_multipart_upload(
                Bucket=backend.bucket, Key="backups/db.tar", UploadId=upload_id
            )
    assert with_abort, "the mirror's sweep aborted another application's upload"


def _seaweed_pid(backend: Backend) -> int:
    assert backend.seaweed is not None
    proc = backend.seaweed._proc
    assert proc is not None
    return proc.pid


async def test_a_hung_bucket_answers_blob_requests_within_seconds(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession, backend: Backend,
    tmp_path: Path,
) -> None:  # fmt: skip
    """A bucket that accepts connections but never answers (SIGSTOP): a warm blob that is not
    in the hot tier must get its 503 + Retry-After well inside containerd's 30 s header
    timeout (README: "misses are refused with 503"), and once the bucket is known down, the
    next such request must not wait for the same timeout again."""
    image = make_image([{"big.bin": random_bytes(1 * MiB, 62)}, {"b.bin": random_bytes(MiB, 63)}])
    hub.add("team/hung", "v1", image)
    data = tmp_path / "data"
    server = await start_mirror(hub.registry_url, data=data)
    base = mirror_url(server)
    await pull(http, base, "team/hung", "v1")
    await settled(server)
    for layer in image.layers():
        hot_file(data, layer.digest).unlink()
    pid = _seaweed_pid(backend)
    os.kill(pid, signal.SIGSTOP)
    answers: list[tuple[int | None, str | None, float]] = []
    try:
        for layer in image.layers():
            started = time.monotonic()
            answer: tuple[int | None, str | None]
            try:
                async with http.get(
                    f"{base}/v2/team/hung/blobs/{layer.digest}",
                    timeout=aiohttp.ClientTimeout(total=HEADERS_PATIENCE),
                ) as resp:
                    answer = (resp.status, resp.headers.get("Retry-After"))
                    await resp.read()
            except TimeoutError:
                answer = (None, None)  # containerd would have given up and gone upstream
            answers.append((*answer, time.monotonic() - started))
    finally:
        os.kill(pid, signal.SIGCONT)
    (first, first_retry, first_took), (second, second_retry, second_took) = answers
    assert (first, first_retry) == (503, "10"), f"first request: {first} after {first_took:.1f} s"
    assert first_took < 15, f"first request waited {first_took:.1f} s for a hung bucket"
    assert (second, second_retry) == (503, "10")
    assert second_took < 2, f"with the bucket known down, the next waited {second_took:.1f} s"


async def test_redirect_mode_hands_no_presigned_url_to_a_repository_without_the_blob(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession, backend: Backend
) -> None:
    """Per-repository access on the bucket path: with `s3_redirect`, a digest cached for
    `team/owner` asked under `team/other` (which upstream says does not hold it) gets 404, not
    a 307 to a presigned URL of the bucket's copy."""
    owner = make_image([{"secret.bin": random_bytes(1 * MiB, 64)}])
    other = make_image([{"public.bin": random_bytes(1 * MiB, 65)}])
    hub.add("team/owner", "v1", owner)
    hub.add("team/other", "v1", other)
    s3 = backend.config["s3"]
    assert isinstance(s3, S3Config)
    server = await start_mirror(hub.registry_url, s3=replace(s3, redirect=True))
    base = mirror_url(server)
    await pull(http, base, "team/owner", "v1")
    await settled(server)
    layer = owner.layers()[0]
    for method in ("GET", "HEAD"):
        async with http.request(
            method, f"{base}/v2/team/other/blobs/{layer.digest}", allow_redirects=False
        ) as resp:
            assert resp.status == 404, method
            assert "Location" not in resp.headers


async def test_hot_tier_hits_are_served_while_the_database_is_down(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession, backend: Backend,
    tmp_path: Path,
) -> None:  # fmt: skip
    """README: with the database down, "hits from the hot tier's local files ... keep being
    served". A replica restarted (a rolling deploy) has the layer on its disk but has not
    served it since; the database then stops. The layer is a hot-tier hit."""
    image = make_image([{"big.bin": random_bytes(1 * MiB, 66)}])
    layer = image.layers()[0]
    hub.add("team/hot", "v1", image)
    data = tmp_path / "data"
    first = await start_mirror(hub.registry_url, data=data)
    await pull(http, mirror_url(first), "team/hot", "v1")
    await settled(first)
    await first.close()
    assert hot_file(data, layer.digest).exists()
    second = await start_mirror(hub.registry_url, data=data)
    assert backend.postgres is not None
    await asyncio.to_thread(backend.postgres.stop)
    try:
        status, _, body = await get(http, f"{mirror_url(second)}/v2/team/hot/blobs/{layer.digest}")
    finally:
        await asyncio.to_thread(backend.postgres.start)
    assert status == 200 and body == layer.data
