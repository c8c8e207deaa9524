"""The mirror in front of a real distribution 2.8 registry, images pushed with skopeo."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.conftest import StartMirror
from tests.fixtures.images import big_image, multiarch_image, small_image
from tests.fixtures.procs import docker_registry, need, push, skopeo_pull_and_verify

pytestmark = pytest.mark.integration


async def test_images_pushed_to_distribution_pull_through_the_mirror(
    start_mirror: StartMirror, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    need("skopeo", "docker-registry")
    images = {
        "library/alpine:3.19": multiarch_image("real-alpine"),
        "team/layers:v2": small_image("real-layers", docker=True, layers=4),
        "team/large:v1": big_image("real-large", 40 << 20, seed=8),
    }
    async with docker_registry(tmp_path / "registry") as registry:
        for ref, image in images.items():
            await push(registry, ref, image, tmp_path / "layouts")
        mirror = await start_mirror(registry.url, tag_ttl=0)
        mhost = f"127.0.0.1:{mirror.port}"
        for ref, image in images.items():
            out = tmp_path / "out" / ref.replace("/", "_").replace(":", "_")
            await skopeo_pull_and_verify(f"{mhost}/{ref}", out, image)
        # distribution's own 404s come back as the spec says
        async with http.get(f"http://{mhost}/v2/library/alpine/manifests/nope") as resp:
            assert resp.status == 404
            assert (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        async with http.get(f"http://{mhost}/v2/nobody/here/manifests/v1") as resp:
            assert resp.status == 404
        # the registry stops: everything pulled stays pullable
    for ref, image in images.items():
        async with http.get(f"http://{mhost}/v2/{ref.replace(':', '/manifests/')}") as resp:
            assert resp.status == 200 and resp.headers["Docker-Content-Digest"] == image.digest
