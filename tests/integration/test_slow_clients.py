"""Slow and idle clients cost the mirror almost nothing, and a dribbled request head is cut off."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from mirror import hitpath
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import small_image
from tests.fixtures.procs import memory_mib, mirror_process
from tests.integration.test_pull_path import ALL_TYPES

SLOW = 300


async def test_hundreds_of_slowloris_clients_keep_memory_flat_and_are_cut_off(
    hub: FakeHub, tmp_path: Path
) -> None:
    """300 clients dribbling request heads cost about 1.5 MiB (README), everyone else is served
    meanwhile, and every one of them is disconnected once its head has taken 30 s."""
    image = small_image("slowloris")
    hub.add("library/alpine", "3.19", image)
    async with mirror_process(tmp_path / "data", hub.registry_url, "--workers", "2") as mirror:
        url = f"{mirror.url}/v2/library/alpine/manifests/3.19"
        for _ in range(32):  # on fresh connections: every worker has served (and allocated)
            async with (
                aiohttp.ClientSession() as http,
                http.get(url, headers={"Accept": ALL_TYPES}) as resp,
            ):
                assert resp.status == 200
        await asyncio.sleep(0.5)
        before = memory_mib(mirror.proc.pid)
        host, port = mirror.url.removeprefix("http://").split(":")
        clients = []
        started = time.monotonic()
        for _ in range(SLOW):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /v2/library/alpine/manifests/3.19 HTTP/1.1\r\nHost: m\r\nX-Slow: ")
            clients.append((reader, writer))
        await asyncio.sleep(1)
        for _, writer in clients:
            writer.write(b"a" * 100)  # still dribbling
        await asyncio.sleep(0.5)
        after = memory_mib(mirror.proc.pid)
        # Meanwhile everyone else is served at once.
        async with (
            aiohttp.ClientSession() as http,
            http.get(url, headers={"Accept": ALL_TYPES}) as resp,
        ):
            assert resp.status == 200
        # Not cut off early: a slow head has HEAD_TIMEOUT seconds.
        assert not any(reader.at_eof() for reader, _ in clients)
        await asyncio.sleep(hitpath.HEAD_TIMEOUT - (time.monotonic() - started) - 3)
        for _, writer in clients:
            writer.write(b"b")
        assert not any(reader.at_eof() for reader, _ in clients)
        ends = await asyncio.gather(
            *(asyncio.wait_for(reader.read(), timeout=8) for reader, _ in clients)
        )
        cut_after = time.monotonic() - started
        for _, writer in clients:
            writer.close()
    print(f"RSS {before:.1f} -> {after:.1f} MiB with {SLOW} slow clients; cut at {cut_after:.1f} s")
    assert after - before < 3, f"RSS grew {after - before:.1f} MiB for {SLOW} slow clients"
    assert ends == [b""] * SLOW, "a dribbled head got an answer instead of being cut off"
    assert hitpath.HEAD_TIMEOUT <= cut_after < hitpath.HEAD_TIMEOUT + 6
