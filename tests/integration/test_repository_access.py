"""Blobs are stored once by digest but served per repository: a repository gets a cached blob
(or a download in flight) only when it is known to hold it. One user's private layers never
come back to another client under a public name, and a shared layer still crosses the
internet once."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import StartMirror
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import (
    OCI_LAYER,
    OCI_MANIFEST,
    Blob,
    Image,
    big_image,
    make_image,
    small_image,
)
from tests.fixtures.procs import mirror_process, need, run, skopeo_pull_and_verify
from tests.integration.test_pull_path import ALL_TYPES, mirror_url, pull

ALICE = ("hubuser", "hubpass")  # the fake hub's account: alice's own Docker Hub login
ALICE_AUTH = {"Authorization": "Basic " + base64.b64encode(b"hubuser:hubpass").decode()}

pytestmark = pytest.mark.backends("local", "s3")


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


def naming_with_urls(blob: Blob, label: str) -> Image:
    """A public image whose manifest also names `blob` as a foreign layer (with `urls`): a
    registry accepts that without holding the blob in the repository."""
    own = small_image(label, layers=1)
    doc = json.loads(own.top.data)
    doc["layers"].append(
        {"mediaType": OCI_LAYER, "digest": blob.digest, "size": len(blob.data),
         "urls": ["https://example.com/layer.tar.gz"]}
    )  # fmt: skip
    top = Blob(OCI_MANIFEST, json.dumps(doc).encode())
    return Image(top=top, manifests={top.digest: top}, blobs=own.blobs)


async def test_a_foreign_layer_descriptor_proves_nothing_about_a_repository(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    """eve's public manifest names alice's private layer with `urls` (distribution accepts such
    a manifest without the blob): under eve's name the cached layer is not served."""
    secret = small_image("alice-urls")
    layer = secret.layers()[0]
    hub.add("acme/secret", "v1", secret, private=True)
    hub.add("eve/pub", "v1", eve := naming_with_urls(layer, "eve-urls"))
    base = mirror_url(await start_mirror(hub.registry_url, private="passthrough",
                                         username=ALICE[0], password=ALICE[1]))  # fmt: skip
    async with http.get(f"{base}/v2/acme/secret/blobs/{layer.digest}", headers=ALICE_AUTH) as resp:
        assert resp.status == 200 and await resp.read() == layer.data  # now cached
    async with http.get(
        f"{base}/v2/eve/pub/manifests/v1", headers={"Accept": OCI_MANIFEST}
    ) as resp:
        assert resp.status == 200 and await resp.read() == eve.top.data
    async with http.get(f"{base}/v2/eve/pub/blobs/{layer.digest}") as resp:
        assert resp.status == 404 and layer.data not in await resp.read()
    # asked upstream, as eve/pub, which does not hold it
    assert hub.requests("registry", "HEAD", f"/v2/eve/pub/blobs/{layer.digest}")


async def test_a_download_refused_for_another_repository_does_not_fail_a_holder(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    """A client asks for team/app's layer under library/alpine (which does not hold it) and
    starts a download that upstream will refuse; team/app's own client joins meanwhile and
    still gets its layer: it downloads it as team/app once the other is refused."""
    busy = big_image("busy-slot", 2 << 20, seed=45)
    app = small_image("holder-app")
    hub.add("team/busy", "v1", busy)
    hub.add("team/app", "v1", app)
    hub.add("library/alpine", "3.19", small_image("not-a-holder"))
    base = mirror_url(await start_mirror(hub.registry_url, max_upstream_fetches=1))
    layer = app.layers()[0]
    async with http.get(f"{base}/v2/team/app/manifests/v1", headers={"Accept": OCI_MANIFEST}):
        pass  # team/app's cached manifest names the layer
    hub.slow = 0.02  # the only download slot is busy for a while
    busy_blob = f"{base}/v2/team/busy/blobs/{busy.layers()[0].digest}"
    holder = asyncio.create_task(http.get(busy_blob))
    await asyncio.sleep(0.3)

    async def fetch(repository: str) -> tuple[int, bytes]:
        async with http.get(f"{base}/v2/{repository}/blobs/{layer.digest}") as resp:
            return resp.status, await resp.read()

    other = asyncio.create_task(fetch("library/alpine"))  # queued, as library/alpine
    await asyncio.sleep(0.2)
    own = asyncio.create_task(fetch("team/app"))  # joins it
    assert (await other)[0] == 404
    assert await own == (200, layer.data)
    (await holder).release()
