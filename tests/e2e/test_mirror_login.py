"""`auth_htpasswd` with `anonymous_pull` and the Docker daemon: dockerd answers a mirror's
challenge with the user's Docker Hub login and, refused, skips the mirror for Docker Hub. So a
mirror that lets anonymous clients pull never challenges, and takes a login it does not know
for an anonymous client: a developer logged in to Docker Hub still pulls through the mirror."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from tests.fixtures.docs import snippet
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import small_image
from tests.fixtures.procs import dockerd, mirror_process, run
from tests.integration.test_client_auth import write_htpasswd

pytestmark = pytest.mark.e2e


async def test_dockerd_logged_in_to_docker_hub_pulls_through_an_anonymous_pull_mirror(
    hub: FakeHub, tmp_path: Path
) -> None:
    image = small_image("logged-in", docker=True)
    hub.add("library/busybox", "1.36", image)
    htpasswd = write_htpasswd(tmp_path, alice="wonderland")
    config = tmp_path / "docker-config"
    config.mkdir()
    login = base64.b64encode(b"developer:docker-hub-password").decode()
    (config / "config.json").write_text(
        json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": login}}})
    )
    async with mirror_process(
        tmp_path / "data", hub.registry_url, "--auth-htpasswd", str(htpasswd), "--anonymous-pull"
    ) as mirror:
        daemon_json = snippet("docker-daemon-json", mirror.url.removeprefix("http://"))
        async with dockerd(daemon_json) as daemon:
            env = {**os.environ, "DOCKER_CONFIG": str(config)}
            await run("docker", "-H", daemon.address, "pull", "busybox:1.36", env=env)
            inspect = json.loads(
                await run("docker", "-H", daemon.address, "image", "inspect", "busybox:1.36")
            )
    assert f"busybox@{image.digest}" in inspect[0]["RepoDigests"]
    assert hub.manifest_gets(), "the pull did not go through the mirror"
