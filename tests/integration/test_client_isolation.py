"""Whose connection gets the bytes: a client that leaves, stalls or half-closes in the middle of
a cached blob never makes the mirror write that blob into someone else's connection, and a
crowd of stalled readers never holds up anyone else's request.

Real `mirror serve` processes with uvloop, as in production: the defects these guard against
lived in how cached blobs reach the socket (a thread once sent them by a bare fd number that
the loop could close and hand to the next accepted connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from pathlib import Path

import aiohttp
import pytest

from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import big_image, small_image
from tests.fixtures.procs import (
    Service,
    downloads_settled,
    make_tls_files,
    memory_mib,
    mirror_process,
)
from tests.fixtures.stalled import hit_latencies, p99, request, stalled_readers, tiny_socket

MiB = 1 << 20
ROUNDS = 10
BYSTANDERS = 3

pytestmark = pytest.mark.backends("local", "s3")


def _address(mirror: Service) -> tuple[str, int]:
    host, port = mirror.url.removeprefix("http://").split(":")
    return host, int(port)


async def _warm(mirror: Service, path: str) -> bytes:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as http,
        http.get(mirror.url + path) as resp,
    ):
        assert resp.status == 200
        body = await resp.read()
    await downloads_settled(mirror)
    return body


def _drain(sock: socket.socket, seconds: float) -> bytes:
    """Everything a connection that sent nothing receives within `seconds`."""
    sock.settimeout(0.05)
    got = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        got += chunk
    return got


async def _leaked_into_bystanders(address: tuple[str, int], leave: str, path: str) -> bytes:
    """One client asks for the blob and leaves (`reset`: RST; `half-close`: FIN, then stops
    reading); fresh connections open right after, send nothing and must receive nothing."""
    client = tiny_socket(address)
    client.sendall(request(path))
    client.recv(512)  # the head has been sent: the body transfer is under way
    await asyncio.sleep(0.2)  # ... and stuck on the full socket buffers
    if leave == "reset":
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
    else:
        client.shutdown(socket.SHUT_WR)
    bystanders = [socket.create_connection(address) for _ in range(BYSTANDERS)]
    await asyncio.sleep(0.3)
    if leave != "reset":
        client.close()
    received = b"".join(
        await asyncio.gather(*(asyncio.to_thread(_drain, b, 1.0) for b in bystanders))
    )
    for b in bystanders:
        b.close()
    return received


async def test_a_leaving_client_never_gets_its_blob_written_into_another_connection(
    hub: FakeHub, tmp_path: Path
) -> None:
    image = big_image("isolation", 64 * MiB, seed=41)
    hub.add("team/app", "v1", image)
    path = f"/v2/team/app/blobs/{image.layers()[0].digest}"
    async with mirror_process(tmp_path / "data", hub.registry_url, "--workers", "1") as mirror:
        await _warm(mirror, path)
        address = _address(mirror)
        for n in range(ROUNDS):
            for leave in ("reset", "half-close"):
                leaked = await _leaked_into_bystanders(address, leave, path)
                assert len(leaked) == 0, f"round {n} ({leave}): bystanders got {len(leaked)} bytes"
        # The mirror still serves whole, correct blobs afterwards.
        assert await _warm(mirror, path) == image.layers()[0].data


STALLED = 300
SAMPLES = 200
HIT_DEADLINE = 5.0  # seconds: frozen hits used to wait for the 120 s stall timeout


async def test_stalled_readers_leave_other_clients_hits_and_misses_served(
    hub: FakeHub, tmp_path: Path
) -> None:
    """300 clients that ask for a cached 64 MiB layer and never read hold nothing the others
    need (once they held the pool threads that sent blobs, and every hit on the worker waited
    for them): beside them every hit is answered whole within seconds, and a miss (fsync,
    rename) completes. How much the hits' p99 moves is a figure of `bench/stalled`."""
    big = big_image("stalled", 64 * MiB, seed=42)
    small = small_image("bystander")
    late = small_image("late-miss")
    hub.add("team/big", "v1", big)
    hub.add("team/small", "v1", small)
    hub.add("team/late", "v1", late)
    big_path = f"/v2/team/big/blobs/{big.layers()[0].digest}"
    small_path = f"/v2/team/small/blobs/{small.layers()[0].digest}"
    async with mirror_process(tmp_path / "data", hub.registry_url, "--workers", "2") as mirror:
        await _warm(mirror, big_path)
        await _warm(mirror, small_path)
        manifest_url = f"{mirror.url}/v2/team/small/manifests/{small.digest}"
        await hit_latencies(mirror.url + small_path, manifest_url, 2)  # the manifest is cached
        stalled = await stalled_readers(_address(mirror), big_path, STALLED)
        await asyncio.sleep(1.0)  # every one of them is now blocked on a full socket buffer
        during = await hit_latencies(
            mirror.url + small_path, manifest_url, SAMPLES, timeout=HIT_DEADLINE
        )
        started = time.perf_counter()
        async with (
            aiohttp.ClientSession(auto_decompress=False) as http,
            http.get(
                f"{mirror.url}/v2/team/late/blobs/{late.layers()[0].digest}",
                timeout=aiohttp.ClientTimeout(total=20),
            ) as resp,
        ):
            assert resp.status == 200
            assert await resp.read() == late.layers()[0].data
        miss = time.perf_counter() - started
        for sock in stalled:
            with contextlib.suppress(OSError):
                sock.close()
    print(
        f"beside {STALLED} stalled readers: hit p99 {p99(during) * 1000:.2f} ms, "
        f"slowest {max(during) * 1000:.0f} ms; a miss {miss * 1000:.0f} ms"
    )


TLS_STALLED = 200


async def test_stalled_readers_over_tls_hold_little_memory(hub: FakeHub, tmp_path: Path) -> None:
    """Over TLS the body goes through the transport, not sendfile: a client that stops reading
    must make it push back early instead of letting the TLS layer buffer half a megabyte."""
    big = big_image("stalled-tls", 64 * MiB, seed=43)
    hub.add("team/big", "v1", big)
    path = f"/v2/team/big/blobs/{big.layers()[0].digest}"
    files = await make_tls_files(tmp_path / "tls")
    tls = ("--tls-cert", str(files.cert), "--tls-key", str(files.key))
    async with mirror_process(
        tmp_path / "data", hub.registry_url, "--workers", "2", *tls
    ) as mirror:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as http,
            http.get(mirror.url + path) as resp,
        ):
            assert resp.status == 200
            await resp.read()
        await downloads_settled(mirror)
        before = memory_mib(mirror.proc.pid)
        context = ssl.create_default_context(cafile=files.ca)
        host, port = mirror.url.removeprefix("https://").split(":")
        stalled = []
        for _ in range(TLS_STALLED):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            _, writer = await asyncio.open_connection(
                sock=sock, ssl=context, server_hostname="127.0.0.1", limit=1 << 16
            )
            writer.write(request(path))
            stalled.append(writer)
        await asyncio.sleep(2)
        grown = memory_mib(mirror.proc.pid) - before
        for writer in stalled:
            writer.transport.abort()
    print(f"{TLS_STALLED} stalled TLS readers: +{grown:.0f} MiB")
    assert grown < TLS_STALLED * 0.75, f"+{grown:.0f} MiB for {TLS_STALLED} stalled TLS readers"
