"""Cluster mode: three `mirror serve` replicas on one bucket (SeaweedFS) and one index
(PostgreSQL), behind Debian's nginx spreading requests round-robin, as a Service would.

They behave as one cache: a blob or tag asked of every replica at once crosses the upstream
once, the others streaming it from the claimant as it arrives; the claimant killed mid-download
is taken over; a purge on one replica reaches every replica's memory at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from mirror.store.blobs.bucket import BucketContent
from mirror.store.blobs.local import BlobStore
from mirror.store.blobs.s3 import ObjectStore
from mirror.store.sweep import sweep_bucket
from tests.fixtures.backends import Backend
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import big_image, small_image
from tests.fixtures.procs import Service, free_port, mirror_process, need, wait_http
from tests.integration.test_pull_path import ALL_TYPES, pull
from tests.integration.test_shared_storage import index_of, objects_of
from tests.integration.test_workers import metric_total

pytestmark = [pytest.mark.integration, pytest.mark.backends("s3")]
MiB = 1 << 20
ACCEPT = {"Accept": ALL_TYPES}


@dataclass
class Cluster:
    replicas: list[Service]
    peers: list[str]
    url: str  # nginx in front of all of them


@contextlib.asynccontextmanager
async def nginx(backends: list[str], work: Path) -> AsyncIterator[str]:
    """Debian's nginx as a round-robin load balancer (no buffering: bytes pass as they come)."""
    need("nginx")
    port = free_port()
    temp = work / "nginx-temp"
    temp.mkdir(parents=True, exist_ok=True)
    servers = "".join(f"    server {b.removeprefix('http://')};\n" for b in backends)
    (work / "nginx.conf").write_text(
        f"daemon off; user root; worker_processes 1; pid {work}/nginx.pid;\n"
        f"error_log {work}/nginx.err;\nevents {{}}\n"
        "http {\n  access_log off;\n"
        + "".join(f"  {t}_temp_path {temp}/{t};\n" for t in ("client_body", "proxy", "fastcgi",
                                                             "uwsgi", "scgi"))
        + f"  upstream mirrors {{\n{servers}  }}\n"
        f"  server {{ listen 127.0.0.1:{port};\n"
        "    location / { proxy_pass http://mirrors; proxy_http_version 1.1;\n"
        "      proxy_set_header Connection \"\"; proxy_buffering off;\n"
        "      proxy_request_buffering off; proxy_read_timeout 120s; }\n  }\n}\n"
    )  # fmt: skip
    proc = subprocess.Popen(["nginx", "-c", str(work / "nginx.conf")])
    try:
        await wait_http(f"http://127.0.0.1:{port}/v2/")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.asynccontextmanager
async def replica(
    backend: Backend, hub: FakeHub, data: Path, secret: Path, peer_port: int
) -> AsyncIterator[Service]:
    async with mirror_process(
        data, hub.registry_url, *backend.flags, "--workers", "1",
        "--peer-listen", f"127.0.0.1:{peer_port}", "--cluster-secret-file", str(secret),
        env=backend.env,
    ) as service:  # fmt: skip
        yield service


@contextlib.asynccontextmanager
async def cluster_of(n: int, backend: Backend, hub: FakeHub, work: Path) -> AsyncIterator[Cluster]:
    secret = work / "cluster-secret"
    secret.write_text(secrets.token_hex(24))
    ports = [free_port() for _ in range(n)]
    async with contextlib.AsyncExitStack() as stack:
        replicas = [
            await stack.enter_async_context(
                replica(backend, hub, work / f"replica{i}", secret, ports[i])
            )
            for i in range(n)
        ]
        url = await stack.enter_async_context(nginx([r.url for r in replicas], work / "nginx"))
        yield Cluster(replicas, [f"http://127.0.0.1:{p}" for p in ports], url)


async def first_byte_and_body(http: aiohttp.ClientSession, url: str) -> tuple[float, bytes]:
    """When (monotonic) the first body byte came, and the whole body."""
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        first = await resp.content.readany()
        at = time.monotonic()
        rest = await resp.read()
    return at, first + rest


async def test_concurrent_cold_pulls_on_every_replica_cross_the_upstream_once(
    hub: FakeHub, backend: Backend, tmp_path: Path
) -> None:
    """8 clients at once, spread over 3 replicas by nginx, pull a new 256 MiB image: the
    upstream sends it once, is asked for the manifest once, and every client has its first
    layer byte within 1 s of the upstream's first (nobody waits for the whole layer). A new
    replica with an empty disk then serves it with zero upstream requests."""
    image = big_image("cluster", 256 * MiB, seed=11)
    hub.add("team/cluster", "v1", image)
    layer = image.layers()[0]
    async with cluster_of(3, backend, hub, tmp_path) as cluster:
        hub.reset_log()
        hub.cdn_bytes = 0
        hub.cdn_first_byte_at = None
        async with aiohttp.ClientSession() as http:
            # Eight clients resolve the tag at once (round-robin: every replica is asked)...
            manifests = await asyncio.gather(
                *(http.get(f"{cluster.url}/v2/team/cluster/manifests/v1", headers=ACCEPT)
                  for _ in range(8))
            )  # fmt: skip
            for resp in manifests:
                assert resp.status == 200
                assert await resp.read() == image.top.data
            # ... then fetch the big layer at once.
            results = await asyncio.gather(
                *(first_byte_and_body(http, f"{cluster.url}/v2/team/cluster/blobs/"
                                      f"{layer.digest}") for _ in range(8))
            )  # fmt: skip
        assert all(body == layer.data for _, body in results)
        assert len(hub.manifest_gets()) == 1, [r.path for r in hub.manifest_gets()]
        assert len(hub.requests("token")) <= 2
        assert hub.cdn_bytes == len(layer.data), "the layer crossed the upstream more than once"
        assert hub.cdn_first_byte_at is not None
        late = [at - hub.cdn_first_byte_at for at, _ in results]
        assert max(late) < 1.0, f"first layer bytes after the upstream's first: {late}"
        # Cluster totals count each byte once: upstream bytes summed over the replicas are the
        # upstream's, and the bytes a replica relayed from a peer count as served from cache.
        async with aiohttp.ClientSession() as http:
            texts = []
            for r in cluster.replicas:
                async with http.get(f"{r.url}/metrics") as resp:
                    texts.append(await resp.text())
        upstream = sum(metric_total(t, "mirror_upstream_bytes_total") for t in texts)
        # (the manifest's few hundred bytes come on top of the CDN's layer bytes)
        assert hub.cdn_bytes <= upstream <= hub.cdn_bytes + 64 * 1024, (upstream, hub.cdn_bytes)
        served_upstream = sum(
            metric_total(t, "mirror_served_bytes_total", source="upstream") for t in texts
        )
        assert served_upstream <= len(layer.data) + MiB, served_upstream
        async with aiohttp.ClientSession() as http:  # the rest of the image, cached too
            await pull(http, cluster.url, "team/cluster", "v1")
        # A replica with an empty disk (a new pod, or one restarted on a fresh volume).
        hub.reset_log()
        secret = tmp_path / "cluster-secret"
        fresh_replica = replica(backend, hub, tmp_path / "fresh", secret, free_port())
        async with fresh_replica as fresh, aiohttp.ClientSession() as http:
            got = await pull(http, fresh.url, "team/cluster", "v1")
        assert got[layer.digest] == layer.data
        assert hub.requests() == [] and hub.requests("cdn") == [], "upstream was asked"


async def test_the_claimant_killed_mid_download_is_taken_over(
    hub: FakeHub, backend: Backend, tmp_path: Path
) -> None:
    image = big_image("takeover", 256 * MiB, seed=12)
    hub.add("team/takeover", "v1", image)
    layer = image.layers()[0]
    async with cluster_of(3, backend, hub, tmp_path) as cluster, aiohttp.ClientSession() as http:
        # Every replica has the manifest (pulls of it go round-robin through nginx).
        for replica_ in cluster.replicas:
            async with http.get(
                f"{replica_.url}/v2/team/takeover/manifests/v1", headers=ACCEPT
            ) as resp:
                assert resp.status == 200
        hub.reset_log()
        hub.cdn_bytes = 0
        hub.slow = 0.001
        url = f"/v2/team/takeover/blobs/{layer.digest}"
        # One client straight to each replica: replica 0 claims first.
        first = await http.get(cluster.replicas[0].url + url)
        await first.content.readexactly(1 * MiB)
        others = [asyncio.create_task(_read_all(http, r.url + url)) for r in cluster.replicas[1:]]
        while hub.cdn_bytes < 0.4 * len(layer.data):
            await asyncio.sleep(0.02)
        cluster.replicas[0].proc.send_signal(signal.SIGKILL)
        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
            await first.read()
        bodies = await asyncio.gather(*others)
        assert all(body == layer.data for body in bodies)
        assert hub.cdn_bytes <= 1.5 * len(layer.data), hub.cdn_bytes
        # The dead replica's client retries (through the balancer) and gets it.
        hub.slow = 0
        retry = await _read_all(http, cluster.replicas[1].url + url)
        assert retry == layer.data
    objects = await ObjectStore.open(objects_of(backend))
    index = await index_of(backend)
    try:
        async with asyncio.timeout(30):  # the new claimant's upload completes, then its row
            while await index.get_blob(layer.digest) is None:
                await asyncio.sleep(0.1)
        stored = await objects.get(layer.digest)
        assert stored is not None and hashlib.sha256(stored).hexdigest() == layer.digest[7:]
        assert await index.get_blob(layer.digest) == len(layer.data)
        bucket = BucketContent(BlobStore(tmp_path / "sweeper"), objects, 0, redirect=False)
        await sweep_bucket(bucket, index, grace=0)
        async with backend.seaweed.client() as s3:  # type: ignore[union-attr]
            uploads = await s3.list_multipart_uploads(Bucket=backend.bucket or "")
        assert uploads.get("Uploads", []) == [], "parts of the dead replica's upload remain"
    finally:
        await index.close()
        await objects.close()


async def _read_all(http: aiohttp.ClientSession, url: str) -> bytes:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def test_a_purge_on_one_replica_reaches_every_replicas_memory_within_a_second(
    hub: FakeHub, backend: Backend, tmp_path: Path
) -> None:
    old, new = small_image("old"), small_image("new")
    hub.add("library/alpine", "3.19", old)
    async with cluster_of(3, backend, hub, tmp_path) as cluster, aiohttp.ClientSession() as http:
        for r in cluster.replicas:
            await pull(http, r.url, "library/alpine", "3.19")  # in every replica's memory
        layer = old.layers()[0].digest
        for _ in range(2):  # the second is a hit on replica 1's hot copy, confirmed just now
            await _read_all(http, f"{cluster.replicas[1].url}/v2/library/alpine/blobs/{layer}")
        hub.add("library/alpine", "3.19", new)  # upstream moved the tag meanwhile
        async with http.post(
            f"{cluster.replicas[0].admin}/admin/purge", json={"image": "alpine:3.19"}
        ) as resp:
            assert resp.status == 200, await resp.text()
        await asyncio.sleep(1.0)
        for r in cluster.replicas[1:]:
            got = await pull(http, r.url, "library/alpine", "3.19")
            assert new.top.digest in got, "a replica answered the purged tag from memory"
        # ... nor a purged layer from its hot tier: the next replica asked downloads it again
        # (the upstream still has it), which caches it anew for every replica after it.
        async with http.get(f"{cluster.replicas[1].url}/v2/library/alpine/blobs/{layer}") as resp:
            assert resp.status == 200
            assert resp.headers["X-Mirror-Cache"] == "miss", "a purged hot copy was served"


async def test_a_pin_on_one_replica_protects_the_image_from_anothers_eviction(
    hub: FakeHub, backend: Backend, tmp_path: Path
) -> None:
    pinned = big_image("pinned", 3 * MiB, seed=21)
    hub.add("team/pinned", "v1", pinned)
    others = [big_image(f"filler{n}", 3 * MiB, seed=30 + n) for n in range(4)]
    for n, image in enumerate(others):
        hub.add(f"team/filler{n}", "v1", image)
    secret = tmp_path / "secret"
    secret.write_text(secrets.token_hex(24))
    flags = ("--max-size", "10MiB")
    async with contextlib.AsyncExitStack() as stack:
        a, b = [
            await stack.enter_async_context(
                mirror_process(
                    tmp_path / f"r{i}", hub.registry_url, *backend.flags, *flags,
                    "--workers", "1", "--peer-listen", f"127.0.0.1:{free_port()}",
                    "--cluster-secret-file", str(secret), env=backend.env,
                )
            )
            for i in range(2)
        ]  # fmt: skip
        async with aiohttp.ClientSession() as http:
            await pull(http, a.url, "team/pinned", "v1")
            async with http.post(f"{a.admin}/admin/pin", json={"image": "team/pinned:v1"}) as r:
                assert r.status == 200, await r.text()
            for n in range(len(others)):
                await pull(http, b.url, f"team/filler{n}", "v1")
                await asyncio.sleep(0.3)
    index = await index_of(backend)
    try:
        indexed = await index.all_blobs()
    finally:
        await index.close()
    assert pinned.layers()[0].digest in indexed, "replica b evicted what replica a pinned"
    assert sum(indexed.values()) <= 10 * MiB + 3 * MiB


async def test_a_follower_serves_a_blob_only_under_a_repository_that_holds_it(
    hub: FakeHub, backend: Backend, tmp_path: Path
) -> None:
    """Replica A downloads a layer for the repository that has it; a client of replica B asks
    for the same digest under a repository that does not have it. B follows A's download
    only for clients of repositories confirmed to hold the blob: this one gets 404, not the
    bytes (a private layer must not leak by digest under a public name, across replicas
    either)."""
    image = big_image("owned", 32 * MiB, seed=13)
    hub.add("team/owner", "v1", image)
    hub.add("team/other", "v1", small_image("other"))
    layer = image.layers()[0]
    async with cluster_of(2, backend, hub, tmp_path) as cluster, aiohttp.ClientSession() as http:
        a, b = cluster.replicas
        hub.slow = 0.002
        owner = asyncio.create_task(_read_all(http, f"{a.url}/v2/team/owner/blobs/{layer.digest}"))
        while hub.cdn_bytes == 0:
            await asyncio.sleep(0.01)
        async with http.get(f"{b.url}/v2/team/other/blobs/{layer.digest}") as resp:
            assert resp.status == 404, resp.status
            assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
        assert await owner == layer.data
        # The owning repository's clients on B are served from A's stream or the bucket.
        assert await _read_all(http, f"{b.url}/v2/team/owner/blobs/{layer.digest}") == layer.data
