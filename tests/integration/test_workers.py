"""`--workers 2`: one mirror in several processes behaves as one mirror.

Each client below opens its own connection, so the kernel (SO_REUSEPORT) spreads them over
both workers; with 16 connections the chance that one worker got them all is 2^-15.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import big_image
from tests.fixtures.procs import downloads_settled, mirror_process, wait_http, worker_pids
from tests.integration.test_pull_path import ALL_TYPES

MiB = 1 << 20
CLIENTS = 16


async def fetch_each_on_its_own_connection(url: str, n: int, **headers: str) -> list[bytes]:
    async def one() -> bytes:
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.get(url, headers=headers) as resp,
        ):
            assert resp.status == 200, await resp.text()
            return await resp.read()

    return list(await asyncio.gather(*(one() for _ in range(n))))


def metric_total(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}(?:{{(.*)}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


async def test_clients_on_different_workers_share_one_upstream_download(
    hub: FakeHub, tmp_path: Path
) -> None:
    """16 clients, each on its own connection, spread over two workers by the kernel
    (SO_REUSEPORT), ask for one blob during its download: one upstream transfer, and both
    workers serve some of them. The kernel, not the mirror, spreads connections: if it put
    all 16 on one worker, the round proves nothing about workers and another blob is tried
    (at most three)."""
    hub.slow = 0.01  # a download of about 1 s: every client arrives during it
    async with mirror_process(tmp_path / "data", hub.registry_url, "--workers", "2") as mirror:
        for attempt in range(3):
            image = big_image(f"workers{attempt}", 6 * MiB, seed=5 + attempt)
            hub.add(f"team/app{attempt}", "v1", image)
            layer = image.layers()[0]
            before = blob_requests_by_process(tmp_path / "data" / "metrics")
            metrics_before = await _scrape(mirror.url)
            bodies = await fetch_each_on_its_own_connection(
                f"{mirror.url}/v2/team/app{attempt}/blobs/{layer.digest}", CLIENTS
            )
            assert all(body == layer.data for body in bodies)
            assert len(hub.blob_gets(layer.digest)) == 1, "workers downloaded it separately"
            # A blob request is counted when its handler returns, maybe just after the client
            # read its last byte: poll briefly.
            for _ in range(100):
                metrics = await _scrape(mirror.url)
                done = metric_total(metrics, "mirror_requests_total", kind="blob")
                if done - metric_total(metrics_before, "mirror_requests_total", kind="blob") >= (
                    CLIENTS
                ):
                    break
                await asyncio.sleep(0.02)
            after = blob_requests_by_process(tmp_path / "data" / "metrics")
            per_worker = {
                pid: count - before.get(pid, 0.0)
                for pid, count in after.items()
                if count - before.get(pid, 0.0)
            }
            if len(per_worker) == 2:
                break

    # Every worker's counters are in the one scrape: 16 blob requests, 15 of them coalesced.
    def delta(name: str, **labels: str) -> float:
        return metric_total(metrics, name, **labels) - metric_total(metrics_before, name, **labels)

    assert delta("mirror_requests_total", kind="blob") == CLIENTS
    assert delta("mirror_coalesced_requests_total") == CLIENTS - 1
    assert delta("mirror_served_bytes_total") == CLIENTS * len(layer.data)
    # ... and both workers served some of them: one downloaded, the other followed.
    assert len(per_worker) == 2 and all(per_worker.values()), per_worker
    assert sum(per_worker.values()) == CLIENTS


async def _scrape(base: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as r:
        return await r.text()


def blob_requests_by_process(metrics_dir: Path) -> dict[int, float]:
    """Blob requests each worker process counted, from its own multiprocess files."""
    found: dict[int, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.removeprefix("counter_"))
        with tempfile.TemporaryDirectory() as alone:
            shutil.copy(path, alone)
            registry = CollectorRegistry()
            # prometheus_client leaves this constructor unannotated (as in mirror/metrics.py)
            MultiProcessCollector(registry, alone)  # type: ignore[no-untyped-call]
            total = sum(
                sample.value
                for metric in registry.collect() if metric.name == "mirror_requests"
                for sample in metric.samples
                if sample.name == "mirror_requests_total" and sample.labels["kind"] == "blob"
            )  # fmt: skip
        if total:
            found[pid] = total
    return found


async def test_a_purge_empties_every_workers_memory(hub: FakeHub, tmp_path: Path) -> None:
    image = big_image("purged", 1 * MiB, seed=6)
    hub.add("team/gone", "v1", image)
    async with mirror_process(tmp_path / "data", hub.registry_url, "--workers", "2") as mirror:
        url = f"{mirror.url}/v2/team/gone/manifests/{image.digest}"
        # Both workers now hold the manifest in memory.
        await fetch_each_on_its_own_connection(url, CLIENTS, Accept=ALL_TYPES)
        hub.down = True
        await fetch_each_on_its_own_connection(url, CLIENTS, Accept=ALL_TYPES)  # memory hits
        async with aiohttp.ClientSession() as session:
            purge = await session.post(
                f"{mirror.admin}/admin/purge", json={"image": f"team/gone@{image.digest}"}
            )
            assert purge.status == 200, await purge.text()

            async def status() -> int:
                async with (
                    aiohttp.ClientSession() as own,
                    own.get(url, headers={"Accept": ALL_TYPES}) as resp,
                ):
                    return resp.status

            statuses = await asyncio.gather(*(status() for _ in range(CLIENTS)))
        assert 200 not in statuses, f"a worker served a purged manifest from memory: {statuses}"


def partial_downloads(data: Path) -> list[Path]:
    """Temp files of downloads under way (`<algorithm>-<hex>.<random>`; not claims, not locks)."""
    return [p for p in (data / "tmp").iterdir() if p.suffix not in (".claim", ".lock")]


def holder_of(path: Path, pids: list[int]) -> int:
    """The process among `pids` that has `path` open."""
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == str(path):
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no worker has {path} open")


async def test_a_killed_workers_partial_download_is_swept_and_the_cache_still_works(
    hub: FakeHub, tmp_path: Path
) -> None:
    image = big_image("swept", 16 * MiB, seed=7)
    hub.add("team/app", "v1", image)
    layer = image.layers()[0]
    data = tmp_path / "data"
    hub.slow = 0.01  # about 2.5 s of download: the worker dies in the middle of it
    async with (
        mirror_process(data, hub.registry_url, "--workers", "2") as mirror,
        aiohttp.ClientSession() as http,
    ):
        url = f"{mirror.url}/v2/team/app/blobs/{layer.digest}"
        resp = await http.get(url)
        await resp.content.readexactly(MiB)
        [partial] = partial_downloads(data)
        os.kill(holder_of(partial, list(worker_pids(mirror.proc.pid).values())), signal.SIGKILL)
        resp.close()
        deadline = time.monotonic() + 10
        while partial_downloads(data) or list((data / "tmp").glob("*.claim")):
            assert time.monotonic() < deadline, f"still in tmp/: {os.listdir(data / 'tmp')}"
            await asyncio.sleep(0.05)
        assert "left 1 partial download(s)" in mirror.logs()
        hub.slow = 0
        bodies = await fetch_each_on_its_own_connection(url, 4)
        assert all(body == layer.data for body in bodies)
        await wait_http(f"{mirror.admin}/healthz")  # back once worker 0 is, if it was the one
        await downloads_settled(mirror)
        assert partial_downloads(data) == []
