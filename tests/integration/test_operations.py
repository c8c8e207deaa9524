"""Operating a real mirror process: kill -9 and restart, prefetch, and the CLI's output."""

from __future__ import annotations

import hashlib
import json
import signal
import sys
from pathlib import Path

import aiohttp

from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import big_image, multiarch_image
from tests.fixtures.procs import downloads_settled, mirror_process, run
from tests.integration.test_pull_path import ALL_TYPES, pull

MiB = 1 << 20


async def mirror_cli(*args: str) -> str:
    return await run(sys.executable, "-m", "mirror", *args, timeout=120)


def files_on_disk(data: Path) -> dict[str, bytes]:
    return {f"sha256:{p.name}": p.read_bytes() for p in (data / "blobs").rglob("*") if p.is_file()}


async def test_kill_9_mid_download_then_restart_leaves_a_consistent_cache(
    hub: FakeHub, tmp_path: Path
) -> None:
    small = multiarch_image("before-crash")
    big = big_image("crash", 48 * MiB, seed=31)
    hub.add("library/alpine", "3.19", small)
    hub.add("team/crash", "v1", big)
    data = tmp_path / "data"
    layer = big.layers()[0]
    async with aiohttp.ClientSession() as http:
        async with mirror_process(data, hub.registry_url) as mirror:
            await pull(http, mirror.url, "library/alpine", "3.19")
            hub.slow = 0.003
            resp = await http.get(f"{mirror.url}/v2/team/crash/blobs/{layer.digest}")
            await resp.content.readexactly(8 * MiB)
            mirror.proc.send_signal(signal.SIGKILL)
            await mirror.proc.wait()
            resp.close()
            assert list((data / "tmp").iterdir()), "the crash left no partial download to clean"
        hub.slow = 0
        async with mirror_process(data, hub.registry_url) as mirror:
            assert "1 incomplete download(s) removed" in mirror.logs()
            assert list((data / "tmp").iterdir()) == []
            on_disk = files_on_disk(data)
            for digest, content in on_disk.items():
                assert hashlib.sha256(content).hexdigest() == digest[7:], f"{digest} is corrupt"
            stats = json.loads(await mirror_cli("stats", "--json", "--admin", mirror.admin))
            assert stats["blobs"] == len(on_disk)
            assert stats["disk_bytes"] == sum(len(c) for c in on_disk.values())
            got = await pull(http, mirror.url, "team/crash", "v1")
            assert got[layer.digest] == layer.data
            assert await pull(http, mirror.url, "library/alpine", "3.19")


async def test_prefetch_with_a_platform_filter_then_pulls_are_local(
    hub: FakeHub, tmp_path: Path
) -> None:
    image = multiarch_image("prefetch")
    hub.add("library/alpine", "3.19", image)
    arm, amd = image.platform_manifest("arm64"), image.platform_manifest("amd64")
    async with mirror_process(tmp_path / "data", hub.registry_url) as mirror:
        out = await mirror_cli(
            "prefetch", "--server", mirror.url, "--platform", "linux/arm64", "alpine:3.19"
        )
        assert "alpine:3.19 [##############################]" in out
        assert "fetched" in out and "already cached 0 B" in out
        assert not any(hub.blob_gets(b.digest) for b in image.layers("amd64"))
        await downloads_settled(mirror)
        hub.reset_log()
        async with aiohttp.ClientSession() as http:
            for digest in [arm.digest, *(b.digest for b in image.layers("arm64"))]:
                kind = "manifests" if digest == arm.digest else "blobs"
                async with http.get(
                    f"{mirror.url}/v2/library/alpine/{kind}/{digest}", headers={"Accept": ALL_TYPES}
                ) as resp:
                    assert resp.status == 200 and resp.headers["X-Mirror-Cache"] == "hit"
        assert hub.blob_gets() == [] and hub.manifest_gets() == []
        again = await mirror_cli("prefetch", "--server", mirror.url, "--platform", "linux/arm64",
                                 "alpine:3.19")  # fmt: skip
        assert "fetched 0 B" in again
        assert amd.digest not in again


async def test_cli_lists_pins_reports_and_purges(hub: FakeHub, tmp_path: Path) -> None:
    hub.add("library/alpine", "3.19", multiarch_image("cli"))
    data = tmp_path / "data"
    images = tmp_path / "images.txt"
    images.write_text("# release base images\nalpine:3.19\n")
    async with mirror_process(data, hub.registry_url) as mirror:
        await mirror_cli("prefetch", "--server", mirror.url, "-f", str(images))
        table = await mirror_cli("ls", "--data", str(data))
        assert table.splitlines()[0].split() == [
            "IMAGE",
            "DIGEST",
            "SIZE",
            "LAST",
            "USED",
            "PINNED",
        ]
        assert "docker.io/library/alpine:3.19" in table
        pinned = await mirror_cli("pin", "alpine:3.19", "--admin", mirror.admin)
        assert "pinned" in pinned
        [entry] = json.loads(await mirror_cli("ls", "--json", "--data", str(data)))
        assert entry["repository"] == "library/alpine" and entry["pinned"] and entry["size"] > 0
        stats = await mirror_cli("stats", "--admin", mirror.admin)
        assert "disk" in stats and "bandwidth saved" in stats
        assert "unpinned" in await mirror_cli("unpin", "alpine:3.19", "--admin", mirror.admin)
        purged = json.loads(
            await mirror_cli("purge", "alpine:3.19", "--json", "--admin", mirror.admin)
        )
        assert purged["removed_blobs"] >= 5
        assert json.loads(await mirror_cli("ls", "--json", "--data", str(data))) == []
