"""An outside review of hosted namespaces, private = "members" and docker search: each test
asserts what the README promises (or what a registry must do), so a failing test is a finding.

Findings are marked FINDING in the test's docstring; the others are attacks that held up."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiohttp
import pytest

from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import (
    OCI_CONFIG,
    OCI_MANIFEST,
    Blob,
    big_image,
    random_bytes,
    sha256,
    small_image,
)
from tests.fixtures.procs import http_push, mirror_process, skopeo_pull_and_verify
from tests.integration.test_client_auth import basic, write_htpasswd
from tests.integration.test_pull_path import ALL_TYPES

ALICE = basic("alice", "wonderland")
BOB = basic("bob", "builder")


def review_config(tmp_path: Path, extra: str = "") -> Path:
    htpasswd = write_htpasswd(tmp_path, alice="wonderland", bob="builder")
    path = tmp_path / "mirror.toml"
    path.write_text(
        f'auth_htpasswd = "{htpasswd}"\n'
        "anonymous_pull = true\n"
        '[hosted."acme"]\npush = ["alice", "bob"]\n'
        '[hosted."secret"]\npull = ["bob"]\n' + extra
    )
    return path


async def hosted_bytes(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    match = re.search(r"^mirror_hosted_bytes (\S+)$", text, re.M)
    assert match, "no mirror_hosted_bytes gauge"
    return float(match[1])


async def open_session(http: aiohttp.ClientSession, url: str, name: str) -> str:
    async with http.post(f"{url}/v2/{name}/blobs/uploads/") as resp:
        assert resp.status == 202, await resp.text()
        location = resp.headers["Location"]
    return location if location.startswith("http") else url + location


# --- quota -------------------------------------------------------------------------------


async def test_a_session_cannot_grow_past_the_quota_patch_by_patch(
    hub: FakeHub, tmp_path: Path
) -> None:
    """FINDING: `append` compares each request's bytes with the room left, not the session's
    total, so a session grows by a whole quota per PATCH: with hosted_max_size 500KB, four
    PATCHes of 300KB put 1.2MB on the mirror's disk (<data>/uploads), kept for an hour."""
    config = review_config(tmp_path)
    chunk = random_bytes(300_000, seed=7)
    async with (
        mirror_process(
            tmp_path / "data", hub.registry_url, "--config", str(config),
            "--hosted-max-size", "500KB",
        ) as m,
        aiohttp.ClientSession(headers={"Authorization": ALICE}) as http,
    ):  # fmt: skip
        location = await open_session(http, m.url, "acme/app")
        statuses = []
        for _ in range(4):
            async with http.patch(location, data=chunk) as resp:
                statuses.append(resp.status)
                if resp.status == 202:
                    location = resp.headers["Location"]
                    location = location if location.startswith("http") else m.url + location
        on_disk = sum(p.stat().st_size for p in (tmp_path / "data" / "uploads").glob("*.data"))
        assert statuses[0] == 202
        assert 403 in statuses, f"every PATCH taken: {statuses}, {on_disk} bytes on disk"
        assert on_disk <= 500_000, f"{on_disk} bytes held by one session under a 500KB quota"


async def test_a_mount_from_the_cache_counts_against_the_quota(
    hub: FakeHub, tmp_path: Path
) -> None:
    """FINDING: `mount` pins a cached blob under hosted with no look at the room left (and
    `commit_upload` skips the check for any blob already stored): with hosted_max_size
    500KB, one mount of a cached 1 MB Docker Hub layer is 201 and the hosted account then
    holds twice its quota, pinned against eviction."""
    base = big_image("python", 1_000_000, seed=3)
    hub.add("library/python", "3", base)
    layer = base.layers()[0]
    config = review_config(tmp_path)
    async with (
        mirror_process(
            tmp_path / "data", hub.registry_url, "--config", str(config),
            "--hosted-max-size", "500KB",
        ) as m,
        aiohttp.ClientSession(headers={"Authorization": ALICE}) as http,
    ):  # fmt: skip
        host = m.url.removeprefix("http://")
        await skopeo_pull_and_verify(f"{host}/library/python:3", tmp_path / "base", base)
        url = f"{m.url}/v2/acme/app/blobs/uploads/?mount={layer.digest}&from=library/python"
        async with http.post(url) as resp:
            status = resp.status
        # Any upload reads the room again, which sets the mirror_hosted_bytes gauge.
        tiny = b"tiny"
        async with http.post(
            f"{m.url}/v2/acme/app/blobs/uploads/?digest={sha256(tiny)}", data=tiny
        ) as resp:
            pass
        used = await hosted_bytes(http, m.url)
        assert status != 201 and used <= 500_000, (status, used)


async def test_an_image_manifest_naming_a_manifest_does_not_unpin_that_image(
    hub: FakeHub, tmp_path: Path
) -> None:
    """FINDING: put_manifest drops the pins under each child's own digest ("the blobs' own
    pins are this manifest's now"). When a child of an image manifest is a manifest of the
    repository (holds() counts manifests), that drops the child image's whole pin group:
    its layers leave the hosted account (quota bypass) and become evictable cache."""
    first = big_image("first", 300_000, seed=11)
    config_blob = Blob(OCI_CONFIG, b'{"architecture":"amd64","os":"linux"}')
    wrapper = Blob(
        OCI_MANIFEST,
        json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": config_blob.descriptor(),
            "layers": [first.top.descriptor()],
        }).encode(),
    )  # fmt: skip
    filler = random_bytes(300_000, seed=12)
    config = review_config(tmp_path)
    async with (
        mirror_process(
            tmp_path / "data", hub.registry_url, "--config", str(config),
            "--hosted-max-size", "500KB",
        ) as m,
        aiohttp.ClientSession(headers={"Authorization": ALICE}) as http,
    ):  # fmt: skip
        await http_push(m.url, "acme/app", "1", first, ("alice", "wonderland"))
        before = await hosted_bytes(http, m.url)
        uploads = f"{m.url}/v2/acme/app/blobs/uploads/"
        async with http.post(f"{uploads}?digest={config_blob.digest}", data=config_blob.data) as r:
            assert r.status == 201
        async with http.put(
            f"{m.url}/v2/acme/app/manifests/2", data=wrapper.data,
            headers={"Content-Type": OCI_MANIFEST},
        ) as resp:  # fmt: skip
            assert resp.status == 201, await resp.text()
        # The first image is still there, so its 300 KB still count: 300 KB more cannot fit.
        async with http.post(f"{uploads}?digest={sha256(filler)}", data=filler) as resp:
            status = resp.status
        after = await hosted_bytes(http, m.url)
        assert status == 403, f"quota bypassed: hosted bytes {before} -> {after}"
        assert after >= before


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_concurrent_uploads_cannot_pass_the_quota(
    hub: FakeHub, tmp_path: Path, workers: str
) -> None:
    """FINDING (race, even with one worker): commit_upload reads the room and pins the digest
    under the quota lock, but the room is `pinned_bytes`, the sizes of pinned digests *with
    a blob row*, and the row is only written by `_store_file` after the lock is released.
    Every commit in between sees the same room: 12 concurrent 300KB blobs against a 1MB
    quota take 6 (1.8MB). Across workers the asyncio.Lock does not serialise either."""
    config = review_config(tmp_path)
    blobs = [random_bytes(300_000, seed=100 + i) for i in range(12)]
    async with mirror_process(
        tmp_path / "data", hub.registry_url, "--config", str(config),
        "--hosted-max-size", "1MB", "--workers", workers,
    ) as m:  # fmt: skip

        async def one(data: bytes, name: str) -> int:
            async with (
                aiohttp.ClientSession(headers={"Authorization": ALICE}) as http,
                http.post(
                    f"{m.url}/v2/{name}/blobs/uploads/?digest={sha256(data)}", data=data
                ) as resp,
            ):
                return resp.status

        for attempt in range(4):
            statuses = await asyncio.gather(*(one(b, f"acme/r{attempt}") for b in blobs))
            async with aiohttp.ClientSession() as http:
                used = await hosted_bytes(http, m.url)
            assert used <= 1_000_000, f"attempt {attempt}: {statuses}, hosted bytes {used}"
            if attempt == 0:
                assert statuses.count(201) <= 3, statuses
            # free everything for the next attempt
            async with (
                aiohttp.ClientSession() as http,
                http.post(f"{m.admin}/admin/gc", json={"grace": "0s"}) as resp,
            ):
                assert resp.status == 200


# --- bad input ---------------------------------------------------------------------------


async def test_a_content_range_with_huge_numbers_is_416_not_500(
    hub: FakeHub, tmp_path: Path
) -> None:
    """FINDING: `_content_range_start` calls int() on any run of digits: past 4300 digits
    Python raises ValueError (int max str digits), an unhandled 500."""
    config = review_config(tmp_path)
    async with (
        mirror_process(tmp_path / "data", hub.registry_url, "--config", str(config)) as m,
        aiohttp.ClientSession(headers={"Authorization": ALICE}) as http,
    ):
        location = await open_session(http, m.url, "acme/app")
        huge = "9" * 5000
        async with http.patch(location, data=b"x", headers={"Content-Range": f"0-{huge}"}) as resp:
            assert resp.status == 416, (resp.status, await resp.text())
        # Past 8190 bytes the header line itself is refused by the HTTP parser: 400.
        async with http.patch(
            location, data=b"x", headers={"Content-Range": f"{huge}-{huge}"}
        ) as resp:
            assert resp.status == 400, (resp.status, await resp.text())
        async with http.patch(
            location, data=b"x", headers={"Content-Range": f"{huge[:4000]}-{huge[:4000]}"}
        ) as resp:
            assert resp.status == 416, (resp.status, await resp.text())


async def test_two_puts_closing_one_session_never_answer_500(hub: FakeHub, tmp_path: Path) -> None:
    """FINDING (race): commit_upload hashes the session's file, then stats it again
    (`upload.size`) and reads it again (`_store_file`): a second PUT (or a DELETE) of the
    same session that removes it in between makes that a FileNotFoundError, a 500."""
    config = review_config(tmp_path)
    data = random_bytes(32 << 20, seed=5)
    digest = sha256(data)
    async with (
        mirror_process(tmp_path / "data", hub.registry_url, "--config", str(config)) as m,
        aiohttp.ClientSession(headers={"Authorization": ALICE}) as http,
    ):
        seen: list[int] = []
        for _ in range(6):
            location = await open_session(http, m.url, "acme/app")
            async with http.patch(location, data=data) as resp:
                assert resp.status == 202
                location = resp.headers["Location"]
                location = location if location.startswith("http") else m.url + location

            async def put(location: str) -> int:
                async with http.put(f"{location}?digest={digest}") as resp:
                    return resp.status

            async def delete(location: str) -> int:
                await asyncio.sleep(0.02)
                async with http.delete(location) as resp:
                    return resp.status

            seen += await asyncio.gather(put(location), put(location), delete(location))
        assert 500 not in seen, seen


# --- held up -----------------------------------------------------------------------------


async def test_an_image_manifest_naming_a_manifest_leaves_that_image_evictable(
    hub: FakeHub, tmp_path: Path
) -> None:
    """FINDING (same cause as the quota bypass above, its worse consequence): once the
    wrapper manifest dropped the first image's pins, Docker Hub pulls past --max-size evict
    the first image's layer, and the hosted image acme/app:1, never to be evicted, is gone."""
    first = big_image("first", 1 << 20, seed=21)
    config_blob = Blob(OCI_CONFIG, b'{"architecture":"amd64","os":"linux"}')
    wrapper = Blob(
        OCI_MANIFEST,
        json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": config_blob.descriptor(), "layers": [first.top.descriptor()],
        }).encode(),
    )  # fmt: skip
    fillers = [big_image(f"filler-{i}", 1 << 20, seed=30 + i) for i in range(5)]
    for i, filler in enumerate(fillers):
        hub.add("library/filler", str(i), filler)
    config = review_config(tmp_path)
    data = tmp_path / "data"
    async with mirror_process(
        data, hub.registry_url, "--config", str(config), "--max-size", "3MiB", "--workers", "1"
    ) as m:
        await http_push(m.url, "acme/app", "1", first, ("alice", "wonderland"))
        async with aiohttp.ClientSession(headers={"Authorization": ALICE}) as http:
            uploads = f"{m.url}/v2/acme/app/blobs/uploads/"
            async with http.post(
                f"{uploads}?digest={config_blob.digest}", data=config_blob.data
            ) as resp:
                assert resp.status == 201
            async with http.put(
                f"{m.url}/v2/acme/app/manifests/wrapper", data=wrapper.data,
                headers={"Content-Type": OCI_MANIFEST},
            ) as resp:  # fmt: skip
                assert resp.status == 201, await resp.text()
        host = m.url.removeprefix("http://")
        for i, filler in enumerate(fillers):
            await skopeo_pull_and_verify(f"{host}/library/filler:{i}", tmp_path / f"f{i}", filler)
        big = first.layers()[0].digest
        path = data / "blobs" / "sha256" / big[7:9] / big[7:]
        await asyncio.sleep(2)  # eviction passes run in the background
        assert path.exists(), "the hosted image's layer was evicted"
        await skopeo_pull_and_verify(f"{host}/acme/app:1", tmp_path / "kept", first)


async def test_immutable_tags_stay_whole_when_a_child_manifest_is_deleted(
    hub: FakeHub, tmp_path: Path
) -> None:
    """FINDING: with immutable_tags, refuse_untagging only asks whether a tag names the digest
    itself: the platform manifest under a tagged (immutable) index is deleted with 202, and
    the immutable tag then names an image that no longer pulls."""
    from tests.fixtures.images import multiarch_image

    image = multiarch_image("frozen")
    config = review_config(tmp_path, '[hosted."frozen"]\nimmutable_tags = true\n')
    async with mirror_process(tmp_path / "data", hub.registry_url, "--config", str(config)) as m:
        await http_push(m.url, "frozen/app", "1.0", image, ("alice", "wonderland"))
        child = image.platform_manifest("amd64").digest
        async with aiohttp.ClientSession(headers={"Authorization": ALICE}) as http:
            async with http.delete(f"{m.url}/v2/frozen/app/manifests/{child}") as resp:
                status = resp.status
            async with http.get(
                f"{m.url}/v2/frozen/app/manifests/{child}", headers={"Accept": ALL_TYPES}
            ) as resp:
                still = resp.status
        assert status == 403 and still == 200, (status, still)


async def test_immutable_tags_do_not_move_under_concurrent_pushes(
    hub: FakeHub, tmp_path: Path
) -> None:
    """FINDING (race): refuse_moving reads the tag, then put_manifest sets it much later with
    no condition: two pushes of different images to one new immutable tag both get 201 and
    the tag moves from the first to the second."""
    images = [small_image(f"racer-{i}", layers=1) for i in range(2)]
    config = review_config(tmp_path, '[hosted."frozen"]\nimmutable_tags = true\n')
    async with mirror_process(tmp_path / "data", hub.registry_url, "--config", str(config)) as m:
        for image in images:  # blobs first, so only the manifest puts race
            await http_push(m.url, "frozen/app", "seed-" + image.digest[7:15], image,
                            ("alice", "wonderland"))  # fmt: skip
        async with aiohttp.ClientSession(headers={"Authorization": ALICE}) as http:

            async def put(tag: str, image: object) -> int:
                async with http.put(
                    f"{m.url}/v2/frozen/app/manifests/{tag}", data=image.top.data,  # type: ignore[attr-defined]
                    headers={"Content-Type": OCI_MANIFEST},
                ) as resp:  # fmt: skip
                    return resp.status

            both = []
            for round_ in range(20):
                tag = f"v{round_}"
                statuses = await asyncio.gather(*(put(tag, image) for image in images))
                both.append(statuses)
            assert all(sorted(s) == [201, 403] for s in both), both


async def test_held_up_hosted_reads_sessions_and_mounts(hub: FakeHub, tmp_path: Path) -> None:
    """Attacks that held up: bob's restricted `secret` namespace read by anonymous clients and
    by alice through every door (manifest, blob, tags, referrers, catalog, search, web page,
    the hit path with Docker Hub's same-named repository in memory, the cache's names, ?ns=),
    mounts from it, and upload sessions guessed or reused by another user or repository."""
    image = small_image("bobs-secret")
    decoy = small_image("hub-decoy")
    hub.add("secret/app", "1", decoy)  # Docker Hub's secret/app, shadowed by the namespace
    config = review_config(tmp_path)
    async with mirror_process(
        tmp_path / "data", hub.registry_url, "--config", str(config), "--workers", "1"
    ) as m:
        await http_push(m.url, "secret/app", "1", image, ("bob", "builder"))
        layer = image.layers()[0].digest
        async with aiohttp.ClientSession() as http:
            for who in (None, ALICE):
                headers = {"Accept": ALL_TYPES, **({"Authorization": who} if who else {})}
                async with http.get(f"{m.url}/v2/_catalog", headers=headers) as r:
                    assert "secret/app" not in (await r.json())["repositories"]
                async with http.get(f"{m.url}/v1/search?q=secret", headers=headers) as r:
                    assert "secret/app" not in json.dumps(await r.json())
            # Docker Hub's secret/app in the memory cache, by ns=docker.io ...
            url = f"{m.url}/v2/secret/app/manifests/1"
            async with http.get(f"{url}?ns=docker.io", headers={"Accept": ALL_TYPES}) as resp:
                assert resp.status == 200 and await resp.read() == decoy.top.data
            for who in (None, ALICE):
                headers = {"Accept": ALL_TYPES, **({"Authorization": who} if who else {})}
                expected = 401 if who is None else 403
                for path in (
                    "manifests/1", f"manifests/{image.digest}", f"blobs/{layer}", "tags/list",
                    f"referrers/{image.digest}",
                ):  # fmt: skip
                    for _ in range(2):  # ... never answers a hosted name (hit path)
                        async with http.get(f"{m.url}/v2/secret/app/{path}", headers=headers) as r:
                            assert r.status == expected, (who, path, r.status)
                for name in ("secret/app", "acme/app", "library/alpine", "docker.io/secret/app"):
                    async with http.get(f"{m.url}/v2/{name}/blobs/{layer}", headers=headers) as r:
                        assert r.status in (401, 403, 404), (who, name, r.status)
                async with http.get(f"{m.url}/", headers=headers) as r:
                    assert image.digest[7:19] not in await r.text()
                async with http.get(
                    f"{m.url}/image/hosted/secret/app@{image.digest}", headers=headers
                ) as r:
                    assert r.status == 404
            # alice may not mount from secret: a new session, and acme/app holds nothing
            a = {"Authorization": ALICE}
            mount = f"{m.url}/v2/acme/app/blobs/uploads/?mount={layer}&from=secret/app"
            async with http.post(mount, headers=a) as r:
                assert r.status == 202
            async with http.head(f"{m.url}/v2/acme/app/blobs/{layer}", headers=a) as r:
                assert r.status == 404
            # a session is bound to its user and repository
            async with http.post(f"{m.url}/v2/secret/app/blobs/uploads/", headers=a) as r:
                assert r.status == 202
                sid = r.headers["Docker-Upload-UUID"]
            for who, name in ((BOB, "secret/app"), (ALICE, "secret/other"), (ALICE, "acme/app")):
                for method in ("GET", "PATCH", "PUT", "DELETE"):
                    async with http.request(
                        method, f"{m.url}/v2/{name}/blobs/uploads/{sid}?digest={layer}",
                        headers={"Authorization": who}, data=b"x",
                    ) as r:  # fmt: skip
                        assert r.status == 404, (who, name, method, r.status)
            for bad in ("..%2F..%2Findex.db", "%2e%2e", sid + "x", sid[:-1] + ".", "a" * 32):
                async with http.get(f"{m.url}/v2/secret/app/blobs/uploads/{bad}", headers=a) as r:
                    assert r.status in (400, 404), (bad, r.status)


async def test_held_up_members_content_never_reaches_others(hub: FakeHub, tmp_path: Path) -> None:
    """private = "members" beside a hosted namespace: after alice pulls the org's private
    image, anonymous clients, wrong passwords and bob (left out by the table) get nothing,
    not by tag, digest, another name, the catalog, search, the web page, nor by mounting."""
    secret = small_image("org-private")
    public = small_image("org-public")
    hub.add("org/secret", "v1", secret, private=True)
    hub.add("library/alpine", "3", public)
    htpasswd = write_htpasswd(tmp_path, alice="wonderland", bob="builder")
    config = tmp_path / "mirror.toml"
    config.write_text(
        f'auth_htpasswd = "{htpasswd}"\nanonymous_pull = true\n'
        '[hosted."team"]\n'
        '[registries."docker.io"]\nprivate = "members"\n'
        '[registries."docker.io".members]\n"org/*" = ["alice"]\n'
    )
    password = tmp_path / "password"
    password.write_text(hub.password)
    async with mirror_process(
        tmp_path / "data", hub.registry_url, "--config", str(config), "--upstream-username",
        hub.username, "--upstream-password-file", str(password), "--workers", "1",
    ) as m:  # fmt: skip
        host = m.url.removeprefix("http://")
        await skopeo_pull_and_verify(
            f"{host}/org/secret:v1", tmp_path / "alice", secret, creds="alice:wonderland"
        )
        await skopeo_pull_and_verify(f"{host}/library/alpine:3", tmp_path / "anyone", public)
        layer = secret.layers()[0].digest
        async with aiohttp.ClientSession() as http:
            for who in (None, basic("alice", "queen"), BOB):
                headers = {"Accept": ALL_TYPES, **({"Authorization": who} if who else {})}
                for path in ("org/secret/manifests/v1", f"org/secret/manifests/{secret.digest}",
                             f"org/secret/blobs/{layer}", "org/secret/tags/list",
                             f"library/alpine/blobs/{layer}",
                             f"library/alpine/manifests/{secret.digest}",
                             f"team/app/blobs/{layer}"):  # fmt: skip
                    for _ in range(2):
                        async with http.get(f"{m.url}/v2/{path}", headers=headers) as r:
                            assert r.status in (401, 403, 404), (who, path, r.status)
                async with http.get(f"{m.url}/v2/_catalog", headers=headers) as r:
                    assert "org/secret" not in (await r.json())["repositories"]
                async with http.get(f"{m.url}/v1/search?q=secret", headers=headers) as r:
                    assert "org/secret" not in json.dumps(await r.json())
                async with http.get(f"{m.url}/", headers=headers) as r:
                    assert "org/secret" not in await r.text()
                async with http.get(
                    f"{m.url}/image/docker.io/org/secret@{secret.digest}", headers=headers
                ) as r:
                    assert r.status == 404
            # bob may push to team, but not mount the private layer there
            b = {"Authorization": BOB}
            for source in ("org/secret", "library/alpine"):
                async with http.post(
                    f"{m.url}/v2/team/app/blobs/uploads/?mount={layer}&from={source}", headers=b
                ) as r:
                    assert r.status == 202, (source, r.status)
            async with http.get(f"{m.url}/v2/team/app/blobs/{layer}", headers=b) as r:
                assert r.status == 404


async def test_a_shadowed_docker_hub_repository_is_listed_by_a_name_that_reaches_it(
    hub: FakeHub, tmp_path: Path
) -> None:
    """FINDING (low): Docker Hub's `acme/tool`, cached through containerd's ?ns=docker.io,
    is listed by `_catalog`, `/v1/search` and the web page as `acme/tool`, a name the mirror
    routes to the hosted namespace `acme` (README: "every name shown can be pulled as
    mirror.lan:5000/NAME"); a pull of the shown name gets the team's repository or nothing.
    Listed beside a hosted `acme/tool`, both are the same string. `docker.io/acme/tool`
    reaches it."""
    upstream = small_image("hub-tool")
    hub.add("acme/tool", "1", upstream)
    config = review_config(tmp_path)
    async with (
        mirror_process(tmp_path / "data", hub.registry_url, "--config", str(config)) as m,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(
            f"{m.url}/v2/acme/tool/manifests/1?ns=docker.io", headers={"Accept": ALL_TYPES}
        ) as resp:
            assert resp.status == 200
        async with http.get(f"{m.url}/v2/_catalog") as resp:
            listed = (await resp.json())["repositories"]
        async with http.get(f"{m.url}/v1/search?q=tool") as resp:
            shown = [r["name"] for r in (await resp.json())["results"]]
        assert "docker.io/acme/tool" in listed and "docker.io/acme/tool" in shown
        for name in {*listed, *shown}:
            if "tool" not in name:
                continue
            async with http.get(
                f"{m.url}/v2/{name}/manifests/1", headers={"Accept": ALL_TYPES}
            ) as resp:
                assert resp.status == 200, (name, listed, shown, resp.status)
