"""`GET /v2/<name>/referrers/<digest>`: an OCI index always, from the upstream's referrers API,
else from the referrers tag schema, else empty."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.conftest import StartMirror
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import (
    OCI_INDEX,
    Image,
    make_artifact,
    referrers_tag_index,
    small_image,
)
from tests.fixtures.procs import docker_registry, http_push, need, push, run
from tests.integration.test_pull_path import get, mirror_url

SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"


def signed(label: str) -> tuple[Image, Image, Image]:
    """An image, a signature and an SBOM of it."""
    image = small_image(label)
    sig = make_artifact(image, SIGNATURE, b"signature " + label.encode(), {"who": "ci"})
    sbom = make_artifact(image, SBOM, b'{"spdxVersion": "SPDX-2.3"}')
    return image, sig, sbom


def tag_of(digest: str) -> str:
    return digest.replace(":", "-")


async def referrers(
    http: aiohttp.ClientSession, base: str, name: str, digest: str, query: str = ""
) -> tuple[CIMultiDict[str], list[dict[str, Any]]]:
    status, headers, body = await get(http, f"{base}/v2/{name}/referrers/{digest}{query}")
    assert status == 200, body
    assert headers["Content-Type"] == OCI_INDEX
    index = json.loads(body)
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    manifests: list[dict[str, Any]] = index["manifests"]
    return headers, manifests


async def test_referrers_of_the_upstream_api_are_listed_and_filtered(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image, sig, sbom = signed("api")
    hub.add("team/app", "v1", image)
    hub.add("team/app", None, sig)
    hub.add("team/app", None, sbom)
    hub.referrers_api = True
    base = mirror_url(await start_mirror(hub.registry_url))
    headers, found = await referrers(http, base, "team/app", image.digest)
    assert {d["digest"]: d["artifactType"] for d in found} == {
        sig.digest: SIGNATURE,
        sbom.digest: SBOM,
    }
    assert next(d for d in found if d["digest"] == sig.digest)["annotations"] == {"who": "ci"}
    assert "OCI-Filters-Applied" not in headers and headers["X-Mirror-Cache"] == "miss"
    for query in (f"?artifactType={quote(SBOM, safe='')}", f"?artifactType={SBOM}"):
        headers, found = await referrers(http, base, "team/app", image.digest, query)
        assert [d["digest"] for d in found] == [sbom.digest], query  # `+` encoded or not
        assert headers["OCI-Filters-Applied"] == "artifactType"
        assert headers["X-Mirror-Cache"] == "hit"
    # the upstream was asked once, unfiltered: one entry serves every filter
    asked = hub.requests(contains="/referrers/")
    assert len(asked) == 1 and "artifactType" not in asked[0].query
    assert asked[0].headers["Accept"] == OCI_INDEX


async def test_fresh_referrers_cost_no_upstream_request_and_concurrent_ones_cost_one(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image, sig, _ = signed("fresh")
    hub.add("team/app", "v1", image)
    hub.add("team/app", None, sig)
    hub.referrers_api = True
    base = mirror_url(await start_mirror(hub.registry_url))
    answers = await asyncio.gather(
        *(referrers(http, base, "team/app", image.digest) for _ in range(10))
    )
    assert all([d["digest"] for d in found] == [sig.digest] for _, found in answers)
    assert len(hub.requests(contains="/referrers/")) == 1
    hub.reset_log()
    headers, _ = await referrers(http, base, "team/app", image.digest)
    assert hub.log == [] and headers["X-Mirror-Cache"] == "hit"


async def test_upstream_referrers_pages_are_followed(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image = small_image("pages")
    artifacts = [make_artifact(image, SIGNATURE, f"sig {i}".encode()) for i in range(5)]
    hub.add("team/app", "v1", image)
    for artifact in artifacts:
        hub.add("team/app", None, artifact)
    hub.referrers_api, hub.referrers_page = True, 2
    base = mirror_url(await start_mirror(hub.registry_url))
    headers, found = await referrers(http, base, "team/app", image.digest)
    assert sorted(d["digest"] for d in found) == sorted(a.digest for a in artifacts)
    assert "Link" not in headers  # the whole list, in one answer
    assert [r.query.get("page") for r in hub.requests(contains="/referrers/")] == [None, "2", "4"]


async def test_referrers_are_served_stale_while_the_upstream_fails(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image, sig, _ = signed("stale")
    hub.add("team/app", "v1", image)
    hub.add("team/app", None, sig)
    hub.referrers_api = True
    base = mirror_url(await start_mirror(hub.registry_url, tag_ttl=0))
    await referrers(http, base, "team/app", image.digest)
    hub.down = True
    headers, found = await referrers(http, base, "team/app", image.digest)
    assert [d["digest"] for d in found] == [sig.digest]
    assert headers["X-Mirror-Cache"] == "stale"
    hub.down = False
    hub.fail_statuses = [503] * 3
    headers, found = await referrers(http, base, "team/app", image.digest)
    assert [d["digest"] for d in found] == [sig.digest] and headers["X-Mirror-Cache"] == "stale"


async def test_head_of_referrers_carries_the_get_headers(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image, sig, _ = signed("head")
    hub.add("team/app", "v1", image)
    hub.add("team/app", None, sig)
    hub.referrers_api = True
    base = mirror_url(await start_mirror(hub.registry_url))
    _, _, body = await get(http, f"{base}/v2/team/app/referrers/{image.digest}")
    async with http.head(f"{base}/v2/team/app/referrers/{image.digest}") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == OCI_INDEX
        assert resp.headers["Content-Length"] == str(len(body))
        assert await resp.read() == b""


async def test_without_the_api_the_referrers_tag_schema_is_read_like_a_tag(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image, sig, sbom = signed("tagschema")
    index = referrers_tag_index([sig, sbom])
    hub.add("team/app", "v1", image)
    hub.add("team/app", tag_of(image.digest), index)
    base = mirror_url(await start_mirror(hub.registry_url, tag_ttl=0))
    headers, found = await referrers(
        http, base, "team/app", image.digest, f"?artifactType={SIGNATURE}"
    )
    assert [d["digest"] for d in found] == [sig.digest]
    assert headers["OCI-Filters-Applied"] == "artifactType"
    # Resolved like any tag: a HEAD of the tag, then the index fetched once, by digest.
    assert [(r.method, r.path) for r in hub.requests("registry", contains="/manifests/")] == [
        ("HEAD", f"/v2/team/app/manifests/{tag_of(image.digest)}"),
        ("GET", f"/v2/team/app/manifests/{index.digest}"),
    ]
    hub.reset_log()
    _, found = await referrers(http, base, "team/app", image.digest)
    assert {d["digest"] for d in found} == {sig.digest, sbom.digest}
    # expired (tag_ttl 0): the API is asked again (404), the tag revalidated with a HEAD only
    assert [(r.method, r.path.rsplit("/", 2)[1]) for r in hub.requests()] == [
        ("GET", "referrers"),
        ("HEAD", "manifests"),
    ]


async def test_no_api_and_no_tag_is_an_empty_index(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image = small_image("lonely")
    hub.add("team/app", "v1", image)
    base = mirror_url(await start_mirror(hub.registry_url))
    for digest in (image.digest, "sha256:" + "0" * 64):
        headers, found = await referrers(http, base, "team/app", digest)
        assert found == [] and "OCI-Filters-Applied" not in headers
    headers, found = await referrers(http, base, "team/app", image.digest, "?artifactType=x/y")
    assert found == [] and headers["OCI-Filters-Applied"] == "artifactType"


async def test_referrers_of_a_private_repository_follow_the_manifest_rules(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image, sig, _ = signed("secret")
    hub.add("acme/secret", "v1", image, private=True)
    hub.add("acme/secret", None, sig)
    hub.referrers_api = True
    base = mirror_url(await start_mirror(hub.registry_url, username="hubuser", password="hubpass"))
    status, _, body = await get(http, f"{base}/v2/acme/secret/referrers/{image.digest}")
    assert status == 401 and json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    assert sig.digest.encode() not in body


@pytest.mark.integration
async def test_referrers_tag_schema_of_a_real_registry_without_the_api(
    start_mirror: StartMirror, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """distribution 2.8 has no referrers API: a signature pushed with a `subject`, and the index
    a client pushes under `sha256-<hex>` instead (as cosign's and oras's fallback do)."""
    need("skopeo", "docker-registry")
    image, sig, sbom = signed("real")
    index = referrers_tag_index([sig, sbom])
    async with docker_registry(tmp_path / "registry") as registry:
        await push(registry, "team/signed:v1", image, tmp_path / "layouts")
        await http_push(registry.url, "team/signed", sig.digest, sig)
        await http_push(registry.url, "team/signed", tag_of(image.digest), index)
        async with http.get(f"{registry.url}/v2/team/signed/referrers/{image.digest}") as resp:
            assert resp.status == 404  # no API: what the mirror falls back on
        mirror = await start_mirror(registry.url)
        base = mirror_url(mirror)
        headers, found = await referrers(http, base, "team/signed", image.digest)
        assert found == json.loads(index.top.data)["manifests"]
        headers, found = await referrers(
            http, base, "team/signed", image.digest, f"?artifactType={quote(SBOM, safe='')}"
        )
        assert [d["digest"] for d in found] == [sbom.digest]
        assert headers["OCI-Filters-Applied"] == "artifactType"
        _, found = await referrers(http, base, "team/signed", sig.digest)
        assert found == []
        # a real client finds the same index by the tag through the mirror, then the signature
        # it lists (skopeo 1.9 cannot copy the index itself `--all` with digests preserved)
        source = f"docker://127.0.0.1:{mirror.port}/team/signed"
        raw = await run(
            "skopeo", "inspect", "--raw", "--tls-verify=false", f"{source}:{tag_of(image.digest)}"
        )  # fmt: skip
        assert raw.encode() == index.top.data
        out = tmp_path / "out"
        await run(
            "skopeo", "--insecure-policy", "copy", "--preserve-digests", "--src-tls-verify=false",
            f"{source}@{sig.digest}", f"dir:{out}",
        )  # fmt: skip
        assert (out / "manifest.json").read_bytes() == sig.top.data
        for blob in sig.blobs.values():
            assert (out / blob.digest[7:]).read_bytes() == blob.data
    # the registry is gone: the referrers stay listed (the tag-schema index is cached)
    headers, found = await referrers(http, base, "team/signed", image.digest)
    assert {d["digest"] for d in found} == {sig.digest, sbom.digest}
