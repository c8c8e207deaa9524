"""Review reproductions for cluster mode (issue #17): what breaks when replicas queue, freeze
or are spoken to by something that is not a replica.

Each test states the behaviour the issue promises; a failing one is a defect found in review.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.fixtures.backends import Backend
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import big_image, small_image
from tests.fixtures.procs import Service, free_port, mirror_process

pytestmark = [pytest.mark.integration, pytest.mark.backends("s3")]
MiB = 1 << 20


@contextlib.asynccontextmanager
async def replicas(
    n: int, backend: Backend, hub: FakeHub, work: Path, secret: str, *extra: str
) -> AsyncIterator[list[tuple[Service, str]]]:
    """`n` replica processes on the test's bucket and database: each with its peer URL."""
    secret_file = work / "cluster-secret"
    secret_file.write_text(secret)
    async with contextlib.AsyncExitStack() as stack:
        started = []
        for i in range(n):
            peer = f"127.0.0.1:{free_port()}"
            service = await stack.enter_async_context(
                mirror_process(
                    work / f"replica{i}", hub.registry_url, *backend.flags, "--workers", "1",
                    "--peer-listen", peer, "--cluster-secret-file", str(secret_file), *extra,
                    env=backend.env,
                )
            )  # fmt: skip
            started.append((service, f"http://{peer}"))
        yield started


async def read_all(http: aiohttp.ClientSession, url: str) -> bytes:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def raw_status(peer: str, request: bytes) -> int:
    """The status code a raw HTTP/1.1 request gets (headers aiohttp's client will not send)."""
    host, port = peer.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    return int(line.split()[1])


async def test_the_peer_endpoint_refuses_strangers_and_serves_replicas_like_a_registry(
    hub: FakeHub, backend: Backend, tmp_path: Path
) -> None:
    """What held: no secret or a wrong one is 401, a malformed or traversing digest 400, a
    blob it does not have 404; with the secret, HEAD gives the size without a body and a Range
    gives 206 from the offset."""
    image = small_image("peer")
    hub.add("team/peer", "v1", image)
    layer = image.layers()[0]
    secret = secrets.token_hex(24)
    async with replicas(1, backend, hub, tmp_path, secret) as started:
        (service, peer), = started  # fmt: skip
        async with aiohttp.ClientSession() as http:
            assert await read_all(http, f"{service.url}/v2/team/peer/blobs/{layer.digest}")
            url = f"{peer}/peer/blobs/{layer.digest}"
            good = {"Authorization": f"Bearer {secret}"}
            async with http.get(url) as resp:
                assert resp.status == 401
            async with http.get(url, headers={"Authorization": f"Bearer {secret[:-1]}x"}) as resp:
                assert resp.status == 401
            async with http.get(f"{peer}/peer/blobs/sha256:..%2F..%2Fetc", headers=good) as resp:
                assert resp.status == 400
            missing = "sha256:" + "0" * 64
            async with http.get(f"{peer}/peer/blobs/{missing}", headers=good) as resp:
                assert resp.status == 404
            async with http.head(url, headers=good) as resp:
                assert resp.status == 200
                assert resp.content_length == len(layer.data)
                assert await resp.read() == b""
            async with http.get(url, headers={**good, "Range": "bytes=10-"}) as resp:
                assert resp.status == 206
                assert await resp.read() == layer.data[10:]
        assert secret not in service.logs(), "the cluster secret was logged"


async def test_a_peer_request_with_a_non_utf8_authorization_header_is_401_not_500(
    hub: FakeHub, backend: Backend, tmp_path: Path
) -> None:
    """Anything that reaches the peer port may send any bytes: a header aiohttp decoded with
    surrogateescape must be refused like any wrong secret, not crash the handler."""
    secret = secrets.token_hex(24)
    async with replicas(1, backend, hub, tmp_path, secret) as started:
        (_service, peer), = started  # fmt: skip
        digest = "sha256:" + "0" * 64
        status = await raw_status(
            peer,
            f"GET /peer/blobs/{digest} HTTP/1.1\r\nHost: peer\r\nConnection: close\r\n".encode()
            + b"Authorization: Bearer \xff\xfe\r\n\r\n",
        )
    assert status == 401, status


async def test_a_download_queued_for_an_upstream_slot_is_not_repeated_after_the_claimant_stored_it(
    hub: FakeHub, backend: Backend, tmp_path: Path
) -> None:
    """Replica B's only upstream slot is busy; its client asks for a blob replica A is
    downloading right now. B must follow A (a peer stream needs no upstream slot), or at
    least find A's stored copy once its slot frees: the upstream sends the blob once."""
    busy = big_image("busy", 48 * MiB, seed=41)
    wanted = big_image("wanted", 4 * MiB, seed=42)
    hub.add("team/busy", "v1", busy)
    hub.add("team/wanted", "v1", wanted)
    slow_layer, layer = busy.layers()[0], wanted.layers()[0]
    secret = secrets.token_hex(24)
    async with replicas(
        2, backend, hub, tmp_path, secret, "--max-upstream-fetches", "1"
    ) as started:
        (a, _), (b, _) = started
        async with aiohttp.ClientSession() as http:
            hub.slow = 0.01
            hub.reset_log()
            occupy = asyncio.create_task(
                read_all(http, f"{b.url}/v2/team/busy/blobs/{slow_layer.digest}")
            )
            while not hub.blob_gets(slow_layer.digest):
                await asyncio.sleep(0.01)
            on_a = asyncio.create_task(
                read_all(http, f"{a.url}/v2/team/wanted/blobs/{layer.digest}")
            )
            while not hub.blob_gets(layer.digest):
                await asyncio.sleep(0.01)
            on_b = asyncio.create_task(
                read_all(http, f"{b.url}/v2/team/wanted/blobs/{layer.digest}")
            )
            assert await on_a == layer.data
            assert await on_b == layer.data
            assert await occupy == slow_layer.data
    assert len(hub.blob_gets(layer.digest)) == 1, [r.path for r in hub.blob_gets(layer.digest)]


async def test_a_claimant_frozen_past_the_stale_time_is_not_doubled_when_it_resumes(
    hub: FakeHub, backend: Backend, tmp_path: Path
) -> None:
    """A claimant that stops heartbeating for a few seconds while alive (a frozen VM, a long
    pause, a database blip) loses its claim to the next replica that asks, and then resumes
    its own download: two claimants, each downloading the whole layer. Every client must get
    verified bytes, and the upstream must not send the layer twice (the issue's bound for a
    takeover is 1.5x the layer)."""
    image = big_image("frozen", 48 * MiB, seed=43)
    hub.add("team/frozen", "v1", image)
    layer = image.layers()[0]
    secret = secrets.token_hex(24)
    async with replicas(3, backend, hub, tmp_path, secret) as started:
        (a, _), (b, _), (c, _) = started
        url = f"/v2/team/frozen/blobs/{layer.digest}"
        async with aiohttp.ClientSession() as http:
            hub.slow = 0.01
            hub.reset_log()
            hub.cdn_bytes = 0
            on_a = asyncio.create_task(read_all(http, a.url + url))
            while hub.cdn_bytes < 0.1 * len(layer.data):
                await asyncio.sleep(0.01)
            on_b = asyncio.create_task(read_all(http, b.url + url))  # follows A's stream
            await asyncio.sleep(0.5)
            a.proc.send_signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(5.0)  # past claims.STALE (3.5 s)
                on_c = asyncio.create_task(read_all(http, c.url + url))
                await asyncio.sleep(1.0)
            finally:
                a.proc.send_signal(signal.SIGCONT)
            bodies = await asyncio.gather(on_a, on_b, on_c)
    assert all(body == layer.data for body in bodies)
    assert hub.cdn_bytes <= 1.5 * len(layer.data), (
        f"the upstream sent {hub.cdn_bytes / len(layer.data):.2f}x the layer"
    )
