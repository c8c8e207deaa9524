"""Hosted namespaces: the distribution-spec push API on a real `mirror serve`.

Repositories whose first path component is a hosted namespace (`acme/app`) are the team's own:
pushed to the mirror, stored by it, pulled from it, never fetched from (nor asked of) the
upstream. Who may push and pull is set per namespace, over the mirror's htpasswd users:

    [hosted."acme"]
    push = ["alice"]          # default: every mirror user
    pull = "anyone"           # or a list of users; "anyone" is the default

The protocol checked here is the OCI distribution spec's push and content-management workflows
(https://github.com/opencontainers/distribution-spec/blob/main/spec.md, "Push" and "Content
Management"); where the spec leaves a choice, the comment beside the assertion says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import pytest
from multidict import CIMultiDict

from mirror.config import ConfigError, load_config
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    multiarch_image,
    sha256,
    write_oci_layout,
)
from tests.fixtures.images import small_image as upstream_image
from tests.fixtures.procs import (
    Service,
    free_port,
    mirror_process,
    skopeo_pull_and_verify,
    skopeo_push,
    stop,
)
from tests.integration.test_client_auth import basic, write_htpasswd

MiB = 1024 * 1024
OCTETS = {"Content-Type": "application/octet-stream"}
ACCEPT = {"Accept": ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])}
USERS = {"alice": "wonderland", "bob": "builder", "carol": "singer"}

# acme: alice pushes, anyone pulls; team: bob's alone; open: every user pushes, anyone pulls.
HOSTED_TOML = """\
[hosted."acme"]
push = ["alice"]
pull = "anyone"

[hosted."team"]
push = ["bob"]
pull = ["bob"]

[hosted."open"]
"""


# -- content -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PushImage:
    """An image as a client pushes it: a config, one layer, and the manifest naming them."""

    config: bytes
    layer: bytes
    manifest: bytes
    media_type: str = OCI_MANIFEST

    @property
    def digest(self) -> str:
        return sha256(self.manifest)

    @property
    def blobs(self) -> tuple[bytes, bytes]:
        return (self.config, self.layer)


def random_blob(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def build_image(seed: str, *, manifest_size: int | None = None, docker: bool = False) -> PushImage:
    """Small random content; the manifest is indented oddly on purpose (the registry must keep
    the exact bytes) and, with `manifest_size`, padded with an annotation to exactly that size.
    `docker`: Docker's schema 2 media types (what `docker push` sends) instead of OCI's."""
    manifest_type, config_type, layer_type = (
        (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)
        if docker
        else (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER)
    )
    layer = random_blob(f"layer-{seed}", 3000 + len(seed))
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(layer)]},
            "config": {"Labels": {"seed": seed}},
        }
    ).encode()
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": config_type, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": layer_type, "digest": sha256(layer), "size": len(layer)}],
        "annotations": {"org.example.seed": seed, "org.example.pad": ""},
    }
    manifest = json.dumps(doc, indent=3).encode() + b"\n"
    if manifest_size is not None:
        doc["annotations"]["org.example.pad"] = "x" * (manifest_size - len(manifest))
        manifest = json.dumps(doc, indent=3).encode() + b"\n"
        assert len(manifest) == manifest_size
    return PushImage(config, layer, manifest, manifest_type)


def image_index(*images: PushImage) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": image.digest,
                    "size": len(image.manifest),
                    "platform": {"architecture": arch, "os": "linux"},
                }
                for image, arch in zip(images, ("amd64", "arm64", "s390x"), strict=False)
            ],
        },
        indent=1,
    ).encode()


# -- a registry client -------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    url: str

    def __repr__(self) -> str:  # what an assertion message shows: never megabytes of body
        shown = {k: v for k, v in self.headers.items() if k.lower() != "date"}
        return f"<{self.status} from {self.url} {shown} {self.body[:400]!r}>"

    @property
    def location(self) -> str:
        """The Location header as an absolute URL (the spec lets it be relative)."""
        return urljoin(self.url, self.headers["Location"])

    @property
    def location_path(self) -> str:
        return urlsplit(self.location).path

    @property
    def error_code(self) -> str:
        return str(json.loads(self.body)["errors"][0]["code"])


def with_digest(location: str, digest: str) -> str:
    """`<location>?digest=<digest>`: the location may carry critical query parameters."""
    return f"{location}{'&' if '?' in location else '?'}digest={digest}"


class RegistryClient:
    """One client of the mirror's registry API, logged in as a mirror user or anonymous."""

    def __init__(
        self, session: aiohttp.ClientSession, base: str, authorization: str | None = None
    ) -> None:
        self.session = session
        self.base = base
        self.headers = {"Authorization": authorization} if authorization else {}

    async def call(
        self,
        method: str,
        target: str,
        data: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        url = target if "://" in target else f"{self.base}{target}"
        async with self.session.request(
            method,
            url,
            data=data,
            headers={**self.headers, **(headers or {})},
            allow_redirects=False,
        ) as resp:
            body = await resp.read()
            return Reply(resp.status, resp.headers.copy(), body, str(resp.url))

    async def start_upload(self, name: str, query: str = "") -> Reply:
        return await self.call("POST", f"/v2/{name}/blobs/uploads/{query}")

    async def push_blob(self, name: str, data: bytes) -> None:
        start = await self.start_upload(name)
        assert start.status == 202, start
        done = await self.call("PUT", with_digest(start.location, sha256(data)), data, OCTETS)
        assert done.status == 201, done

    async def put_manifest(
        self, name: str, reference: str, manifest: bytes, media_type: str = OCI_MANIFEST
    ) -> Reply:
        return await self.call(
            "PUT", f"/v2/{name}/manifests/{reference}", manifest, {"Content-Type": media_type}
        )

    async def push_image(self, name: str, reference: str, image: PushImage) -> None:
        for blob in image.blobs:
            await self.push_blob(name, blob)
        reply = await self.put_manifest(name, reference, image.manifest, image.media_type)
        assert reply.status == 201, reply

    async def get_manifest(self, name: str, reference: str, method: str = "GET") -> Reply:
        return await self.call(method, f"/v2/{name}/manifests/{reference}", headers=ACCEPT)

    async def blob(self, name: str, digest: str, method: str = "GET") -> Reply:
        return await self.call(method, f"/v2/{name}/blobs/{digest}")

    async def tags(self, name: str) -> Reply:
        return await self.call("GET", f"/v2/{name}/tags/list")


def as_user(session: aiohttp.ClientSession, mirror: Service, user: str | None) -> RegistryClient:
    """`user` with the right password; None: anonymous."""
    return RegistryClient(session, mirror.url, basic(user, USERS[user]) if user else None)


@contextlib.asynccontextmanager
async def hosted_mirror(
    tmp_path: Path,
    hub: FakeHub,
    *extra: str,
    toml: str = HOSTED_TOML,
    anonymous_pull: bool = False,
    env: dict[str, str] | None = None,
    data: Path | None = None,
    workers: int = 1,
) -> AsyncIterator[Service]:
    """`mirror serve` with the users alice, bob and carol, the namespaces of `toml`, and the
    fake hub as Docker Hub upstream."""
    htpasswd = write_htpasswd(tmp_path, **USERS)
    config = tmp_path / "mirror.toml"
    config.write_text(toml)
    args = ("--workers", str(workers), "--auth-htpasswd", str(htpasswd), "--config", str(config))
    flags = (*args, *(["--anonymous-pull"] if anonymous_pull else []), *extra)
    async with mirror_process(data or tmp_path / "data", hub.registry_url, *flags, env=env) as m:
        yield m


@pytest.fixture
async def mirror(tmp_path: Path, hub: FakeHub) -> AsyncIterator[Service]:
    async with hosted_mirror(tmp_path, hub) as m:
        yield m


@pytest.fixture
def alice(http: aiohttp.ClientSession, mirror: Service) -> RegistryClient:
    return as_user(http, mirror, "alice")


def hub_requests_for(hub: FakeHub, *namespaces: str) -> list[str]:
    """Every request any of the hub's servers saw naming one of `namespaces` (path or scope)."""
    return [
        f"{r.server} {r.method} {r.path} {r.query}"
        for r in hub.log
        if any(f"/{ns}/" in r.path or f":{ns}/" in str(r.query) for ns in namespaces)
    ]


# -- blob uploads ------------------------------------------------------------------------------
async def test_post_starts_an_upload_session_with_its_own_location(
    alice: RegistryClient,
) -> None:
    first = await alice.start_upload("acme/app")
    assert first.status == 202, first
    uuid = first.headers["Docker-Upload-UUID"]
    assert uuid and uuid in first.location  # "<location> MUST contain a UUID"
    assert first.headers["Range"] == "0-0"  # distribution's answer for an empty upload
    second = await alice.start_upload("acme/app")
    assert second.status == 202, second
    assert second.location != first.location
    assert second.headers["Docker-Upload-UUID"] != uuid
    status = await alice.call("GET", first.location)
    assert status.status == 204, status
    assert status.headers["Location"]


async def test_single_post_with_digest_stores_the_blob(alice: RegistryClient) -> None:
    data = random_blob("single-post", 5000)
    digest = sha256(data)
    reply = await alice.call("POST", f"/v2/acme/app/blobs/uploads/?digest={digest}", data, OCTETS)
    assert reply.status == 201, reply
    assert reply.location_path == f"/v2/acme/app/blobs/{digest}"
    assert reply.headers["Docker-Content-Digest"] == digest
    head = await alice.blob("acme/app", digest, "HEAD")
    assert head.status == 200, head
    assert head.headers["Content-Length"] == str(len(data))
    assert head.headers["Docker-Content-Digest"] == digest
    get = await alice.call("GET", reply.location)  # "<blob-location> is a pullable blob URL"
    assert get.status == 200, get
    assert get.body == data and get.headers["Docker-Content-Digest"] == digest


async def test_post_then_put_stores_the_blob_and_closes_the_session(
    alice: RegistryClient,
) -> None:
    data = random_blob("post-put", 4096)
    digest = sha256(data)
    start = await alice.start_upload("acme/app")
    assert start.status == 202, start
    done = await alice.call("PUT", with_digest(start.location, digest), data, OCTETS)
    assert done.status == 201, done
    assert done.location_path == f"/v2/acme/app/blobs/{digest}"
    assert done.headers["Docker-Content-Digest"] == digest
    get = await alice.blob("acme/app", digest)
    assert get.status == 200 and get.body == data, get
    assert get.headers["Content-Length"] == str(len(data))
    closed = await alice.call("GET", start.location)
    assert closed.status == 404, closed
    assert closed.error_code == "BLOB_UPLOAD_UNKNOWN"


@pytest.mark.parametrize("last", ["in-the-put", "patched"])
async def test_chunked_upload_with_and_without_content_range(
    alice: RegistryClient, last: str
) -> None:
    data = random_blob(f"chunked-{last}", 2500)
    digest = sha256(data)
    start = await alice.start_upload("acme/app")
    assert start.status == 202, start
    first = await alice.call(
        "PATCH", start.location, data[:1000], {**OCTETS, "Content-Range": "0-999"}
    )
    assert first.status == 202, first
    assert first.headers["Range"] == "0-999"
    # A streamed chunk (no Content-Range), as docker and containerd send one.
    second = await alice.call("PATCH", first.location, data[1000:2000], OCTETS)
    assert second.status == 202, second
    assert second.headers["Range"] == "0-1999"
    status = await alice.call("GET", second.location)
    assert status.status == 204, status
    assert status.headers["Range"] == "0-1999"
    assert status.headers["Location"]
    location = status.location
    if last == "patched":
        third = await alice.call(
            "PATCH", location, data[2000:], {**OCTETS, "Content-Range": "2000-2499"}
        )
        assert third.status == 202, third
        assert third.headers["Range"] == "0-2499"
        done = await alice.call("PUT", with_digest(third.location, digest))
    else:
        done = await alice.call("PUT", with_digest(location, digest), data[2000:], OCTETS)
    assert done.status == 201, done
    assert done.headers["Docker-Content-Digest"] == digest
    get = await alice.blob("acme/app", digest)
    assert get.status == 200 and get.body == data, get


@pytest.mark.parametrize("way", ["one-put", "chunks"])
async def test_a_large_blob_arrives_whole(alice: RegistryClient, way: str) -> None:
    data = random_blob(f"large-{way}", 24 * MiB + 17)
    digest = sha256(data)
    start = await alice.start_upload("acme/app")
    location = start.location
    if way == "chunks":
        for offset in range(0, len(data), 10 * MiB):
            chunk = data[offset : offset + 10 * MiB]
            reply = await alice.call("PATCH", location, chunk, OCTETS)
            assert reply.status == 202, reply
            assert reply.headers["Range"] == f"0-{offset + len(chunk) - 1}"
            location = reply.location
        done = await alice.call("PUT", with_digest(location, digest))
    else:
        done = await alice.call("PUT", with_digest(location, digest), data, OCTETS)
    assert done.status == 201, done
    head = await alice.blob("acme/app", digest, "HEAD")
    assert head.status == 200 and head.headers["Content-Length"] == str(len(data)), head
    get = await alice.blob("acme/app", digest)
    assert get.status == 200 and get.body == data, get


async def test_the_same_blob_uploaded_twice_at_once(alice: RegistryClient) -> None:
    """The spec's "Layer Upload De-duplication": two builds pushing the same layer at the same
    time both succeed; so does pushing it once more when it is already there."""
    data = random_blob("twice", 6000)
    digest = sha256(data)
    sessions = [(await alice.start_upload("acme/app")).location for _ in range(2)]
    for i, location in enumerate(sessions):
        reply = await alice.call("PATCH", location, data[:3000], OCTETS)
        assert reply.status == 202, reply
        sessions[i] = reply.location
    for location in sessions:
        done = await alice.call("PUT", with_digest(location, digest), data[3000:], OCTETS)
        assert done.status == 201, done
    await alice.push_blob("acme/app", data)
    get = await alice.blob("acme/app", digest)
    assert get.status == 200 and get.body == data, get


async def test_a_chunk_out_of_order_is_refused_with_416(alice: RegistryClient) -> None:
    data = random_blob("in-order", 300)
    start = await alice.start_upload("acme/app")
    first = await alice.call(
        "PATCH", start.location, data[:100], {**OCTETS, "Content-Range": "0-99"}
    )
    assert first.status == 202, first
    gap = await alice.call(
        "PATCH", first.location, data[200:], {**OCTETS, "Content-Range": "200-299"}
    )
    assert gap.status == 416, gap
    again = await alice.call(
        "PATCH", first.location, data[:100], {**OCTETS, "Content-Range": "0-99"}
    )
    assert again.status == 416, again
    # The refused chunks changed nothing: the upload goes on from byte 100.
    status = await alice.call("GET", first.location)
    assert status.status == 204 and status.headers["Range"] == "0-99", status
    second = await alice.call(
        "PATCH", status.location, data[100:], {**OCTETS, "Content-Range": "100-299"}
    )
    assert second.status == 202 and second.headers["Range"] == "0-299", second
    done = await alice.call("PUT", with_digest(second.location, sha256(data)))
    assert done.status == 201, done
    # "The first chunk's range MUST begin with 0."
    other = await alice.start_upload("acme/app")
    late = await alice.call("PATCH", other.location, data[:5], {**OCTETS, "Content-Range": "5-9"})
    assert late.status == 416, late


async def test_a_wrong_digest_is_refused_and_nothing_is_stored(alice: RegistryClient) -> None:
    data = random_blob("wrong-digest", 3000)
    claimed = sha256(b"something else entirely")
    # POST then PUT
    start = await alice.start_upload("acme/app")
    put = await alice.call("PUT", with_digest(start.location, claimed), data, OCTETS)
    assert put.status == 400, put
    assert put.error_code == "DIGEST_INVALID"
    # chunked, closed by an empty PUT
    start = await alice.start_upload("acme/app")
    patch = await alice.call("PATCH", start.location, data, OCTETS)
    assert patch.status == 202, patch
    put = await alice.call("PUT", with_digest(patch.location, claimed))
    assert put.status == 400, put
    assert put.error_code == "DIGEST_INVALID"
    # single POST
    post = await alice.call("POST", f"/v2/acme/app/blobs/uploads/?digest={claimed}", data, OCTETS)
    assert post.status == 400, post
    assert post.error_code == "DIGEST_INVALID"
    for digest in (claimed, sha256(data)):
        head = await alice.blob("acme/app", digest, "HEAD")
        assert head.status == 404, (digest, head)


async def test_a_cancelled_upload_is_forgotten(alice: RegistryClient) -> None:
    data = random_blob("cancelled", 1000)
    start = await alice.start_upload("acme/app")
    patch = await alice.call("PATCH", start.location, data, OCTETS)
    assert patch.status == 202, patch
    cancel = await alice.call("DELETE", patch.location)
    assert cancel.status == 204, cancel
    for method, target in (
        ("GET", patch.location),
        ("PATCH", patch.location),
        ("PUT", with_digest(patch.location, sha256(data))),
    ):
        reply = await alice.call(method, target, b"" if method == "GET" else data, OCTETS)
        assert reply.status == 404, (method, reply)
        assert reply.error_code == "BLOB_UPLOAD_UNKNOWN", (method, reply)
    head = await alice.blob("acme/app", sha256(data), "HEAD")
    assert head.status == 404, head


async def test_cross_repository_mount(
    http: aiohttp.ClientSession, mirror: Service, alice: RegistryClient
) -> None:
    shared = random_blob("mounted", 2000)
    digest = sha256(shared)
    await alice.push_blob("acme/app", shared)
    mounted = await alice.start_upload("acme/copy", f"?mount={digest}&from=acme/app")
    assert mounted.status == 201, mounted
    assert mounted.location_path == f"/v2/acme/copy/blobs/{digest}"
    assert mounted.headers["Docker-Content-Digest"] == digest
    get = await alice.blob("acme/copy", digest)
    assert get.status == 200 and get.body == shared, get
    # Mounted blobs are the repository's own: a manifest may name them.
    image = build_image("mounted-image")
    await alice.push_image("acme/app", "v1", image)
    for blob in image.blobs:
        reply = await alice.start_upload("acme/copy", f"?mount={sha256(blob)}&from=acme/app")
        assert reply.status == 201, reply
    put = await alice.put_manifest("acme/copy", "v1", image.manifest)
    assert put.status == 201, put

    # A blob `from` does not hold: a plain upload session, which takes the upload.
    absent = random_blob("not-in-from", 1500)
    fallback = await alice.start_upload("acme/copy", f"?mount={sha256(absent)}&from=acme/app")
    assert fallback.status == 202, fallback
    done = await alice.call("PUT", with_digest(fallback.location, sha256(absent)), absent, OCTETS)
    assert done.status == 201, done

    # From another namespace she may pull from (open: anyone pulls).
    base = random_blob("open-base", 1200)
    await as_user(http, mirror, "bob").push_blob("open/base", base)
    mounted = await alice.start_upload("acme/copy", f"?mount={sha256(base)}&from=open/base")
    assert mounted.status == 201, mounted
    assert mounted.location_path == f"/v2/acme/copy/blobs/{sha256(base)}"
    get = await alice.blob("acme/copy", sha256(base))
    assert get.status == 200 and get.body == base, get

    # A repository alice may not pull from (team: bob's alone) lends her nothing.
    secret = random_blob("team-secret", 1800)
    await as_user(http, mirror, "bob").push_blob("team/secret", secret)
    denied = await alice.start_upload("acme/copy", f"?mount={sha256(secret)}&from=team/secret")
    assert denied.status == 202, denied
    head = await alice.blob("acme/copy", sha256(secret), "HEAD")
    assert head.status == 404, head


# -- manifests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("types", ["oci", "docker"])
async def test_manifest_push_and_pull_by_tag_and_digest(alice: RegistryClient, types: str) -> None:
    image = build_image(f"tagged-{types}", docker=types == "docker")
    for blob in image.blobs:
        await alice.push_blob("acme/app", blob)
    put = await alice.put_manifest("acme/app", "v1", image.manifest, image.media_type)
    assert put.status == 201, put
    assert put.headers["Docker-Content-Digest"] == image.digest
    pulled = await alice.call("GET", put.location, headers=ACCEPT)  # a pullable manifest URL
    assert pulled.status == 200 and pulled.body == image.manifest, pulled
    for reference in ("v1", image.digest):
        get = await alice.get_manifest("acme/app", reference)
        assert get.status == 200, (reference, get)
        assert get.body == image.manifest
        assert get.headers["Content-Type"] == image.media_type
        assert get.headers["Docker-Content-Digest"] == image.digest
        head = await alice.get_manifest("acme/app", reference, "HEAD")
        assert head.status == 200, (reference, head)
        assert head.body == b""
        assert head.headers["Content-Length"] == str(len(image.manifest))
        assert head.headers["Content-Type"] == image.media_type
        assert head.headers["Docker-Content-Digest"] == image.digest
    for blob in image.blobs:
        get = await alice.blob("acme/app", sha256(blob))
        assert get.status == 200 and get.body == blob, get


async def test_pushes_by_digest_and_an_index_and_the_tag_list(alice: RegistryClient) -> None:
    amd64, arm64 = build_image("amd64"), build_image("arm64")
    await alice.push_image("acme/app", "v1", amd64)
    # By digest: stored, pullable, and no tag.
    for blob in arm64.blobs:
        await alice.push_blob("acme/app", blob)
    put = await alice.put_manifest("acme/app", arm64.digest, arm64.manifest)
    assert put.status == 201, put
    assert put.headers["Docker-Content-Digest"] == arm64.digest
    get = await alice.get_manifest("acme/app", arm64.digest)
    assert get.status == 200 and get.body == arm64.manifest, get
    index = image_index(amd64, arm64)
    put = await alice.put_manifest("acme/app", "multi", index, OCI_INDEX)
    assert put.status == 201, put
    assert put.headers["Docker-Content-Digest"] == sha256(index)
    get = await alice.get_manifest("acme/app", "multi")
    assert get.status == 200 and get.body == index, get
    assert get.headers["Content-Type"] == OCI_INDEX
    for tag in ("latest", "1.0"):
        await alice.push_image("acme/app", tag, amd64)
    tags = await alice.tags("acme/app")
    assert tags.status == 200, tags
    # "the tags MUST be in lexical order"
    assert json.loads(tags.body) == {"name": "acme/app", "tags": ["1.0", "latest", "multi", "v1"]}
    # `n` and `last` page through them; "<tagname> will not be included in the results".
    pages = [("?n=2", ["1.0", "latest"]), ("?n=2&last=latest", ["multi", "v1"]),
             ("?last=1.0", ["latest", "multi", "v1"])]  # fmt: skip
    for query, expected in pages:
        page = await alice.call("GET", f"/v2/acme/app/tags/list{query}")
        assert page.status == 200, (query, page)
        assert json.loads(page.body)["tags"] == expected, (query, page)
    # A tag pushed again names the new manifest.
    await alice.push_image("acme/app", "latest", arm64)
    get = await alice.get_manifest("acme/app", "latest")
    assert get.status == 200 and get.body == arm64.manifest, get
    assert get.headers["Docker-Content-Digest"] == arm64.digest


async def test_a_manifest_naming_a_blob_not_in_the_repository_is_refused(
    alice: RegistryClient,
) -> None:
    image = build_image("incomplete")
    await alice.push_blob("acme/app", image.config)  # the layer never comes
    reply = await alice.put_manifest("acme/app", "v1", image.manifest)
    assert reply.status == 400, reply
    assert reply.error_code == "MANIFEST_BLOB_UNKNOWN"
    no_config = build_image("no-config")
    await alice.push_blob("acme/app", no_config.layer)
    reply = await alice.put_manifest("acme/app", "v2", no_config.manifest)
    assert reply.status == 400, reply
    assert reply.error_code == "MANIFEST_BLOB_UNKNOWN"
    # Blobs pushed to another repository of the same namespace are not this one's.
    elsewhere = build_image("elsewhere")
    await alice.push_image("acme/app", "v3", elsewhere)
    reply = await alice.put_manifest("acme/other", "v1", elsewhere.manifest)
    assert reply.status == 400, reply
    assert reply.error_code == "MANIFEST_BLOB_UNKNOWN"
    for name, tag in (("acme/app", "v1"), ("acme/app", "v2"), ("acme/other", "v1")):
        get = await alice.get_manifest(name, tag)
        assert get.status == 404, (name, tag, get)
        assert get.error_code == "MANIFEST_UNKNOWN"


async def test_a_manifest_that_is_not_what_it_claims_is_refused(alice: RegistryClient) -> None:
    """A content-addressed store must never file bytes under another digest; distribution
    answers 400 DIGEST_INVALID to a manifest PUT by digest that the body does not match, and
    400 MANIFEST_INVALID to a body that is no manifest."""
    image, other = build_image("claimed"), build_image("sent")
    for blob in (*image.blobs, *other.blobs):
        await alice.push_blob("acme/app", blob)
    reply = await alice.put_manifest("acme/app", image.digest, other.manifest)
    assert reply.status == 400, reply
    assert reply.error_code == "DIGEST_INVALID"
    for reference in (image.digest, other.digest):
        get = await alice.get_manifest("acme/app", reference)
        assert get.status == 404, (reference, get)
    reply = await alice.put_manifest("acme/app", "v1", b'{"schemaVersion": 2, "layers": [')
    assert reply.status == 400, reply
    assert reply.error_code == "MANIFEST_INVALID"
    get = await alice.get_manifest("acme/app", "v1")
    assert get.status == 404, get


async def test_manifests_up_to_4_mib_are_taken_and_larger_ones_refused_with_413(
    alice: RegistryClient,
) -> None:
    """ "Client and registry implementations SHOULD expect to be able to support manifest pushes
    of at least 4 megabytes"; over the registry's limit it "SHOULD respond ... with a response
    code `413 Payload Too Large`" (spec.md, Pushing Manifests). distribution itself answers 400
    MANIFEST_INVALID there; the spec names 413, and so does this test."""
    largest = build_image("largest", manifest_size=4 * MiB)
    await alice.push_image("acme/app", "largest", largest)
    get = await alice.get_manifest("acme/app", "largest")
    assert get.status == 200 and get.body == largest.manifest, get
    too_large = build_image("too-large", manifest_size=4 * MiB + 1)
    for blob in too_large.blobs:
        await alice.push_blob("acme/app", blob)
    reply = await alice.put_manifest("acme/app", "too-large", too_large.manifest)
    assert reply.status == 413, reply
    get = await alice.get_manifest("acme/app", "too-large")
    assert get.status == 404, get


async def test_delete_by_digest_removes_the_manifest(alice: RegistryClient) -> None:
    image, kept = build_image("deleted"), build_image("kept")
    await alice.push_image("acme/app", "v1", image)
    await alice.push_image("acme/app", "v2", kept)
    reply = await alice.call("DELETE", f"/v2/acme/app/manifests/{image.digest}")
    assert reply.status == 202, reply
    for reference in (image.digest, "v1"):  # the tag named that manifest: nothing to serve
        get = await alice.get_manifest("acme/app", reference)
        assert get.status == 404, (reference, get)
        assert get.error_code == "MANIFEST_UNKNOWN"
        head = await alice.get_manifest("acme/app", reference, "HEAD")
        assert head.status == 404, (reference, head)
    again = await alice.call("DELETE", f"/v2/acme/app/manifests/{image.digest}")
    assert again.status == 404, again
    assert again.error_code == "MANIFEST_UNKNOWN"
    get = await alice.get_manifest("acme/app", "v2")
    assert get.status == 200 and get.body == kept.manifest, get
    tags = await alice.tags("acme/app")
    assert json.loads(tags.body) == {"name": "acme/app", "tags": ["v2"]}, tags


async def test_delete_by_tag_removes_the_tag_only(alice: RegistryClient) -> None:
    image = build_image("untagged")
    await alice.push_image("acme/app", "v1", image)
    await alice.push_image("acme/app", "stable", image)
    reply = await alice.call("DELETE", "/v2/acme/app/manifests/v1")
    assert reply.status == 202, reply
    get = await alice.get_manifest("acme/app", "v1")
    assert get.status == 404, get
    assert get.error_code == "MANIFEST_UNKNOWN"
    for reference in (image.digest, "stable"):
        get = await alice.get_manifest("acme/app", reference)
        assert get.status == 200 and get.body == image.manifest, (reference, get)
    tags = await alice.tags("acme/app")
    assert json.loads(tags.body) == {"name": "acme/app", "tags": ["stable"]}, tags


async def test_a_malformed_tag_and_a_blob_delete_are_refused(
    http: aiohttp.ClientSession, tmp_path: Path, hub: FakeHub
) -> None:
    """A push to a tag the spec's grammar refuses is `400 TAG_INVALID` for a user with push
    right (401 or 403 first for anyone else, even where anyone may pull) and stores nothing;
    `DELETE` of a blob is `405 UNSUPPORTED` (the spec lets a registry refuse it: GC removes
    what no manifest names)."""
    async with hosted_mirror(tmp_path, hub, anonymous_pull=True) as mirror:
        alice, bob = as_user(http, mirror, "alice"), as_user(http, mirror, "bob")
        image = build_image("badly tagged")
        for blob in image.blobs:
            await alice.push_blob("acme/app", blob)
        anonymous = await as_user(http, mirror, None).put_manifest(
            "acme/app", "-v1", image.manifest
        )
        assert anonymous.status == 401, anonymous
        refused = await bob.put_manifest("acme/app", "-v1", image.manifest)
        assert (refused.status, refused.error_code) == (403, "DENIED"), refused
        reply = await alice.put_manifest("acme/app", "-v1", image.manifest)
        assert (reply.status, reply.error_code) == (400, "TAG_INVALID"), reply
        get = await alice.get_manifest("acme/app", image.digest)
        assert get.status == 404, get
        layer = sha256(image.layer)
        delete = await alice.call("DELETE", f"/v2/acme/app/blobs/{layer}")
        assert (delete.status, delete.error_code) == (405, "UNSUPPORTED"), delete
        still = await alice.blob("acme/app", layer)
        assert still.status == 200 and still.body == image.layer, still


# -- who may push and pull ---------------------------------------------------------------------
@pytest.mark.parametrize("anonymous_pull", [False, True], ids=["users-only", "anonymous-pull"])
async def test_every_push_request_needs_a_user_with_push_right(
    tmp_path: Path, hub: FakeHub, http: aiohttp.ClientSession, anonymous_pull: bool
) -> None:
    async with hosted_mirror(tmp_path, hub, anonymous_pull=anonymous_pull) as m:
        alice = as_user(http, m, "alice")
        image = build_image("guarded")
        await alice.push_image("acme/app", "v1", image)
        session = (await alice.start_upload("acme/app")).location
        intruder = random_blob("intruder", 700)
        other = build_image("other")
        requests: list[tuple[str, str, bytes]] = [
            ("POST", "/v2/acme/app/blobs/uploads/", b""),
            ("POST", f"/v2/acme/app/blobs/uploads/?digest={sha256(intruder)}", intruder),
            ("POST", f"/v2/acme/new/blobs/uploads/?mount={sha256(image.layer)}&from=acme/app",
             b""),
            ("PATCH", session, intruder),
            ("PUT", with_digest(session, sha256(intruder)), intruder),
            ("DELETE", session, b""),
            ("PUT", "/v2/acme/app/manifests/v2", image.manifest),
            ("PUT", f"/v2/acme/app/manifests/{other.digest}", other.manifest),
            ("DELETE", "/v2/acme/app/manifests/v1", b""),
            ("DELETE", f"/v2/acme/app/manifests/{image.digest}", b""),
        ]  # fmt: skip
        who = {
            "anonymous": None,
            "wrong password": basic("alice", "queen"),
            "unknown user": basic("mallory", "wonderland"),
            "carol (no push right)": basic("carol", USERS["carol"]),
        }
        for method, target, data in requests:
            headers = {"Content-Type": OCI_MANIFEST} if "manifests" in target else OCTETS
            for label, authorization in who.items():
                client = RegistryClient(http, m.url, authorization)
                reply = await client.call(method, target, data, headers)
                if label.startswith("carol"):
                    assert reply.status == 403, (label, method, target, reply)
                    assert reply.error_code == "DENIED", (label, method, target, reply)
                else:
                    assert reply.status == 401, (label, method, target, reply)
                    assert reply.headers["WWW-Authenticate"].startswith("Basic"), reply
        # Nothing of it happened: the session is alice's to finish, the content unchanged.
        done = await alice.call("PUT", with_digest(session, sha256(b"")))
        assert done.status == 201, done
        head = await alice.blob("acme/app", sha256(intruder), "HEAD")
        assert head.status == 404, head
        head = await alice.blob("acme/new", sha256(image.layer), "HEAD")
        assert head.status == 404, head
        for reference in ("v1", image.digest):
            get = await alice.get_manifest("acme/app", reference)
            assert get.status == 200 and get.body == image.manifest, (reference, get)
        for reference in ("v2", other.digest):
            get = await alice.get_manifest("acme/app", reference)
            assert get.status == 404, (reference, get)
        # bob may push to team, not to acme; alice not to team.
        bob = as_user(http, m, "bob")
        assert (await bob.start_upload("acme/app")).status == 403
        assert (await alice.start_upload("team/secret")).status == 403
        assert (await bob.start_upload("team/secret")).status == 202


@pytest.mark.parametrize("anonymous_pull", [False, True], ids=["users-only", "anonymous-pull"])
async def test_pull_rights_of_a_namespace(
    tmp_path: Path, hub: FakeHub, http: aiohttp.ClientSession, anonymous_pull: bool
) -> None:
    async with hosted_mirror(tmp_path, hub, anonymous_pull=anonymous_pull) as m:
        secret, public = build_image("secret"), build_image("public")
        await as_user(http, m, "bob").push_image("team/secret", "v1", secret)
        await as_user(http, m, "alice").push_image("acme/app", "v1", public)

        def reads(name: str, image: PushImage) -> list[tuple[str, str]]:
            return [
                ("GET", f"/v2/{name}/manifests/v1"),
                ("HEAD", f"/v2/{name}/manifests/v1"),
                ("GET", f"/v2/{name}/manifests/{image.digest}"),
                ("GET", f"/v2/{name}/blobs/{sha256(image.layer)}"),
                ("HEAD", f"/v2/{name}/blobs/{sha256(image.config)}"),
                ("GET", f"/v2/{name}/tags/list"),
            ]

        async def status(user: str | None, method: str, path: str) -> Reply:
            return await as_user(http, m, user).call(method, path, headers=ACCEPT)

        # team: pull = ["bob"]
        for method, path in reads("team/secret", secret):
            anonymous = await status(None, method, path)
            assert anonymous.status == 401, (method, path, anonymous)
            assert anonymous.headers["WWW-Authenticate"].startswith("Basic")
            alice = await status("alice", method, path)
            assert alice.status == 403, (method, path, alice)
            if method == "GET":
                assert alice.error_code == "DENIED"
                assert secret.layer not in alice.body and secret.manifest not in alice.body
            bob = await status("bob", method, path)
            assert bob.status == 200, (method, path, bob)
        # A blob of team/secret is not served under a name alice may pull.
        leak = await status("alice", "GET", f"/v2/acme/app/blobs/{sha256(secret.layer)}")
        assert leak.status == 404 and secret.layer not in leak.body, leak
        # acme: pull = "anyone": every user, and anonymous clients where anonymous_pull says so.
        for method, path in reads("acme/app", public):
            for user in ("alice", "bob", "carol"):
                reply = await status(user, method, path)
                assert reply.status == 200, (user, method, path, reply)
            anonymous = await status(None, method, path)
            assert anonymous.status == (200 if anonymous_pull else 401), (method, path, anonymous)


async def test_by_default_every_user_pushes_and_anyone_pulls(
    tmp_path: Path, hub: FakeHub, http: aiohttp.ClientSession
) -> None:
    """`[hosted."open"]` without keys, and `--hosted tools`: push for every mirror user."""
    async with hosted_mirror(tmp_path, hub, "--hosted", "tools", anonymous_pull=True) as m:
        for name, user in (("open/app", "carol"), ("tools/app", "bob"), ("tools/cli", "carol")):
            image = build_image(name)
            await as_user(http, m, user).push_image(name, "v1", image)
            for reader in (None, "alice", "bob", "carol"):
                get = await as_user(http, m, reader).get_manifest(name, "v1")
                assert get.status == 200 and get.body == image.manifest, (name, reader, get)
        anonymous = await as_user(http, m, None).start_upload("open/app")
        assert anonymous.status == 401, anonymous


# -- hosted names and the upstream -------------------------------------------------------------
async def test_a_hosted_name_is_never_sent_upstream(
    tmp_path: Path, hub: FakeHub, http: aiohttp.ClientSession
) -> None:
    # The upstream has repositories under the same names: the mirror must not serve them.
    theirs = upstream_image("upstream-acme")
    hub.add("acme/app", "v1", theirs)
    hub.add("acme/deep/app", "v1", theirs)
    hub.add("acmecorp/app", "v1", theirs)
    hub.add("library/alpine", "3.19", upstream_image("alpine"))
    async with hosted_mirror(tmp_path, hub) as m:
        alice = as_user(http, m, "alice")
        for name in ("acme/app", "acme/deep/app"):
            get = await alice.get_manifest(name, "v1")
            assert get.status == 404, (name, get)
            assert get.error_code == "MANIFEST_UNKNOWN"
            get = await alice.get_manifest(name, theirs.digest)
            assert get.status == 404, (name, get)
            blob = next(iter(theirs.blobs))
            head = await alice.blob(name, blob, "HEAD")
            assert head.status == 404, (name, head)
            get = await alice.blob(name, blob)
            assert get.status == 404, (name, get)
            assert get.error_code == "BLOB_UNKNOWN"
            tags = await alice.tags(name)
            assert tags.status == 404, (name, tags)
            assert tags.error_code == "NAME_UNKNOWN"
        ours = build_image("ours")
        await alice.push_image("acme/app", "v1", ours)
        await alice.push_image("acme/deep/app", "v1", ours)
        for name in ("acme/app", "acme/deep/app"):
            get = await alice.get_manifest(name, "v1")
            assert get.status == 200 and get.body == ours.manifest, (name, get)
            tags = await alice.tags(name)
            assert json.loads(tags.body) == {"name": name, "tags": ["v1"]}, tags
        # Names that only look alike, and Docker Hub's own, still come from the upstream:
        # the upstream is there, and reachable.
        for name in ("acmecorp/app", "library/alpine"):
            tag = "v1" if name == "acmecorp/app" else "3.19"
            get = await alice.get_manifest(name, tag)
            assert get.status == 200, (name, get)
        assert hub.requests("registry", contains="acmecorp/app")
    assert hub_requests_for(hub, "acme") == []


async def test_skopeo_pushes_and_pulls_back_every_byte(
    tmp_path: Path, hub: FakeHub, mirror: Service
) -> None:
    """A real client: skopeo pushes a multi-arch OCI image (an index, two manifests, their
    blobs), then a copy to a second repository (where it mounts what the mirror has), and
    pulls both back byte for byte."""
    image = multiarch_image("pushed-by-skopeo")
    layout = write_oci_layout(tmp_path / "layout", image, "v1")
    host = mirror.url.removeprefix("http://")
    creds = f"alice:{USERS['alice']}"
    await skopeo_push(layout, "v1", f"{host}/acme/app:v1", creds)
    await skopeo_push(layout, "v1", f"{host}/acme/copy:v1", creds)
    for name in ("acme/app", "acme/copy"):
        out = tmp_path / "pulled" / name.replace("/", "_")
        await skopeo_pull_and_verify(f"{host}/{name}:v1", out, image, creds)
    assert hub_requests_for(hub, "acme") == []


async def test_the_catalog_lists_pushed_repositories(alice: RegistryClient) -> None:
    await alice.push_image("acme/app", "v1", build_image("catalogued"))
    await alice.push_image("acme/tools/cli", "v1", build_image("catalogued-cli"))
    reply = await alice.call("GET", "/v2/_catalog")
    assert reply.status == 200, reply
    repositories = json.loads(reply.body)["repositories"]
    assert "acme/app" in repositories and "acme/tools/cli" in repositories, repositories


async def test_pushed_images_survive_a_restart(
    tmp_path: Path, hub: FakeHub, http: aiohttp.ClientSession
) -> None:
    image = build_image("durable")
    async with hosted_mirror(tmp_path, hub) as m:
        await as_user(http, m, "alice").push_image("acme/app", "v1", image)
    async with hosted_mirror(tmp_path, hub) as m:
        alice = as_user(http, m, "alice")
        get = await alice.get_manifest("acme/app", "v1")
        assert get.status == 200 and get.body == image.manifest, get
        for blob in image.blobs:
            got = await alice.blob("acme/app", sha256(blob))
            assert got.status == 200 and got.body == blob, got
    assert hub_requests_for(hub, "acme") == []


async def test_pushes_and_pulls_span_workers(tmp_path: Path, hub: FakeHub) -> None:
    """With workers (the default where there is more than one core) every connection may land on
    another one: an upload session begun on one goes on on the others, and a tag pushed, moved
    or deleted through one is seen so by all. Each request here comes on a new connection."""
    data = random_blob("across-workers", 20 * 1000)
    first, second = build_image("first"), build_image("second")
    fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    async with fresh, hosted_mirror(tmp_path, hub, workers=2) as m:
        alice = as_user(fresh, m, "alice")
        location = (await alice.start_upload("acme/app")).location
        for start in range(0, len(data), 1000):
            end = start + 999
            chunk = data[start : end + 1]
            headers = {**OCTETS, "Content-Range": f"{start}-{end}"}
            reply = await alice.call("PATCH", location, chunk, headers)
            assert reply.status == 202 and reply.headers["Range"] == f"0-{end}", (start, reply)
            location = reply.location
        done = await alice.call("PUT", with_digest(location, sha256(data)))
        assert done.status == 201, done
        for _ in range(8):
            get = await alice.blob("acme/app", sha256(data))
            assert get.status == 200 and get.body == data, get

        async def every_worker_serves(expected: PushImage | None) -> None:
            for _ in range(8):
                get = await alice.get_manifest("acme/app", "v1")
                if expected is None:
                    assert get.status == 404, get
                else:
                    assert get.status == 200 and get.body == expected.manifest, get

        await every_worker_serves(None)
        await alice.push_image("acme/app", "v1", first)
        await every_worker_serves(first)
        await alice.push_image("acme/app", "v1", second)
        await every_worker_serves(second)
        reply = await alice.call("DELETE", "/v2/acme/app/manifests/v1")
        assert reply.status == 202, reply
        await every_worker_serves(None)


# -- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["flag", "env"])
async def test_hosted_namespaces_from_flags_and_environment(
    tmp_path: Path, hub: FakeHub, http: aiohttp.ClientSession, source: str
) -> None:
    hub.add("beta/app", "v1", upstream_image("upstream-beta"))
    extra = ("--hosted", "beta", "--hosted", "gamma") if source == "flag" else ()
    env = {"MIRROR_HOSTED": "beta,gamma"} if source == "env" else None
    async with hosted_mirror(tmp_path, hub, *extra, toml="", env=env) as m:
        carol = as_user(http, m, "carol")
        get = await carol.get_manifest("beta/app", "v1")
        assert get.status == 404, get
        for name in ("beta/app", "gamma/app"):
            image = build_image(f"{source}-{name}")
            await carol.push_image(name, "v1", image)
            get = await carol.get_manifest(name, "v1")
            assert get.status == 200 and get.body == image.manifest, (name, get)
    assert hub_requests_for(hub, "beta", "gamma") == []


async def serve_until_exit(
    tmp_path: Path, *args: str, env: Mapping[str, str] | None = None, timeout: float = 15
) -> tuple[int, str]:
    """`mirror serve` on loopback ports that is expected to refuse to start: exit code, stderr."""
    argv = [
        sys.executable, "-m", "mirror", "serve", "--workers", "1",
        "--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}",
        "--data", str(tmp_path / "refused-data"), "--upstream", "http://127.0.0.1:9", *args,
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        await stop(proc)
        raise AssertionError(f"mirror serve {' '.join(args)} {env} started") from None
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace")


@pytest.mark.parametrize("source", ["flag", "env", "toml"])
async def test_hosted_namespaces_need_htpasswd(tmp_path: Path, source: str) -> None:
    (tmp_path / "hosted.toml").write_text('[hosted."acme"]\npush = ["alice"]\n')
    args = {
        "flag": ("--hosted", "acme"),
        "env": (),
        "toml": ("--config", str(tmp_path / "hosted.toml")),
    }[source]
    env = {"MIRROR_HOSTED": "acme"} if source == "env" else None
    code, err = await serve_until_exit(tmp_path, *args, env=env)
    assert code == 2, err  # a ConfigError: "mirror: <setting>: <why>"
    assert err.startswith("mirror: ") and "htpasswd" in err, err


def test_hosted_namespaces_need_htpasswd_in_the_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="htpasswd"):
        load_config({}, {"MIRROR_HOSTED": "acme"})
    htpasswd = write_htpasswd(tmp_path, alice="wonderland")
    load_config({}, {"MIRROR_HOSTED": "acme", "MIRROR_AUTH_HTPASSWD": str(htpasswd)})


@pytest.mark.parametrize("source", ["flag", "env", "toml"])
async def test_library_cannot_be_a_hosted_namespace(tmp_path: Path, source: str) -> None:
    htpasswd = write_htpasswd(tmp_path, **USERS)
    (tmp_path / "hosted.toml").write_text('[hosted."library"]\n')
    args = {
        "flag": ("--hosted", "library"),
        "env": (),
        "toml": ("--config", str(tmp_path / "hosted.toml")),
    }[source]
    env = {"MIRROR_HOSTED": "library"} if source == "env" else None
    code, err = await serve_until_exit(tmp_path, "--auth-htpasswd", str(htpasswd), *args, env=env)
    assert code == 2, err
    assert err.startswith("mirror: ") and "library" in err, err


async def test_hosted_max_size_is_a_size_setting(
    tmp_path: Path, hub: FakeHub, http: aiohttp.ClientSession
) -> None:
    async with hosted_mirror(tmp_path, hub, "--hosted-max-size", "64MiB") as m:
        await as_user(http, m, "alice").push_image("acme/app", "v1", build_image("sized"))
    async with hosted_mirror(
        tmp_path, hub, env={"MIRROR_HOSTED_MAX_SIZE": "1GiB"}, data=tmp_path / "data-env"
    ) as m:
        await as_user(http, m, "alice").push_image("acme/app", "v1", build_image("sized"))
    htpasswd = write_htpasswd(tmp_path, **USERS)
    for args, env in (
        (("--hosted-max-size", "lots"), None),
        ((), {"MIRROR_HOSTED_MAX_SIZE": "lots"}),
    ):
        code, err = await serve_until_exit(
            tmp_path, "--auth-htpasswd", str(htpasswd), "--hosted", "acme", *args, env=env
        )
        assert code == 2, (args, env, err)
        assert "hosted_max_size" in err, err
