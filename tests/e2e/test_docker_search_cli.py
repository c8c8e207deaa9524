"""`docker search MIRROR/term` with the real Docker CLI and daemon: the daemon pings
`/v1/_ping` (any answer will do), asks `/v1/search?q=term&n=25` and prints what it decoded;
logged in to the mirror (`docker login MIRROR`), it sends that login with the search."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import small_image
from tests.fixtures.procs import dockerd, http_push, mirror_process, run
from tests.integration.test_client_auth import basic, write_htpasswd
from tests.integration.test_pull_path import pull

pytestmark = pytest.mark.e2e

ALICE = ("alice", "wonderland")


@dataclass(frozen=True)
class DockerCli:
    host: str  # the mirror's host:port, as typed before the search term
    daemon: str
    env: dict[str, str]

    async def __call__(self, *args: str) -> str:
        return await run("docker", "-H", self.daemon, *args, env=self.env)

    async def search(self, term: str, *options: str) -> list[str]:
        return (await self("search", *options, f"{self.host}/{term}")).splitlines()

    async def login(self) -> None:
        await self("login", "-u", ALICE[0], "-p", ALICE[1], self.host)


@asynccontextmanager
async def docker_and_mirror(
    hub: FakeHub, tmp_path: Path, *, anonymous_pull: bool
) -> AsyncIterator[DockerCli]:
    """A mirror with `alpine`, `busybox` and `team/alpine-tools` cached and `acme/alpine-app`
    pushed, its user alice, and a Docker daemon that has it in `insecure-registries`."""
    for name in ("library/alpine", "team/alpine-tools", "library/busybox"):
        hub.add(name, "v1", small_image(f"cli-{name}", docker=True))
    htpasswd = write_htpasswd(tmp_path, alice=ALICE[1])
    config = tmp_path / "mirror.toml"
    config.write_text(
        f'auth_htpasswd = "{htpasswd}"\n'
        f"anonymous_pull = {'true' if anonymous_pull else 'false'}\n"
        '[hosted."acme"]\npush = ["alice"]\n'
    )
    docker_config = tmp_path / "docker-config"  # no logins from the machine's own config
    docker_config.mkdir()
    async with mirror_process(tmp_path / "data", hub.registry_url, "--config", str(config)) as m:
        async with aiohttp.ClientSession(headers={"Authorization": basic(*ALICE)}) as http:
            for name in ("library/alpine", "team/alpine-tools", "library/busybox"):
                await pull(http, m.url, name, "v1")
        await http_push(m.url, "acme/alpine-app", "1", small_image("cli-acme"), ALICE)
        host = m.url.removeprefix("http://")
        daemon_json = json.dumps({"registry-mirrors": [m.url], "insecure-registries": [host]})
        async with dockerd(daemon_json) as daemon:
            yield DockerCli(
                host, daemon.address, {**os.environ, "DOCKER_CONFIG": str(docker_config)}
            )


async def test_docker_search_lists_hosted_and_cached_repositories(
    hub: FakeHub, tmp_path: Path
) -> None:
    async with docker_and_mirror(hub, tmp_path, anonymous_pull=True) as docker:
        table = await docker.search("alpine", "--no-trunc")
        listed = await docker.search("alpine", "--format", "{{.Name}}|{{.IsOfficial}}")
        limited = await docker.search("a", "--limit", "1", "--format", "{{.Name}}")
        # Hosted namespaces make the mirror ask for a login on /v2/, so pulls need one; the
        # name shown for an official image is one to pull it by through the mirror.
        await docker.login()
        await docker("pull", f"{docker.host}/alpine:v1")
    assert table[0].split()[:2] == ["NAME", "DESCRIPTION"], table
    assert [line.split()[0] for line in table[1:]] == [
        "acme/alpine-app",
        "alpine",
        "team/alpine-tools",
    ], table
    assert "[OK]" in table[2], table
    assert listed == ["acme/alpine-app|", "alpine|[OK]", "team/alpine-tools|"]
    assert limited == ["acme/alpine-app"]


async def test_docker_search_of_a_users_only_mirror_needs_docker_login(
    hub: FakeHub, tmp_path: Path
) -> None:
    async with docker_and_mirror(hub, tmp_path, anonymous_pull=False) as docker:
        with pytest.raises(AssertionError, match="401"):
            await docker.search("alpine")
        await docker.login()
        found = await docker.search("alpine", "--format", "{{.Name}}")
    assert found == ["acme/alpine-app", "alpine", "team/alpine-tools"]
