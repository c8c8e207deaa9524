"""The pull path against a Docker-Hub-like upstream: exactness, freshness, coalescing, faults."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from yarl import URL

from tests.conftest import StartAdmin, StartMirror
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    big_image,
    make_image,
    multiarch_image,
    random_bytes,
    small_image,
)

ALL_TYPES = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])
MiB = 1024 * 1024

pytestmark = pytest.mark.backends("local", "s3")


async def get(
    http: aiohttp.ClientSession, url: str, **headers: str
) -> tuple[int, CIMultiDict[str], bytes]:
    async with http.get(url, headers=headers) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


async def pull(http: aiohttp.ClientSession, base: str, name: str, ref: str) -> dict[str, bytes]:
    """Pull like a client: manifest (and platform child), config and layers; return all bytes."""
    got: dict[str, bytes] = {}
    status, headers, body = await get(http, f"{base}/v2/{name}/manifests/{ref}", Accept=ALL_TYPES)
    assert status == 200, body
    got[headers["Docker-Content-Digest"]] = body
    doc = json.loads(body)
    if "manifests" in doc:
        child = next(m for m in doc["manifests"] if m["platform"]["architecture"] == "amd64")
        status, headers, body = await get(
            http, f"{base}/v2/{name}/manifests/{child['digest']}", Accept=ALL_TYPES
        )
        assert status == 200
        got[child["digest"]] = body
        doc = json.loads(body)
    for desc in (doc["config"], *doc["layers"]):
        status, _, data = await get(http, f"{base}/v2/{name}/blobs/{desc['digest']}")
        assert status == 200
        assert "sha256:" + hashlib.sha256(data).hexdigest() == desc["digest"]
        got[desc["digest"]] = data
    return got


def mirror_url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def test_v2_root_answers_200_with_api_version(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    base = mirror_url(await start_mirror(hub.registry_url))
    status, headers, body = await get(http, f"{base}/v2/")
    assert (status, body) == (200, b"{}")
    assert headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert "WWW-Authenticate" not in headers
    assert hub.log == []


async def test_pull_serves_exact_bytes_with_registry_headers(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image = small_image("exact")
    hub.add("team/app", "v1", image)
    base = mirror_url(await start_mirror(hub.registry_url))
    status, headers, body = await get(http, f"{base}/v2/team/app/manifests/v1", Accept=ALL_TYPES)
    assert status == 200
    assert body == image.top.data  # byte-for-byte, including the unusual indentation
    assert headers["Content-Type"] == OCI_MANIFEST
    assert headers["Docker-Content-Digest"] == image.digest
    assert headers["Content-Length"] == str(len(image.top.data))
    assert headers["ETag"] == f'"{image.digest}"'
    got = await pull(http, base, "team/app", "v1")
    assert set(got) == {image.digest, *image.blobs}
    assert hub.auth_violations == []


async def test_head_manifest_carries_the_same_headers_without_body(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image = small_image("head")
    hub.add("library/alpine", "3.19", image)
    base = mirror_url(await start_mirror(hub.registry_url))
    async with http.head(
        f"{base}/v2/library/alpine/manifests/3.19", headers={"Accept": ALL_TYPES}
    ) as r:
        assert r.status == 200
        assert r.headers["Docker-Content-Digest"] == image.digest
        assert r.headers["Content-Length"] == str(len(image.top.data))
        assert r.headers["Content-Type"] == OCI_MANIFEST
        assert await r.read() == b""


async def test_single_component_name_means_library(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image = small_image("alpine")
    hub.add("library/alpine", "3.19", image)
    base = mirror_url(await start_mirror(hub.registry_url))
    status, headers, _ = await get(http, f"{base}/v2/alpine/manifests/3.19", Accept=ALL_TYPES)
    assert status == 200 and headers["Docker-Content-Digest"] == image.digest
    assert hub.requests(contains="/v2/library/alpine/manifests/3.19")


async def test_pull_of_fresh_tag_makes_no_upstream_request(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    hub.add("library/alpine", "3.19", multiarch_image("fresh"))
    base = mirror_url(await start_mirror(hub.registry_url))
    first = await pull(http, base, "library/alpine", "3.19")
    hub.reset_log()
    second = await pull(http, base, "library/alpine", "3.19")
    assert second == first
    assert hub.log == []


async def test_expired_tag_is_revalidated_with_head_only(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    hub.add("library/alpine", "3.19", small_image("ttl"))
    base = mirror_url(await start_mirror(hub.registry_url, tag_ttl=0))
    await pull(http, base, "library/alpine", "3.19")
    hub.reset_log()
    await pull(http, base, "library/alpine", "3.19")
    manifest_requests = hub.requests(contains="/manifests/")
    assert [r.method for r in manifest_requests] == ["HEAD"]
    assert hub.blob_gets() == []


async def test_moved_tag_is_fetched_by_digest_after_revalidation(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    old, new = small_image("old"), small_image("new")
    hub.add("library/alpine", "3.19", old)
    base = mirror_url(await start_mirror(hub.registry_url, tag_ttl=0))
    await pull(http, base, "library/alpine", "3.19")
    hub.add("library/alpine", "3.19", new)
    hub.reset_log()
    got = await pull(http, base, "library/alpine", "3.19")
    assert new.digest in got
    gets = hub.manifest_gets()
    assert [r.path.rsplit("/", 1)[1] for r in gets] == [new.digest]


async def test_every_cached_image_pulls_while_upstream_is_down(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    hub.add("library/alpine", "3.19", multiarch_image("offline"))
    hub.add("team/app", "v1", small_image("offline-app", docker=True))
    base = mirror_url(await start_mirror(hub.registry_url, tag_ttl=0))
    refs = (("library/alpine", "3.19"), ("team/app", "v1"))
    before = [await pull(http, base, name, tag) for name, tag in refs]
    hub.down = True
    for (name, tag), expected in zip(refs, before, strict=True):
        assert await pull(http, base, name, tag) == expected


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_revalidation_errors_serve_the_cached_tag(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession, status: int
) -> None:
    image = small_image(f"stale{status}")
    hub.add("library/alpine", "3.19", image)
    base = mirror_url(await start_mirror(hub.registry_url, tag_ttl=0))
    await pull(http, base, "library/alpine", "3.19")
    hub.fail_statuses = [status] * 3
    status_code, headers, _ = await get(
        http, f"{base}/v2/library/alpine/manifests/3.19", Accept=ALL_TYPES
    )
    assert status_code == 200 and headers["Docker-Content-Digest"] == image.digest


async def test_ten_concurrent_clients_of_a_new_blob_cause_one_upstream_get(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image = make_image([{"big.bin": random_bytes(50 * MiB, 7)}])
    layer = image.layers()[0]
    hub.add("team/big", "v1", image)
    hub.slow = 0.001  # keep the fetch in flight while the ten arrive
    base = mirror_url(await start_mirror(hub.registry_url))
    url = f"{base}/v2/team/big/blobs/{layer.digest}"

    async def one() -> str:
        async with http.get(url) as resp:
            assert resp.status == 200
            h = hashlib.sha256()
            async for chunk in resp.content.iter_chunked(1 << 20):
                h.update(chunk)
            return "sha256:" + h.hexdigest()

    digests = await asyncio.gather(*(one() for _ in range(10)))
    assert digests == [layer.digest] * 10
    assert len(hub.blob_gets(layer.digest)) == 1


async def test_concurrent_pulls_of_a_new_tag_cause_one_manifest_get(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    hub.add("library/alpine", "3.19", small_image("coalesce"))
    base = mirror_url(await start_mirror(hub.registry_url))
    results = await asyncio.gather(
        *(
            get(http, f"{base}/v2/library/alpine/manifests/3.19", Accept=ALL_TYPES)
            for _ in range(10)
        )
    )
    assert {r[0] for r in results} == {200}
    assert len(hub.manifest_gets()) == 1
    assert len(hub.requests("token")) == 1


async def test_upstream_cut_mid_blob_is_resumed_invisibly(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image = make_image([{"big.bin": random_bytes(5 * MiB, 3)}])
    layer = image.layers()[0]
    hub.add("team/resume", "v1", image)
    hub.cut_after, hub.cuts_left = 1 * MiB, 1
    base = mirror_url(await start_mirror(hub.registry_url))
    status, _, data = await get(http, f"{base}/v2/team/resume/blobs/{layer.digest}")
    assert status == 200 and data == layer.data
    gets = hub.blob_gets(layer.digest)
    assert len(gets) == 2
    assert gets[1].headers["Range"].startswith("bytes=") and gets[1].headers["Range"] != "bytes=0-"


async def test_expired_cdn_url_is_replaced_by_a_fresh_redirect(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image = small_image("cdn403")
    layer = image.layers()[0]
    hub.add("team/cdn", "v1", image)
    hub.expire_cdn_once.add(layer.digest)
    base = mirror_url(await start_mirror(hub.registry_url))
    status, _, data = await get(http, f"{base}/v2/team/cdn/blobs/{layer.digest}")
    assert status == 200 and data == layer.data
    assert len(hub.requests("registry", "GET", f"/blobs/{layer.digest}")) == 2


async def test_corrupt_blob_aborts_client_and_caches_nothing(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    image = make_image([{"big.bin": random_bytes(2 * MiB, 5)}])
    layer = image.layers()[0]
    hub.add("team/bad", "v1", image)
    hub.corrupt.add(layer.digest)
    server = await start_mirror(hub.registry_url)
    base = mirror_url(server)
    url = f"{base}/v2/team/bad/blobs/{layer.digest}"
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(url) as resp:
            await resp.read()
    blob_file = tmp_path / "mirror-data" / "blobs" / "sha256" / layer.digest[7:9] / layer.digest[7:]
    assert not blob_file.exists()
    assert list((tmp_path / "mirror-data" / "tmp").iterdir()) == []
    hub.corrupt.clear()
    status, _, data = await get(http, url)
    assert status == 200 and data == layer.data


async def test_client_that_disconnects_does_not_cancel_the_fetch(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    image = make_image([{"big.bin": random_bytes(8 * MiB, 9)}])
    layer = image.layers()[0]
    hub.add("team/leave", "v1", image)
    hub.slow = 0.002
    base = mirror_url(await start_mirror(hub.registry_url))
    url = f"{base}/v2/team/leave/blobs/{layer.digest}"
    resp = await http.get(url)
    await resp.content.read(100_000)
    resp.close()  # the only client goes away mid-blob
    blob_file = tmp_path / "mirror-data" / "blobs" / "sha256" / layer.digest[7:9] / layer.digest[7:]
    for _ in range(300):
        if blob_file.exists():
            break
        await asyncio.sleep(0.05)
    assert blob_file.read_bytes() == layer.data
    status, _, data = await get(http, url)
    assert status == 200 and data == layer.data
    assert len(hub.blob_gets(layer.digest)) == 1


async def test_ranges_on_cached_blobs(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image = small_image("range")
    blob = image.layers()[0]
    size = len(blob.data)
    hub.add("team/range", "v1", image)
    base = mirror_url(await start_mirror(hub.registry_url))
    url = f"{base}/v2/team/range/blobs/{blob.digest}"
    assert (await get(http, url))[0] == 200
    status, headers, body = await get(http, url, Range="bytes=10-")
    assert status == 206 and body == blob.data[10:]
    assert headers["Content-Range"] == f"bytes 10-{size - 1}/{size}"
    status, headers, body = await get(http, url, Range="bytes=0-9")
    assert status == 206 and body == blob.data[:10]
    status, headers, body = await get(http, url, Range=f"bytes={size}-")
    assert status == 416 and headers["Content-Range"] == f"bytes */{size}"
    assert json.loads(body)["errors"][0]["code"] == "RANGE_INVALID"
    status, headers, body = await get(http, url, Range="bytes=0-1,5-9")
    assert status == 200 and body == blob.data and "Content-Range" not in headers


async def test_range_request_on_a_cold_blob_joins_the_fetch(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image = make_image([{"big.bin": random_bytes(3 * MiB, 11)}])
    layer = image.layers()[0]
    hub.add("team/coldrange", "v1", image)
    base = mirror_url(await start_mirror(hub.registry_url))
    url = f"{base}/v2/team/coldrange/blobs/{layer.digest}"
    (s1, _, full), (s2, h2, part) = await asyncio.gather(
        get(http, url), get(http, url, Range="bytes=1000-")
    )
    assert (s1, s2) == (200, 206)
    assert full == layer.data and part == layer.data[1000:]
    assert h2["Content-Range"] == f"bytes 1000-{len(layer.data) - 1}/{len(layer.data)}"
    assert len(hub.blob_gets(layer.digest)) == 1


async def test_etag_revalidation_answers_304(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image = small_image("etag")
    hub.add("team/etag", "v1", image)
    base = mirror_url(await start_mirror(hub.registry_url))
    status, _, _ = await get(
        http,
        f"{base}/v2/team/etag/manifests/v1",
        Accept=ALL_TYPES,
        **{"If-None-Match": f'"{image.digest}"'},
    )
    assert status == 304


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
async def test_push_and_delete_answer_405_unsupported(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession, method: str
) -> None:
    base = mirror_url(await start_mirror(hub.registry_url))
    for path in ("/v2/library/alpine/manifests/3.19", "/v2/library/alpine/blobs/uploads/", "/v2/"):
        async with http.request(method, f"{base}{path}") as resp:
            assert resp.status == 405
            assert (await resp.json())["errors"][0]["code"] == "UNSUPPORTED"
    assert hub.log == []


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/Library/Alpine/manifests/3.19", 400, "NAME_INVALID"),
        ("/v2/library/../etc/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/library/%2E%2E/x/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/library/alpine/manifests/bad!tag", 404, "MANIFEST_UNKNOWN"),
        ("/v2/library/alpine/manifests/.INVALID", 404, "MANIFEST_UNKNOWN"),
        ("/v2/library/alpine/blobs/sha256:abc", 400, "DIGEST_INVALID"),
        ("/v2/library/alpine/blobs/md5:" + "a" * 32, 400, "DIGEST_INVALID"),
        ("/v2/library/alpine/manifests/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
        ("/v2/library/alpine/nothing", 404, "NAME_UNKNOWN"),
        ("/v2/library/alpine/manifests/latest?ns=quay.io", 404, "NAME_UNKNOWN"),
    ],
)
async def test_invalid_requests_get_clear_client_errors(
    hub: FakeHub,
    start_mirror: StartMirror,
    http: aiohttp.ClientSession,
    path: str,
    status: int,
    code: str,
) -> None:
    base = mirror_url(await start_mirror(hub.registry_url))
    async with http.get(URL(f"{base}{path}", encoded=True)) as resp:  # sent as written
        assert resp.status == status
        assert (await resp.json())["errors"][0]["code"] == code
    assert hub.log == []


async def test_unknown_manifest_and_blob_are_404(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    hub.add("library/alpine", "3.19", small_image("known"))
    base = mirror_url(await start_mirror(hub.registry_url))
    status, _, body = await get(http, f"{base}/v2/library/alpine/manifests/nope", Accept=ALL_TYPES)
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    status, _, body = await get(http, f"{base}/v2/library/alpine/blobs/sha256:{'0' * 64}")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"


async def test_tokens_are_cached_per_scope(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    hub.add("library/alpine", "3.19", multiarch_image("tokens"))
    base = mirror_url(await start_mirror(hub.registry_url))
    await pull(http, base, "library/alpine", "3.19")
    await pull(http, base, "library/alpine", "3.19")
    assert len(hub.requests("token")) == 1


async def test_private_repository_is_never_served_to_anonymous_clients(
    hub: FakeHub,
    start_mirror: StartMirror,
    start_admin: StartAdmin,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    image = small_image("private")
    hub.add("acme/secret", "v1", image, private=True)
    hub.add("acme/open", "v1", public := small_image("open"))
    anon = mirror_url(await start_mirror(hub.registry_url, data=tmp_path / "a"))
    status, _, body = await get(http, f"{anon}/v2/acme/secret/manifests/v1", Accept=ALL_TYPES)
    assert status == 401 and json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    # With the account's credentials the mirror can fetch it, and still serves it to no one.
    server = await start_mirror(
        hub.registry_url, data=tmp_path / "b", username="hubuser", password="hubpass"
    )
    authed = mirror_url(server)
    admin = str((await start_admin(server)).make_url("")).rstrip("/")
    async with http.post(f"{admin}/admin/pin", json={"image": "acme/secret:v1"}) as resp:
        assert resp.status == 200, await resp.text()  # the operator cached it on purpose
    token_calls = [r for r in hub.requests("token") if "Authorization" in r.headers]
    assert token_calls, "credentials were sent to the registry's own token service"
    layer = image.layers()[0].digest
    for path in ("manifests/v1", f"manifests/{image.digest}", f"blobs/{layer}", "tags/list"):
        status, _, body = await get(http, f"{authed}/v2/acme/secret/{path}", Accept=ALL_TYPES)
        assert status == 401, (path, status)
        assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
        assert image.top.data not in body and b"secret" not in body.replace(b"acme/secret", b"")
    assert public.digest in await pull(http, authed, "acme/open", "v1")


async def test_upstream_429_is_relayed_with_retry_after(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    hub.add("library/alpine", "3.19", small_image("ratelimited"))
    base = mirror_url(await start_mirror(hub.registry_url))
    hub.fail_statuses = [429]
    status, headers, body = await get(
        http, f"{base}/v2/library/alpine/manifests/3.19", Accept=ALL_TYPES
    )
    assert status == 429 and headers["Retry-After"] == hub.retry_after
    assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"


async def test_docker_list_by_tag_for_a_client_without_list_support(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image = multiarch_image("narrow", docker=True)
    hub.add("library/alpine", "3.19", image)
    base = mirror_url(await start_mirror(hub.registry_url))
    status, headers, body = await get(
        http, f"{base}/v2/library/alpine/manifests/3.19", Accept=DOCKER_MANIFEST
    )
    assert status == 200
    assert body == image.platform_manifest("amd64").data
    # the narrow client did not poison the tag: a full client still gets the list
    status, headers, body = await get(
        http, f"{base}/v2/library/alpine/manifests/3.19", Accept=ALL_TYPES
    )
    assert headers["Content-Type"] == DOCKER_LIST and body == image.top.data


async def test_oci_index_is_unknown_to_a_client_that_does_not_accept_it(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    hub.add("library/alpine", "3.19", multiarch_image("ocinarrow"))
    base = mirror_url(await start_mirror(hub.registry_url))
    status, _, body = await get(
        http, f"{base}/v2/library/alpine/manifests/3.19", Accept=DOCKER_MANIFEST
    )
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    upstream_accept = hub.manifest_gets()[0].headers["Accept"]
    assert OCI_INDEX in upstream_accept and DOCKER_LIST in upstream_accept


async def test_tags_list_pages_through_the_mirror(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image = small_image("tags")
    for tag in ("a", "b", "c", "d", "e"):
        hub.add("team/tags", tag, image)
    base = mirror_url(await start_mirror(hub.registry_url))
    status, headers, body = await get(http, f"{base}/v2/team/tags/tags/list?n=2")
    assert status == 200 and json.loads(body)["tags"] == ["a", "b"]
    assert headers["Link"] == '</v2/team/tags/tags/list?last=b&n=2>; rel="next"'
    status, headers, body = await get(http, f"{base}/v2/team/tags/tags/list?last=b&n=2")
    assert json.loads(body)["tags"] == ["c", "d"]


async def test_cached_tags_are_listed_when_upstream_is_down(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    hub.add("team/tags", "v1", small_image("offline-tags"))
    base = mirror_url(await start_mirror(hub.registry_url))
    await pull(http, base, "team/tags", "v1")
    hub.down = True
    status, _, body = await get(http, f"{base}/v2/team/tags/tags/list")
    assert status == 200 and json.loads(body)["tags"] == ["v1"]


async def test_upstream_down_on_a_miss_is_503_unavailable(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    base = mirror_url(await start_mirror(hub.registry_url))
    hub.down = True
    status, _, body = await get(http, f"{base}/v2/library/alpine/manifests/3.19", Accept=ALL_TYPES)
    assert status == 503 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"


async def test_large_layer_pulls_through(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    """A smoke test of the size class the benchmarks use; correctness only."""
    image = big_image("huge", 64 * MiB, seed=2)
    hub.add("team/huge", "v1", image)
    base = mirror_url(await start_mirror(hub.registry_url))
    got = await pull(http, base, "team/huge", "v1")
    assert set(got) >= set(image.blobs)


async def test_eight_concurrent_cold_pulls_cross_the_internet_once(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image = big_image("eight", 32 * MiB, seed=12)
    hub.add("team/eight", "v1", image)
    hub.slow = 0.0005  # the pulls overlap, as on a real link
    base = mirror_url(await start_mirror(hub.registry_url))
    results = await asyncio.gather(*(pull(http, base, "team/eight", "v1") for _ in range(8)))
    assert all(set(r) == {image.digest, *image.blobs} for r in results)
    assert hub.cdn_bytes <= 1.02 * image.blob_bytes
    assert len(hub.manifest_gets()) == 1
    assert len(hub.requests("token")) <= 2


async def test_token_service_down_is_a_clean_503_and_cached_tags_stay_served(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    hub.add("library/alpine", "3.19", image := small_image("tokens-down"))
    base = mirror_url(await start_mirror(hub.registry_url, tag_ttl=0))
    hub.add("library/busybox", "1", small_image("never-cached"))
    assert image.digest in await pull(http, base, "library/alpine", "3.19")
    hub.token_down = True
    status, _, body = await get(http, f"{base}/v2/library/busybox/manifests/1", Accept=ALL_TYPES)
    assert status == 503 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    # The cached tag is expired (tag_ttl 0): revalidated with the still-valid cached token, or
    # served stale; either way it is served.
    status, headers, body = await get(
        http, f"{base}/v2/library/alpine/manifests/3.19", Accept=ALL_TYPES
    )
    assert status == 200 and body == image.top.data
    assert headers["X-Mirror-Cache"] in ("hit", "stale")


@pytest.mark.parametrize("answer", [b"not json", b"[" * 100_000 + b"]" * 100_000])
async def test_a_token_service_answering_no_json_is_a_clean_503(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession, answer: bytes
) -> None:
    """Nested past the parser's depth, a token answer once raised RecursionError: a 500."""
    hub.add("library/busybox", "1", small_image("no-token"))
    base = mirror_url(await start_mirror(hub.registry_url))
    hub.token_body = answer
    status, _, body = await get(http, f"{base}/v2/library/busybox/manifests/1", Accept=ALL_TYPES)
    assert status == 503 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"


async def test_upstream_downloads_beyond_the_cap_wait_their_turn(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    blobs = [make_image([{f"f{n}": random_bytes(MiB, 70 + n)}], label=f"cap{n}") for n in range(6)]
    for n, image in enumerate(blobs):
        hub.add(f"team/cap{n}", "v1", image)
    base = mirror_url(await start_mirror(hub.registry_url, max_upstream_fetches=2))
    hub.slow = 0.005
    answers = await asyncio.gather(
        *(get(http, f"{base}/v2/team/cap{n}/blobs/{image.layers()[0].digest}")
          for n, image in enumerate(blobs))
    )  # fmt: skip
    for (status, _, body), image in zip(answers, blobs, strict=True):
        assert status == 200 and body == image.layers()[0].data
    assert hub.cdn_peak == 2, f"{hub.cdn_peak} upstream transfers at once with a cap of 2"


async def test_a_download_queued_behind_the_cap_sends_its_headers_within_seconds(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    """containerd gives up on a response without headers after 30 s: a download waiting for
    a slot answers with headers (size from an upstream HEAD) while it waits."""
    first = make_image([{"first": random_bytes(MiB, 91)}], label="first")
    queued = make_image([{"queued": random_bytes(MiB, 92)}], label="queued")
    hub.add("team/first", "v1", first)
    hub.add("team/queued", "v1", queued)
    base = mirror_url(await start_mirror(hub.registry_url, max_upstream_fetches=1))
    hub.slow = 0.3  # 16 chunks of 64 KiB: the first download holds the only slot for ~5 s
    holder = asyncio.create_task(
        get(http, f"{base}/v2/team/first/blobs/{first.layers()[0].digest}")
    )
    await asyncio.sleep(0.2)
    started = asyncio.get_running_loop().time()
    layer = queued.layers()[0]
    async with http.get(f"{base}/v2/team/queued/blobs/{layer.digest}") as resp:
        waited = asyncio.get_running_loop().time() - started
        assert resp.status == 200 and resp.content_length == len(layer.data)
        assert not holder.done(), "the first download ended before the queued one's headers"
        hub.slow = 0
        assert await resp.read() == layer.data
    assert 1.5 < waited < 3.5, f"headers after {waited:.1f} s"
    assert (await holder)[2] == first.layers()[0].data
    assert len(hub.requests("registry", "HEAD", f"/blobs/{layer.digest}")) == 1
    assert hub.cdn_peak == 1


async def test_a_silent_upstream_is_dropped_and_resumed(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    image = make_image([{"stall.bin": random_bytes(3 * MiB, 81)}])
    layer = image.layers()[0]
    hub.add("team/stall", "v1", image)
    base = mirror_url(await start_mirror(hub.registry_url, upstream_read_timeout=0.5))
    hub.stall_after, hub.stalls_left = 1 * MiB, 1
    status, _, body = await get(http, f"{base}/v2/team/stall/blobs/{layer.digest}")
    assert status == 200 and body == layer.data
    ranges = [r.headers.get("Range") for r in hub.blob_gets(layer.digest)]
    assert len(ranges) == 2 and ranges[1] and ranges[1].startswith("bytes=")


async def test_a_cdn_that_keeps_failing_is_a_clean_error_and_caches_nothing(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    image = make_image([{"broken.bin": random_bytes(MiB, 82)}])
    layer = image.layers()[0]
    hub.add("team/broken", "v1", image)
    data = tmp_path / "mirror-data"
    base = mirror_url(await start_mirror(hub.registry_url, data=data))
    hub.cdn_broken.add(layer.digest)
    status, _, body = await get(http, f"{base}/v2/team/broken/blobs/{layer.digest}")
    assert status == 503 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    assert not any(layer.digest[7:] in p.name for p in data.rglob("*"))
    hub.cdn_broken.clear()  # and once it recovers, the blob pulls
    status, _, body = await get(http, f"{base}/v2/team/broken/blobs/{layer.digest}")
    assert status == 200 and body == layer.data
