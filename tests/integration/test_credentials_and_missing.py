"""Upstream credentials go only where they belong; what does not exist is remembered briefly."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import REGISTRY

from mirror.config import RegistryConfig
from tests.conftest import StartAdmin, StartMirror
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import small_image
from tests.integration.test_pull_path import ALL_TYPES, get, mirror_url, pull

CREDS = {"username": "hubuser", "password": "hubpass"}


def withheld() -> float:
    return (
        REGISTRY.get_sample_value("mirror_credentials_withheld_total", {"registry": "docker.io"})
        or 0.0
    )


def credentialed(hub: FakeHub) -> list[object]:
    return [r for r in hub.requests("token") if "Authorization" in r.headers]


async def test_a_foreign_realm_never_receives_the_credentials(
    hub: FakeHub,
    start_mirror: StartMirror,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The registry is reached as `localhost`; its challenge names a realm on 127.0.0.1."""
    hub.add("library/alpine", "3.19", small_image("public"))
    hub.add("acme/secret", "v1", small_image("secret"), private=True)
    registry = hub.registry_url.replace("127.0.0.1", "localhost")
    before = withheld()
    caplog.set_level(logging.WARNING, logger="mirror")
    base = mirror_url(await start_mirror(registry, **CREDS))
    await pull(http, base, "library/alpine", "3.19")  # anonymous is enough for public content
    status, _, body = await get(http, f"{base}/v2/acme/secret/manifests/v1", Accept=ALL_TYPES)
    assert status == 401 and json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    assert hub.requests("token"), "the foreign realm was asked (anonymously)"
    assert credentialed(hub) == []
    assert not [r for r in hub.log if "Authorization" in r.headers and r.server != "registry"]
    assert withheld() > before
    assert "token_realms" in caplog.text and "hubpass" not in caplog.text


async def test_the_registrys_own_realm_and_listed_realms_receive_the_credentials(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # Credentials raise the rate limit on public content; private content stays private (below).
    hub.add("acme/public", "v1", image := small_image("public2"))
    same_host = mirror_url(await start_mirror(hub.registry_url, data=tmp_path / "a", **CREDS))
    assert image.digest in await pull(http, same_host, "acme/public", "v1")
    assert credentialed(hub)
    hub.reset_log()
    listed = mirror_url(
        await start_mirror(
            hub.registry_url.replace("127.0.0.1", "localhost"),
            data=tmp_path / "b",
            token_realms=("127.0.0.1",),
            **CREDS,
        )
    )
    assert image.digest in await pull(http, listed, "acme/public", "v1")
    assert credentialed(hub)


async def test_fifty_concurrent_pulls_of_a_missing_tag_cost_one_upstream_request(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    hub.add("library/alpine", "3.19", small_image("present"))
    base = mirror_url(await start_mirror(hub.registry_url))
    url = f"{base}/v2/library/alpine/manifests/nope"
    answers = await asyncio.gather(*(get(http, url, Accept=ALL_TYPES) for _ in range(50)))
    for status, _, body in answers:
        assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    for _ in range(10):  # a later burst within the negative TTL: still nothing upstream
        assert (await get(http, url, Accept=ALL_TYPES))[0] == 404
    assert len(hub.requests(contains="/manifests/nope")) == 1


async def test_a_missing_tag_is_asked_again_after_the_negative_ttl(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    hub.add("library/alpine", "3.19", small_image("later"))
    ttl = 2.0  # long enough for two requests on a loaded CI machine
    base = mirror_url(await start_mirror(hub.registry_url, negative_ttl=ttl))
    url = f"{base}/v2/library/alpine/manifests/soon"
    asked = time.monotonic()
    assert (await get(http, url, Accept=ALL_TYPES))[0] == 404
    remembered = time.monotonic()
    hub.add("library/alpine", "soon", image := small_image("soon"))
    assert (await get(http, url, Accept=ALL_TYPES))[0] == 404  # remembered
    assert time.monotonic() - asked < ttl  # else the 404 above proved nothing
    await asyncio.sleep(remembered + ttl + 0.1 - time.monotonic())
    status, headers, _ = await get(http, url, Accept=ALL_TYPES)
    assert status == 200 and headers["Docker-Content-Digest"] == image.digest


async def test_a_repository_docker_hub_refuses_is_remembered_like_a_404(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    """Docker Hub answers 401 for a missing (or private) repository even with a fresh token.
    A typo'd name pulled five times costs the upstream one exchange, not five."""
    hub.add("library/alpine", "3.19", small_image("typo"))
    ttl = 2.0  # long enough for five requests on a loaded CI machine
    base = mirror_url(await start_mirror(hub.registry_url, negative_ttl=ttl))
    url = f"{base}/v2/library/alpnie/manifests/latest"
    asked = time.monotonic()
    for n in range(5):
        async with http.head(url, headers={"Accept": ALL_TYPES}) as resp:
            assert resp.status == 401
        if n == 0:
            remembered = time.monotonic()
    assert time.monotonic() - asked < ttl  # else the four hits above proved nothing
    registry, tokens = hub.requests("registry"), hub.requests("token")
    assert len([r for r in registry if "/alpnie/" in r.path]) == 2  # the 401, again after a token
    assert len(tokens) == 2
    await asyncio.sleep(remembered + ttl + 0.1 - time.monotonic())  # for negative_ttl only
    async with http.head(url, headers={"Accept": ALL_TYPES}) as resp:
        assert resp.status == 401
    assert len([r for r in hub.requests("registry") if "/alpnie/" in r.path]) == 4


async def test_errors_other_than_404_are_never_remembered(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    hub.add("library/alpine", "3.19", image := small_image("flaky"))
    base = mirror_url(await start_mirror(hub.registry_url))
    url = f"{base}/v2/library/alpine/manifests/3.19"
    hub.fail_statuses = [500, 500, 500]
    assert (await get(http, url, Accept=ALL_TYPES))[0] == 503
    hub.fail_statuses = [429]
    assert (await get(http, url, Accept=ALL_TYPES))[0] == 429
    status, headers, _ = await get(http, url, Accept=ALL_TYPES)
    assert status == 200 and headers["Docker-Content-Digest"] == image.digest


async def test_a_missing_blob_is_remembered_too(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    hub.add("library/alpine", "3.19", small_image("blobs"))
    base = mirror_url(await start_mirror(hub.registry_url))
    url = f"{base}/v2/library/alpine/blobs/sha256:{'1' * 64}"
    for _ in range(5):
        status, _, body = await get(http, url)
        assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert len(hub.requests("registry", "GET", "/blobs/")) == 1


async def test_passthrough_serves_private_content_to_clients_with_the_right_credentials(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image = small_image("passthrough")
    hub.add("acme/secret", "v1", image, private=True)
    hub.add("library/alpine", "3.19", public := small_image("public3"))
    base = mirror_url(await start_mirror(hub.registry_url, private="passthrough", **CREDS))
    url = f"{base}/v2/acme/secret/manifests/v1"
    right = "Basic " + base64.b64encode(b"hubuser:hubpass").decode()
    wrong = "Basic " + base64.b64encode(b"hubuser:nope").decode()
    # Docker and skopeo learn at /v2/ that credentials are welcome.
    async with http.get(f"{base}/v2/") as ping:
        assert ping.status == 401 and ping.headers["WWW-Authenticate"].startswith("Basic")
    async with http.get(f"{base}/v2/", headers={"Authorization": right}) as ping:
        assert ping.status == 200
    for headers in ({"Accept": ALL_TYPES}, {"Accept": ALL_TYPES, "Authorization": wrong}):
        async with http.get(url, headers=headers) as resp:
            assert resp.status == 401 and "Basic" in resp.headers["WWW-Authenticate"]
            assert image.top.data not in await resp.read()
    async with http.get(url, headers={"Accept": ALL_TYPES, "Authorization": right}) as resp:
        assert resp.status == 200 and await resp.read() == image.top.data
    layer = image.layers()[0]
    async with http.get(
        f"{base}/v2/acme/secret/blobs/{layer.digest}", headers={"Authorization": right}
    ) as resp:
        assert await resp.read() == layer.data
    # The verdict is remembered, keyed by a hash: one more request asks upstream nothing new.
    token_calls = len(hub.requests("token"))
    async with http.get(url, headers={"Accept": ALL_TYPES, "Authorization": right}) as resp:
        assert resp.status == 200
    assert len(hub.requests("token")) == token_calls
    # Public content needs no credentials.
    assert public.digest in await pull(http, base, "library/alpine", "3.19")


async def test_catalog_lists_exactly_the_cached_repositories_paginated(
    hub: FakeHub, start_mirror: StartMirror, start_admin: StartAdmin, http: aiohttp.ClientSession
) -> None:
    for name in ("library/alpine", "team/app", "acme/zeta"):
        hub.add(name, "v1", small_image(name))
    hub.add("acme/secret", "v1", small_image("catalog-secret"), private=True)
    ghcr = RegistryConfig("ghcr.io", hub.registry_url, tag_ttl=300)
    server = await start_mirror(hub.registry_url, registries=(ghcr,), **CREDS)
    base = mirror_url(server)
    async with http.get(f"{base}/v2/_catalog") as resp:
        assert resp.status == 200 and await resp.json() == {"repositories": []}
    for name in ("library/alpine", "team/app", "acme/zeta", "ghcr.io/team/app"):
        await pull(http, base, name, "v1")
    admin = str((await start_admin(server)).make_url("")).rstrip("/")
    async with http.post(f"{admin}/admin/pin", json={"image": "acme/secret:v1"}) as resp:
        assert resp.status == 200  # cached by the operator, private: never listed
    expected = ["acme/zeta", "ghcr.io/team/app", "library/alpine", "team/app"]
    async with http.get(f"{base}/v2/_catalog") as resp:
        assert (await resp.json())["repositories"] == expected
        assert "Link" not in resp.headers
    pages, url = [], f"{base}/v2/_catalog?n=3"
    while url:
        async with http.get(url) as resp:
            pages.append((await resp.json())["repositories"])
            link = resp.headers.get("Link")
        url = base + link.split(";")[0].strip("<>") if link else ""
    assert pages == [expected[:3], expected[3:]]
    async with http.get(f"{base}/v2/_catalog?n=2&last=ghcr.io/team/app") as resp:
        assert (await resp.json())["repositories"] == ["library/alpine", "team/app"]
    async with http.get(f"{base}/v2/_catalog?n=x") as resp:
        assert resp.status == 400
