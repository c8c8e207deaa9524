"""A full disk (a 12 MiB tmpfs under a 1 GiB cap): no crash, no partial file kept, /healthz and
the metrics say so while /readyz stays 200 (hits still work), and clients still get verified
bytes: the download under way is relayed to its client from memory, later misses are streamed
from upstream, neither is cached."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import StartAdmin, StartMirror
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import make_image, random_bytes
from tests.integration.test_pull_path import ALL_TYPES, get, mirror_url

MiB = 1 << 20


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            raise RuntimeError("CI runs as root: the disk-full test mounts a tmpfs")
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_disk_full_while_caching(
    hub: FakeHub,
    start_mirror: StartMirror,
    start_admin: StartAdmin,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    image = make_image([{"big.bin": random_bytes(20 * MiB, 13)}])
    layer = image.layers()[0]
    hub.add("team/big", "v1", image)
    with small_filesystem(tmp_path / "small", "12m") as disk:
        data = disk / "data"
        server = await start_mirror(hub.registry_url, data=data, max_size=1 << 30)
        base = mirror_url(server)
        status, _, _ = await get(http, f"{base}/v2/team/big/manifests/v1", Accept=ALL_TYPES)
        assert status == 200
        url = f"{base}/v2/team/big/blobs/{layer.digest}"
        # The download that hits ENOSPC goes on: its client gets every byte, relayed from memory.
        hub.slow = 0.001  # three clients share the download as the disk fills up
        answers = await asyncio.gather(*(get(http, url) for _ in range(3)))
        hub.slow = 0
        for status, _, body in answers:
            assert status == 200 and hashlib.sha256(body).hexdigest() == layer.digest[7:]
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 200  # degraded, not unready: Kubernetes keeps sending hits
        async with http.get(f"{base}/healthz") as resp:
            assert resp.status == 200 and "degraded: disk full" in await resp.text()
        async with http.get(f"{base}/metrics") as resp:
            assert "\nmirror_disk_full 1.0\n" in await resp.text()
        assert "disk full (No space left on device): degraded" in caplog.text
        assert [p for p in (data / "tmp").iterdir() if p.suffix != ".claim"] == []
        assert not any(layer.digest[7:] in p.name for p in (data / "blobs").rglob("*"))
        # The client's retry is streamed from upstream, verified, not cached.
        status, _, body = await get(http, url)
        assert status == 200 and hashlib.sha256(body).hexdigest() == layer.digest[7:]
        assert not any(layer.digest[7:] in p.name for p in (data / "blobs").rglob("*"))
        status, _, _ = await get(http, f"{base}/v2/", Accept=ALL_TYPES)
        assert status == 200  # still serving
