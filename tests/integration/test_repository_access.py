"""Blobs are stored once by digest but served per repository: a repository gets a cached blob
(or a download in flight) only when it is known to hold it. One user's private layers never
come back to another client under a public name, and a shared layer still crosses the
internet once."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import StartMirror
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import big_image, make_image, small_image
from tests.fixtures.procs import mirror_process, need, run, skopeo_pull_and_verify
from tests.integration.test_pull_path import ALL_TYPES, mirror_url, pull

ALICE = ("hubuser", "hubpass")  # the fake hub's account: alice's own Docker Hub login
ALICE_AUTH = {"Authorization": "Basic " + base64.b64encode(b"hubuser:hubpass").decode()}


async def test_a_private_layer_is_not_served_by_digest_under_a_public_name(
    hub: FakeHub, tmp_path: Path
) -> None:
    """Passthrough: alice pulls her private image with skopeo; an anonymous client then asks
    for its layers, config and manifest under `library/alpine` and gets nothing."""
    need("skopeo")
    secret = small_image("alice-secret")
    public = small_image("public-alpine")
    hub.add("acme/secret", "v1", secret, private=True)
    hub.add("library/alpine", "3.19", public)
    config = tmp_path / "mirror.toml"
    config.write_text('[registries."docker.io"]\nprivate = "passthrough"\n')
    password = tmp_path / "password"
    password.write_text(hub.password)
    async with mirror_process(tmp_path / "data", hub.registry_url, "--workers", "1",
                              "--config", str(config), "--upstream-username", hub.username,
                              "--upstream-password-file", str(password)) as mirror:  # fmt: skip
        host = mirror.url.removeprefix("http://")
        await skopeo_pull_and_verify(
            f"{host}/acme/secret:v1", tmp_path / "alice", secret, creds=":".join(ALICE)
        )
        base = f"{mirror.url}/v2/library/alpine"
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            for blob in secret.blobs.values():
                for method in ("GET", "HEAD"):
                    async with http.request(method, f"{base}/blobs/{blob.digest}") as resp:
                        body = await resp.read()
                        assert resp.status == 404, (method, blob.digest)
                        assert blob.data not in body
                async with http.get(f"{base}/blobs/{blob.digest}") as resp:
                    assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
            async with http.get(
                f"{base}/manifests/{secret.digest}", headers={"Accept": ALL_TYPES}
            ) as resp:
                assert resp.status == 404 and secret.top.data not in await resp.read()
            page = f"{mirror.url}/image/docker.io/library/alpine@{secret.digest}"
            async with http.get(page) as resp:
                text = await resp.text()
                assert resp.status == 404
                assert all(b.digest not in text for b in secret.blobs.values())
            # alice herself still gets them, under her repository.
            layer = secret.layers()[0]
            async with http.get(
                f"{mirror.url}/v2/acme/secret/blobs/{layer.digest}", headers=ALICE_AUTH
            ) as resp:
                assert resp.status == 200 and await resp.read() == layer.data
        # A real anonymous client asking for the private manifest under the public name fails.
        with pytest.raises(AssertionError, match="exited"):
            await run("skopeo", "--insecure-policy", "inspect", "--raw", "--tls-verify=false",
                      f"docker://{host}/library/alpine@{secret.digest}")  # fmt: skip


async def test_a_download_in_flight_is_not_joined_under_another_repository(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    secret = big_image("in-flight-secret", 4 << 20, seed=44)
    hub.add("acme/secret", "v1", secret, private=True)
    hub.add("library/alpine", "3.19", small_image("alpine-flight"))
    hub.slow = 0.02  # the private layer takes over a second to download
    base = mirror_url(await start_mirror(hub.registry_url, private="passthrough",
                                         username=ALICE[0], password=ALICE[1]))  # fmt: skip
    layer = secret.layers()[0]

    async def alice() -> bytes:
        async with http.get(
            f"{base}/v2/acme/secret/blobs/{layer.digest}", headers=ALICE_AUTH
        ) as resp:
            assert resp.status == 200
            return await resp.read()

    download = asyncio.create_task(alice())
    await asyncio.sleep(0.3)  # alice's download is under way
    async with http.get(f"{base}/v2/library/alpine/blobs/{layer.digest}") as resp:
        assert resp.status == 404
        assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert await download == layer.data
    assert len(hub.blob_gets(layer.digest)) == 1


async def test_a_shared_layer_crosses_the_internet_once_and_is_served_to_each_holder(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    base_layer = {"usr/lib/libshared.so": b"shared library\n" * 4000}
    first = make_image([base_layer, {"app/one": b"one\n"}], label="one")
    second = make_image([base_layer, {"app/two": b"two\n"}], label="two")
    shared = first.layers()[0]
    assert shared.digest == second.layers()[0].digest
    hub.add("team/one", "v1", first)
    hub.add("team/two", "v1", second)
    hub.add("team/other", "v1", small_image("other"))  # does not hold the shared layer
    hub.add("team/raw", None, first)  # holds it, but the client never asks for a manifest
    base = mirror_url(await start_mirror(hub.registry_url))
    await pull(http, base, "team/one", "v1")
    await pull(http, base, "team/two", "v1")  # its cached manifest names the layer: no question
    assert len(hub.blob_gets(shared.digest)) == 1
    assert hub.requests("registry", "HEAD", "/blobs/") == []
    async with http.get(f"{base}/v2/team/other/blobs/{shared.digest}") as resp:
        assert resp.status == 404  # the upstream, asked with a HEAD as team/other, says no
    async with http.get(f"{base}/v2/team/raw/blobs/{shared.digest}") as resp:
        assert resp.status == 200 and await resp.read() == shared.data  # a HEAD said yes
    async with http.get(f"{base}/v2/team/raw/blobs/{shared.digest}") as resp:
        assert resp.status == 200  # remembered: no second question
    heads = [r.path for r in hub.requests("registry", "HEAD", "/blobs/")]
    assert heads == [
        f"/v2/team/other/blobs/{shared.digest}",
        f"/v2/team/raw/blobs/{shared.digest}",
    ]
    assert len(hub.blob_gets(shared.digest)) == 1
