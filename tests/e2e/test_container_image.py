"""The Dockerfile, built and run by podman without a network.

Its base image, docker.io/library/python:3.11-slim, is stood in for by the tarball `.ci/run`
makes with mmdebstrap (Debian 12's python3 and pip, EXTERNALLY-MANAGED removed as in the
official image), imported under that name; pip in the build installs from the wheelhouse
`.ci/run` prepared, through the Dockerfile's PIP_* build arguments. The image then runs with the
host's (private, loopback-only) network and serves a pull from the fake hub.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest

from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import small_image
from tests.fixtures.offline import ROOT, prepared
from tests.fixtures.podman import Podman, podman
from tests.fixtures.procs import free_port, need, skopeo_pull_and_verify, wait_http

pytestmark = pytest.mark.e2e

BASE = "docker.io/library/python:3.11-slim"  # the Dockerfile's FROM
TAG = "localhost/mirror:test"


async def last_line(pdm: Podman, *args: str) -> str:
    """podman's answer, without the warnings it may print first (no systemd here)."""
    return (await pdm(*args)).strip().splitlines()[-1]


async def wait_for_files(root: Path, names: set[str], timeout: float = 30) -> dict[str, Path]:
    """The files under `root` with these names, once all exist (a blob is renamed into the
    cache just after its client's last byte)."""
    deadline = time.monotonic() + timeout
    while True:
        found = {p.name: p for p in root.rglob("*") if p.name in names}
        if set(found) == names or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.2)


async def test_dockerfile_builds_offline_and_its_image_serves_pulls_as_uid_10001(
    hub: FakeHub, tmp_path: Path
) -> None:
    base = prepared("MIRROR_TEST_BASE_IMAGE")
    wheelhouse = prepared("MIRROR_TEST_WHEELHOUSE")
    need("skopeo")
    image = small_image("alpine")
    hub.add("library/alpine", "3.19", image)
    async with podman() as pdm:
        await pdm("import", str(base), BASE)
        await pdm("build", "--pull=never", "--network=none", "--format=docker", "--layers=false",
                  "--volume", f"{wheelhouse}:/wheelhouse:ro", "--build-arg", "PIP_NO_INDEX=1",
                  "--build-arg", "PIP_FIND_LINKS=/wheelhouse", "--tag", TAG, str(ROOT),
                  timeout=900)  # fmt: skip
        history = await pdm("image", "history", "--no-trunc", "--format", "{{.CreatedBy}}", TAG)
        assert "PIP_" not in history and "/wheelhouse" not in history  # build stage only
        volumes = await last_line(
            pdm, "image", "inspect", "--format", "{{json .Config.Volumes}}", TAG
        )
        assert json.loads(volumes) == {"/var/lib/mirror": {}}
        check = await last_line(pdm, "image", "inspect", "--format", "{{json .HealthCheck}}", TAG)
        assert json.loads(check)["Test"][0] == "CMD"  # kept: built in docker format

        port = free_port()
        # podman's default limits (1048576 open files and processes) need CAP_SYS_RESOURCE,
        # which root lacks in some VMs (this CI's); the mirror needs far fewer.
        await pdm("run", "--detach", "--name", "mirror", "--network", "host",
                  "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096",
                  "--health-interval", "disable",  # no systemd timer; run below on demand
                  "--volume", "mirror-data:/var/lib/mirror", TAG,
                  "--listen", f"127.0.0.1:{port}", "--data", "/var/lib/mirror",
                  "--upstream", hub.registry_url)  # fmt: skip
        await wait_http(f"http://127.0.0.1:{port}/v2/", timeout=60)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/v2/") as resp,
        ):
            assert resp.status == 200
            assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        pid = await last_line(pdm, "inspect", "--format", "{{.State.Pid}}", "mirror")
        uids = Path(f"/proc/{pid}/status").read_text().split("\nUid:")[1].split()[:4]
        assert uids == ["10001"] * 4, "the mirror must run as uid 10001 (real, effective, saved)"

        await skopeo_pull_and_verify(f"127.0.0.1:{port}/library/alpine:3.19",
                                     tmp_path / "pulled", image)  # fmt: skip
        assert hub.manifest_gets(), "the pull did not go through the image's mirror"
        volume = Path(await last_line(pdm, "volume", "inspect", "--format", "{{.Mountpoint}}",
                                      "mirror-data"))  # fmt: skip
        blobs = {blob.digest.split(":")[1] for blob in image.blobs.values()}
        cached = await wait_for_files(volume, blobs)
        assert set(cached) == blobs, "the pulled blobs are not in the data volume"
        assert {p.stat().st_uid for p in cached.values()} == {10001}

        await pdm("healthcheck", "run", "mirror")  # exit status 0: healthy
