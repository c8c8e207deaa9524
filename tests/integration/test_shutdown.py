"""SIGTERM: stop taking connections, let transfers in flight finish, exit 0."""

from __future__ import annotations

import asyncio
import hashlib
import signal
from pathlib import Path

import aiohttp

from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import big_image
from tests.fixtures.procs import mirror_process

MiB = 1 << 20


async def test_sigterm_lets_a_download_in_flight_finish_then_exits_0(
    hub: FakeHub, tmp_path: Path
) -> None:
    image = big_image("term", 8 * MiB, seed=9)
    hub.add("team/app", "v1", image)
    layer = image.layers()[0]
    hub.slow = 0.01  # about 1.3 s of download
    async with mirror_process(tmp_path / "data", hub.registry_url) as mirror:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{mirror.url}/v2/team/app/blobs/{layer.digest}") as resp,
        ):
            first = await resp.content.readexactly(MiB)
            mirror.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            # New connections are refused once the listener closed...
            try:
                async with aiohttp.ClientSession() as other:
                    await other.get(f"{mirror.url}/v2/", timeout=aiohttp.ClientTimeout(2))
                refused = False
            except aiohttp.ClientError:
                refused = True
            rest = await resp.read()  # ...while this transfer completes
        assert refused
        assert hashlib.sha256(first + rest).hexdigest() == layer.digest[7:]
        assert await asyncio.wait_for(mirror.proc.wait(), 30) == 0
    assert "shutting down" in mirror.logs()
