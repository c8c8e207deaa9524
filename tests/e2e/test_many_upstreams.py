"""Two upstreams behind one mirror: a token-auth "Docker Hub" and a real distribution registry
with Basic auth standing in for quay.io. Routed by containerd's `ns` and by a host prefix."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY

from mirror.config import RegistryConfig
from tests.conftest import StartMirror
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import Image, make_image, random_bytes
from tests.fixtures.procs import (
    containerd,
    ctr_pull,
    docker_registry,
    push,
    skopeo_pull_and_verify,
    write_hosts_toml,
)
from tests.integration.test_pull_path import ALL_TYPES, get, mirror_url

pytestmark = pytest.mark.e2e

CREDS = ("quayuser", "quaypass")
SHARED = {"shared/base.bin": random_bytes(3 << 20, 99)}

# The mirror in front of both, the hub's image and quay's (sharing a layer).
TwoUpstreams = tuple[TestServer, Image, Image]


@pytest.fixture
async def two_upstreams(
    hub: FakeHub, tmp_path: Path, start_mirror: StartMirror
) -> AsyncIterator[TwoUpstreams]:
    hub_image = make_image([SHARED, {"etc/hub": b"hub"}], label="hub")
    quay_image = make_image([SHARED, {"etc/quay": b"quay"}], label="quay", docker=True)
    hub.add("library/alpine", "3.19", hub_image)
    async with docker_registry(tmp_path / "quay", basic_auth=CREDS) as quay:
        await push(quay, "team/app:v1", quay_image, tmp_path / "layouts", auth=CREDS)
        # Nothing on this registry is public: clients bring the credentials (passthrough).
        quay_config = RegistryConfig(
            "quay.io", quay.url, CREDS[0], CREDS[1], tag_ttl=300, private="passthrough"
        )
        mirror = await start_mirror(hub.registry_url, registries=(quay_config,))
        yield mirror, hub_image, quay_image


async def test_ctr_pulls_from_two_registries_through_one_mirror(
    two_upstreams: TwoUpstreams, hub: FakeHub, tmp_path: Path
) -> None:
    mirror, hub_image, quay_image = two_upstreams
    assert mirror.port is not None  # a started TestServer has its port
    hosts = tmp_path / "certs.d"
    for registry in ("docker.io", "quay.io"):
        write_hosts_toml(hosts, registry, mirror.port)
    async with containerd() as ctd:
        for ref, image in (
            ("quay.io/team/app:v1", quay_image),
            ("docker.io/library/alpine:3.19", hub_image),
        ):
            assert image.digest in await ctr_pull(ctd, hosts, ref, "--user", ":".join(CREDS))
    shared = hub_image.layers()[0].digest
    assert shared == quay_image.layers()[0].digest
    assert hub.blob_gets(shared) == [], "a layer already fetched from quay.io was fetched again"
    assert hub.blob_gets(hub_image.layers()[1].digest), "the hub's own layer came from the hub"


async def test_skopeo_pulls_both_registries_by_prefix(
    two_upstreams: TwoUpstreams, hub: FakeHub, tmp_path: Path
) -> None:
    mirror, hub_image, quay_image = two_upstreams
    host = f"127.0.0.1:{mirror.port}"
    await skopeo_pull_and_verify(
        f"{host}/quay.io/team/app:v1", tmp_path / "q", quay_image, creds=":".join(CREDS)
    )
    await skopeo_pull_and_verify(f"{host}/docker.io/library/alpine:3.19", tmp_path / "h", hub_image)
    await skopeo_pull_and_verify(f"{host}/library/alpine:3.19", tmp_path / "h2", hub_image)
    assert hub.blob_gets(hub_image.layers()[0].digest) == []


async def test_an_unconfigured_registry_is_refused_without_going_out(
    two_upstreams: TwoUpstreams, hub: FakeHub, http: aiohttp.ClientSession
) -> None:
    mirror, _, _ = two_upstreams
    base = mirror_url(mirror)
    before = {m.name: sum(s.value for s in m.samples) for m in REGISTRY.collect()}
    for path in ("/v2/team/app/manifests/v1?ns=ghcr.io", "/v2/ghcr.io/team/app/manifests/v1",
                 "/v2/evil.example:443/x/blobs/sha256:" + "a" * 64):  # fmt: skip
        status, _, body = await get(http, base + path, Accept=ALL_TYPES)
        error = json.loads(body)["errors"][0]
        assert status == 404 and error["code"] == "NAME_UNKNOWN"
        assert '[registries."' in error["message"]
    after = {m.name: sum(s.value for s in m.samples) for m in REGISTRY.collect()}
    assert after.get("mirror_upstream_requests") == before.get("mirror_upstream_requests")
    assert hub.log == []
