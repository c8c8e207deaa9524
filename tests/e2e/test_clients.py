"""Real pull clients through the mirror, from a token-authenticated upstream with a CDN.

Run inside a private network namespace (see README): a client whose mirror fails falls back
to the public registry, which there cannot be reached, so a pass proves the mirror served it.
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import StartMirror
from tests.fixtures.docs import snippet
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import Image, make_image, multiarch_image, random_bytes, small_image
from tests.fixtures.procs import (
    containerd,
    ctr_pull,
    dockerd,
    hosts_dir,
    mirror_process,
    need,
    run,
    skopeo_pull_and_verify,
)

pytestmark = [pytest.mark.e2e, pytest.mark.backends("local", "s3")]


@pytest.fixture
def images(hub: FakeHub) -> dict[str, Image]:
    """Single-arch Docker schema2 with layers, OCI index, Docker list, a big layer."""
    found = {
        "library/alpine:3.19": multiarch_image("alpine"),
        "library/busybox:1.36": small_image("busybox", docker=True, layers=3),
        "library/debian:12": multiarch_image("debian", docker=True),
        "team/big:v1": make_image([{"big.bin": random_bytes(20 << 20, 4)}, {"etc/x": b"x"}]),
    }
    for ref, image in found.items():
        name, tag = ref.split(":")
        hub.add(name, tag, image)
    return found


def served_from_mirror(hub: FakeHub, image: Image) -> None:
    """The upstream saw the pulls (through the mirror), and no credential went to the CDN."""
    assert hub.manifest_gets(), "the mirror never asked upstream: the client went elsewhere"
    assert hub.auth_violations == []
    for layer in image.layers():
        assert hub.blob_gets(layer.digest), f"layer {layer.digest} never fetched upstream"


async def test_skopeo_pulls_through_the_mirror(
    hub: FakeHub, images: dict[str, Image], start_mirror: StartMirror, tmp_path: Path
) -> None:
    need("skopeo")
    mirror = await start_mirror(hub.registry_url)
    host = f"127.0.0.1:{mirror.port}"
    for ref, image in images.items():
        out = tmp_path / ref.replace("/", "_").replace(":", "_")
        await skopeo_pull_and_verify(f"{host}/{ref}", out, image)
    served_from_mirror(hub, images["library/busybox:1.36"])


async def test_ctr_pulls_through_the_mirror_with_the_documented_hosts_toml(
    hub: FakeHub, images: dict[str, Image], start_mirror: StartMirror, tmp_path: Path
) -> None:
    mirror = await start_mirror(hub.registry_url)
    hosts = hosts_dir(
        tmp_path / "certs.d",
        "docker.io",
        snippet("containerd-hosts-docker-io", f"127.0.0.1:{mirror.port}"),
    )
    async with containerd() as ctd:
        for ref, image in images.items():
            listing = await ctr_pull(ctd, hosts, f"docker.io/{ref}", "--platform", "linux/amd64")
            assert image.digest in listing, listing
    served_from_mirror(hub, images["team/big:v1"])


async def test_dockerd_pulls_only_through_the_mirror_with_the_documented_daemon_json(
    hub: FakeHub, images: dict[str, Image], start_mirror: StartMirror
) -> None:
    mirror = await start_mirror(hub.registry_url)
    async with dockerd(snippet("docker-daemon-json", f"127.0.0.1:{mirror.port}")) as daemon:
        docker = ("docker", "-H", daemon.address)
        for ref in ("alpine:3.19", "busybox:1.36", "debian:12", "team/big:v1"):
            image = images[ref if "/" in ref else f"library/{ref}"]
            await run(*docker, "pull", ref)
            inspect = json.loads(await run(*docker, "image", "inspect", ref))
            repo = ref.split(":")[0]
            assert f"{repo}@{image.digest}" in inspect[0]["RepoDigests"], inspect[0]["RepoDigests"]
    served_from_mirror(hub, images["library/busybox:1.36"])


async def test_warm_pulls_through_a_mirror_process_use_the_hit_path(
    hub: FakeHub, images: dict[str, Image], tmp_path: Path
) -> None:
    """A real `mirror serve` (two workers, memory hit path): every client pulls twice."""
    async with mirror_process(tmp_path / "data", hub.registry_url) as mirror:
        host = mirror.url.removeprefix("http://")
        for attempt in ("cold", "warm"):
            for ref, image in images.items():
                out = tmp_path / attempt / ref.replace("/", "_").replace(":", "_")
                await skopeo_pull_and_verify(f"{host}/{ref}", out, image)
        hosts = hosts_dir(
            tmp_path / "certs.d", "docker.io", snippet("containerd-hosts-docker-io", host)
        )
        async with containerd() as ctd:
            for ref, image in images.items():
                ref = f"docker.io/{ref}"
                assert image.digest in await ctr_pull(ctd, hosts, ref, "--platform", "linux/amd64")
        async with aiohttp.ClientSession() as http, http.get(f"{mirror.url}/metrics") as resp:
            metrics = await resp.text()
    hits = [
        float(line.split()[-1]) for line in metrics.splitlines()
        if line.startswith("mirror_requests_total") and 'kind="manifest"' in line
        and 'result="hit"' in line
    ]  # fmt: skip
    assert sum(hits) >= len(images), metrics
