"""Docker Hub counts manifest GETs against the pull limit and HEADs not: a real client pulling
alias tags through the mirror costs HEADs, plus one GET per manifest digest the mirror has not
cached for that repository, and never a GET by tag."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import StartMirror
from tests.fixtures.docs import snippet
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import multiarch_image
from tests.fixtures.procs import containerd, ctr_pull, hosts_dir

pytestmark = pytest.mark.e2e

ALIASES = ("3.19", "3", "latest")


async def test_ctr_pulling_alias_tags_costs_heads_and_one_get_per_digest(
    hub: FakeHub, start_mirror: StartMirror, tmp_path: Path
) -> None:
    image = multiarch_image("aliases")
    for tag in ALIASES:
        hub.add("library/alpine", tag, image)
    mirror = await start_mirror(hub.registry_url)
    hosts = hosts_dir(
        tmp_path / "certs.d",
        "docker.io",
        snippet("containerd-hosts-docker-io", f"127.0.0.1:{mirror.port}"),
    )
    async with containerd() as ctd:
        for tag in ALIASES:
            ref = f"docker.io/library/alpine:{tag}"
            assert image.digest in await ctr_pull(ctd, hosts, ref, "--platform", "linux/amd64")
    gets = [r.path.rsplit("/", 1)[1] for r in hub.manifest_gets()]
    heads = [r.path.rsplit("/", 1)[1] for r in hub.requests("registry", "HEAD", "/manifests/")]
    # Every tag resolved with a HEAD; the index and the amd64 image fetched once, by digest.
    assert sorted(heads) == sorted(ALIASES), heads
    assert sorted(gets) == sorted([image.digest, image.platform_manifest("amd64").digest]), gets
