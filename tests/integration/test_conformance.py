"""The pull API the way the OCI distribution-spec conformance suite drives it (pull workflow,
read-only data), against a real `mirror serve` in front of a real distribution 2.8, with
distribution itself asked the same requests side by side: the mirror answers what a registry
answers, for an OCI image, a Docker schema2 image, an OCI index and a Docker list.

Where the mirror deliberately answers otherwise, the test says so and asserts the mirror's
answer exactly: a malformed digest is 400 DIGEST_INVALID (distribution: a bare 404, or a 500),
schema2 by tag to a client that does not list it is the schema2 bytes (distribution 2.8
rewrites it to schema1), a client without Accept gets any type, tag lists are sorted, and the
referrers API, which distribution 2.8 lacks, answers 200 with an index.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from yarl import URL

from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Blob,
    Image,
    make_artifact,
    multiarch_image,
    referrers_tag_index,
    small_image,
)
from tests.fixtures.procs import docker_registry, http_push, mirror_process, push

OCI_ONLY = f"{OCI_INDEX}, {OCI_MANIFEST}"
EVERY_TYPE = f"{OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_LIST}, {DOCKER_MANIFEST}"
SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"
MISSING = "sha256:" + "0" * 64
TAGS = ("v1", "b", "a", "z", "1.0", "latest")


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def code(self) -> str | None:
        try:
            return str(json.loads(self.body)["errors"][0]["code"])
        except (ValueError, KeyError, IndexError, TypeError):
            return None


@dataclass
class Side:
    """The same registry API on two servers: the mirror, and the upstream it mirrors."""

    mirror: str
    upstream: str
    http: aiohttp.ClientSession

    async def ask(self, base: str, method: str, path: str, accept: str | None) -> Answer:
        headers = {"Accept": accept} if accept else {}
        async with self.http.request(
            method, URL(base + path, encoded=True), headers=headers
        ) as resp:
            return Answer(resp.status, dict(resp.headers), await resp.read())

    async def both(
        self, method: str, path: str, accept: str | None = None
    ) -> tuple[Answer, Answer]:
        return (
            await self.ask(self.mirror, method, path, accept),
            await self.ask(self.upstream, method, path, accept),
        )

    async def same(self, method: str, path: str, accept: str | None = None) -> Answer:
        """The mirror answers as distribution does: status, error code, body and digest."""
        ours, theirs = await self.both(method, path, accept)
        assert ours.status == theirs.status, (method, path, accept, ours, theirs)
        if ours.status >= 400:
            if method == "GET":
                assert ours.code == theirs.code, (path, ours.body, theirs.body)
            return ours
        assert ours.body == theirs.body, (method, path)
        for header in ("Docker-Content-Digest", "Content-Length"):
            assert ours.headers.get(header) == theirs.headers.get(header), (path, header)
        if "/manifests/" in path:
            assert ours.headers["Content-Type"] == theirs.headers["Content-Type"], path
        return ours


IMAGES = {
    "conf/oci": small_image("conformance-oci"),
    "conf/docker": small_image("conformance-docker", docker=True),
    "conf/index": multiarch_image("conformance-index"),
    "conf/list": multiarch_image("conformance-list", docker=True),
}
SIGNATURE_OF_OCI = make_artifact(IMAGES["conf/oci"], SIGNATURE, b"signed", {"who": "ci"})
SBOM_OF_OCI = make_artifact(IMAGES["conf/oci"], SBOM, b'{"spdxVersion": "SPDX-2.3"}')


ONE_UPSTREAM = pytest.mark.asyncio(loop_scope="module")  # the tests below share `side`


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def side(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Side]:
    """distribution 2.8 with the images pushed, and a mirror in front: set up once, as the
    conformance suite does, and only read by the tests."""
    tmp_path = tmp_path_factory.mktemp("conformance")
    async with docker_registry(tmp_path / "registry") as registry:
        for name, image in IMAGES.items():
            for tag in TAGS:
                await push(registry, f"{name}:{tag}", image, tmp_path / "layouts" / tag)
        # A client without the referrers API (cosign, oras) pushes artifacts and the
        # referrers tag schema's index by hand.
        schema_tag = IMAGES["conf/oci"].digest.replace(":", "-")
        index = referrers_tag_index([SIGNATURE_OF_OCI, SBOM_OF_OCI])
        await http_push(registry.url, "conf/oci", schema_tag, index)
        async with (
            mirror_process(tmp_path / "data", registry.url, "--workers", "1") as mirror,
            aiohttp.ClientSession(auto_decompress=False) as http,
        ):
            yield Side(mirror.url, registry.url, http)


@ONE_UPSTREAM
@pytest.mark.parametrize("name", list(IMAGES))
async def test_pull_by_tag_and_digest_as_distribution_answers(side: Side, name: str) -> None:
    image = IMAGES[name]
    media_type = image.top.media_type
    by_tag, by_digest = f"/v2/{name}/manifests/v1", f"/v2/{name}/manifests/{image.digest}"
    schema2_by_tag_to_oci_only = media_type in (DOCKER_MANIFEST, DOCKER_LIST)
    for accept in (EVERY_TYPE, OCI_ONLY):
        for path in (by_tag, by_digest):
            if accept == OCI_ONLY and path == by_tag and schema2_by_tag_to_oci_only:
                continue  # below: distribution 2.8 rewrites it to schema1, the mirror does not
            for method in ("GET", "HEAD"):
                answer = await side.same(method, path, accept)
                assert answer.status == 200, (path, accept, answer.body)
                assert answer.headers["Docker-Content-Digest"] == image.digest
    # The conformance suite's own client lists OCI types only: schema2 is served to it by tag
    # too, as exact bytes (a Docker list by tag: its linux/amd64 schema2 image), where
    # distribution 2.8 rewrites it to schema1. And a client that sends no Accept at all gets
    # the manifest as it is (distribution refuses OCI types to it, and rewrites schema2).
    served = image.platform_manifest("amd64") if media_type == DOCKER_LIST else image.top
    deliberate: list[tuple[str | None, str, Blob]] = [
        (None, by_tag, image.top),
        (None, by_digest, image.top),
    ]
    if schema2_by_tag_to_oci_only:
        deliberate.append((OCI_ONLY, by_tag, served))
    for asked, path, manifest in deliberate:
        for method in ("GET", "HEAD"):
            ours = await side.ask(side.mirror, method, path, asked)
            assert ours.status == 200 and ours.headers["Content-Type"] == manifest.media_type
            assert ours.headers["Docker-Content-Digest"] == manifest.digest
            assert ours.body == (manifest.data if method == "GET" else b"")
    # The blobs: config and layers, GET and HEAD, whole and ranged.
    for blob in image.blobs.values():
        path = f"/v2/{name}/blobs/{blob.digest}"
        await side.same("HEAD", path)
        assert (await side.same("GET", path)).body == blob.data
        ranged = await side.http.get(side.mirror + path, headers={"Range": "bytes=1-3"})
        async with ranged:
            assert ranged.status == 206 and await ranged.read() == blob.data[1:4]
            assert ranged.headers["Content-Range"] == f"bytes 1-3/{len(blob.data)}"


@ONE_UPSTREAM
@pytest.mark.parametrize("name", list(IMAGES))
async def test_what_is_not_there_is_404_as_distribution_answers(side: Side, name: str) -> None:
    for method in ("GET", "HEAD"):
        for path in (
            f"/v2/{name}/manifests/nonexistent",
            f"/v2/{name}/manifests/{MISSING}",
            f"/v2/{name}/blobs/{MISSING}",
        ):
            answer = await side.same(method, path, EVERY_TYPE)
            assert answer.status == 404, path
            if method == "GET":
                expected = "BLOB_UNKNOWN" if "/blobs/" in path else "MANIFEST_UNKNOWN"
                assert answer.code == expected, (path, answer.body)
        # A malformed tag names no manifest: 404 from both; distribution's router says it in
        # plain text, the mirror in the spec's JSON.
        ours, theirs = await side.both(method, f"/v2/{name}/manifests/.INVALID", EVERY_TYPE)
        assert ours.status == theirs.status == 404
        if method == "GET":
            assert ours.code == "MANIFEST_UNKNOWN"
    # A malformed digest: 400 DIGEST_INVALID from the mirror, before anything is asked
    # upstream (distribution has no route for a blob's, and takes a manifest's for a tag
    # path and answers 500).
    for path in (f"/v2/{name}/manifests/sha256:abc", f"/v2/{name}/blobs/sha256:abc"):
        ours = await side.ask(side.mirror, "GET", path, EVERY_TYPE)
        assert (ours.status, ours.code) == (400, "DIGEST_INVALID")
    await side.same("GET", "/v2/conf/nothing-here/manifests/v1", EVERY_TYPE)


@ONE_UPSTREAM
async def test_tag_lists_are_sorted_and_paged_with_n_and_last(side: Side) -> None:
    """Spec: tags in lexical order, `n` and `last`, a `Link` to the next page. distribution
    2.8 lists the same tags, in the order its storage walk finds them."""
    expected = sorted(TAGS)
    ours, theirs = await side.both("GET", "/v2/conf/docker/tags/list")
    assert ours.status == theirs.status == 200
    assert sorted(json.loads(theirs.body)["tags"]) == expected
    assert json.loads(ours.body) == {"name": "conf/docker", "tags": expected}
    pages: list[list[str]] = []
    path = "/v2/conf/docker/tags/list?n=2"
    while path:
        answer = await side.ask(side.mirror, "GET", path, None)
        assert answer.status == 200
        pages.append(json.loads(answer.body)["tags"])
        link = answer.headers.get("Link")
        path = link.split(";")[0].strip("<>") if link else ""
    assert pages == [expected[0:2], expected[2:4], expected[4:6]]
    answer = await side.ask(side.mirror, "GET", "/v2/conf/docker/tags/list?n=3&last=b", None)
    assert json.loads(answer.body)["tags"] == ["latest", "v1", "z"]
    answer = await side.ask(side.mirror, "GET", "/v2/conf/docker/tags/list?n=0", None)
    assert answer.status == 200 and json.loads(answer.body)["tags"] == []
    await side.same("GET", "/v2/conf/nothing-here/tags/list")


@ONE_UPSTREAM
async def test_referrers_from_the_tag_schema_of_an_upstream_without_the_api(side: Side) -> None:
    subject = IMAGES["conf/oci"].digest
    theirs = await side.ask(side.upstream, "GET", f"/v2/conf/oci/referrers/{subject}", None)
    assert theirs.status == 404  # distribution 2.8 has no referrers API
    listed = await referrers(side, f"/v2/conf/oci/referrers/{subject}")
    assert {d["digest"]: d["artifactType"] for d in listed} == {
        SIGNATURE_OF_OCI.digest: SIGNATURE,
        SBOM_OF_OCI.digest: SBOM,
    }
    signatures = await referrers(
        side, f"/v2/conf/oci/referrers/{subject}?artifactType={SIGNATURE}", filtered=True
    )
    assert [d["digest"] for d in signatures] == [SIGNATURE_OF_OCI.digest]
    # No referrers at all: an empty index, never a 404.
    assert await referrers(side, f"/v2/conf/docker/referrers/{IMAGES['conf/docker'].digest}") == []


async def referrers(side: Side, path: str, filtered: bool = False) -> list[dict[str, str]]:
    answer = await side.ask(side.mirror, "GET", path, None)
    assert answer.status == 200, answer
    assert answer.headers["Content-Type"] == OCI_INDEX
    assert (answer.headers.get("OCI-Filters-Applied") == "artifactType") is filtered
    index = json.loads(answer.body)
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    return list(index["manifests"])


async def test_referrers_from_an_upstream_with_the_api(hub: FakeHub, tmp_path: Path) -> None:
    image: Image = IMAGES["conf/oci"]
    hub.add("conf/oci", "v1", image)
    hub.add("conf/oci", None, SIGNATURE_OF_OCI)
    hub.add("conf/oci", None, SBOM_OF_OCI)
    hub.referrers_api = True
    async with (
        mirror_process(tmp_path / "data", hub.registry_url, "--workers", "1") as mirror,
        aiohttp.ClientSession() as http,
    ):
        side = Side(mirror.url, hub.registry_url, http)
        path = f"/v2/conf/oci/referrers/{image.digest}"
        listed = await referrers(side, path)
        assert {d["digest"] for d in listed} == {SIGNATURE_OF_OCI.digest, SBOM_OF_OCI.digest}
        sboms = await referrers(side, f"{path}?artifactType={SBOM}", filtered=True)
        assert [d["digest"] for d in sboms] == [SBOM_OF_OCI.digest]
        assert await referrers(side, f"/v2/conf/oci/referrers/{MISSING}") == []
    assert hub.requests("registry", "GET", "/referrers/"), "the upstream's API was not asked"
