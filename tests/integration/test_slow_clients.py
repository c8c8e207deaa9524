"""Slow and idle clients cost the mirror almost nothing, and a dribbled request head is cut off."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from mirror import hitpath
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import small_image
from tests.fixtures.procs import memory_mib, mirror_process
from tests.integration.test_pull_path import ALL_TYPES

SLOW = 300


async def test_hundreds_of_slowloris_clients_keep_memory_flat(hub: FakeHub, tmp_path):
    image = small_image("slowloris")
    hub.add("library/alpine", "3.19", image)
    async with mirror_process(tmp_path / "data", hub.registry_url) as mirror:
        url = f"{mirror.url}/v2/library/alpine/manifests/3.19"
        async with aiohttp.ClientSession() as http, http.get(url, headers={"Accept": ALL_TYPES}):
            pass
        before = memory_mib(mirror.proc.pid)
        host, port = mirror.url.removeprefix("http://").split(":")
        writers = []
        for _ in range(SLOW):
            _reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /v2/library/alpine/manifests/3.19 HTTP/1.1\r\nHost: m\r\nX-Slow: ")
            writers.append(writer)
        await asyncio.sleep(1)
        for writer in writers:
            writer.write(b"a" * 100)  # still dribbling
        await asyncio.sleep(0.5)
        after = memory_mib(mirror.proc.pid)
        # Meanwhile everyone else is served at once.
        async with (
            aiohttp.ClientSession() as http,
            http.get(url, headers={"Accept": ALL_TYPES}) as resp,
        ):
            assert resp.status == 200
        for writer in writers:
            writer.close()
    print(f"RSS {before:.1f} -> {after:.1f} MiB with {SLOW} slow clients")
    assert after - before < 20, f"RSS grew {after - before:.1f} MiB for {SLOW} slow clients"


class _Transport:
    def __init__(self) -> None:
        self.closed = False

    def get_extra_info(self, _name: str) -> Any:
        return ("127.0.0.1", 1)

    def close(self) -> None:
        self.closed = True


class _Inner:
    def __getattr__(self, _name: str) -> Any:
        return lambda *args: None


async def test_a_request_head_that_never_ends_is_cut_off(monkeypatch):
    monkeypatch.setattr(hitpath, "HEAD_TIMEOUT", 0.05)
    transport = _Transport()
    protocol = hitpath.HitPathProtocol(_Inner(), answers=None)  # type: ignore[arg-type]
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(b"GET /v2/ HTTP/1.1\r\nHost: m\r\n")
    await asyncio.sleep(0.02)
    assert not transport.closed
    await asyncio.sleep(0.1)
    assert transport.closed
