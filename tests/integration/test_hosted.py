"""Hosted namespaces: the team's own images pushed to the mirror with real clients, served
beside Docker Hub's, never fetched upstream, mounted from the cache, kept out of eviction."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from mirror.cli import _parser, config_from_args, main
from mirror.config import ConfigError, load_config
from tests.fixtures.backends import Backend
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import (
    big_image,
    make_artifact,
    make_image,
    multiarch_image,
    random_bytes,
    sha256,
    small_image,
)
from tests.fixtures.procs import (
    Service,
    http_push,
    mirror_process,
    push,
    skopeo_pull_and_verify,
)
from tests.fixtures.webhooks import Receiver
from tests.integration.test_client_auth import basic, write_htpasswd
from tests.integration.test_operations import mirror_cli
from tests.integration.test_pull_path import ALL_TYPES

pytestmark = pytest.mark.backends("local", "s3")


@contextlib.asynccontextmanager
async def hosted_mirror(hub: FakeHub, tmp_path: Path, *flags: str) -> AsyncIterator[Service]:
    """A mirror of `hub` with hosted_config's namespaces and users alice and bob."""
    htpasswd = write_htpasswd(tmp_path, alice="wonderland", bob="builder")
    config = hosted_config(tmp_path, htpasswd)
    async with mirror_process(
        tmp_path / "data", hub.registry_url, "--config", str(config), *flags
    ) as mirror:
        yield mirror


def hosted_config(tmp_path: Path, htpasswd: Path) -> Path:
    path = tmp_path / "mirror.toml"
    path.write_text(
        f'auth_htpasswd = "{htpasswd}"\n'
        "anonymous_pull = true\n"
        '[hosted."acme"]\npush = ["alice"]\n'
        '[hosted."secret"]\npull = ["bob"]\n'
    )
    return path


@pytest.mark.parametrize("kind", ["oci", "docker", "multiarch"])
async def test_pushed_images_pull_back_byte_for_byte_and_never_reach_upstream(
    hub: FakeHub, tmp_path: Path, kind: str, backend: Backend
) -> None:
    image = {
        "oci": small_image("team-app"),
        "docker": small_image("team-app", docker=True),
        "multiarch": multiarch_image("team-app"),
    }[kind]
    htpasswd = write_htpasswd(tmp_path, alice="wonderland", bob="builder")
    config = hosted_config(tmp_path, htpasswd)
    async with mirror_process(
        tmp_path / "data", hub.registry_url, "--config", str(config), *backend.flags,
        env=backend.env,
    ) as mirror:  # fmt: skip
        await push(mirror, "acme/app:1.0", image, tmp_path / "push", ("alice", "wonderland"))
        host = mirror.url.removeprefix("http://")
        await skopeo_pull_and_verify(f"{host}/acme/app:1.0", tmp_path / "out", image)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{mirror.url}/v2/acme/app/tags/list") as resp:
                assert (await resp.json())["tags"] == ["1.0"]
            async with http.get(f"{mirror.url}/v2/_catalog") as resp:
                assert "acme/app" in (await resp.json())["repositories"]
    assert not [r for r in hub.log if "acme" in r.path], "a hosted name reached upstream"


async def test_push_rights_and_pull_rules_per_namespace(hub: FakeHub, tmp_path: Path) -> None:
    image = small_image("rights")
    async with hosted_mirror(hub, tmp_path) as m:
        alice, bob = basic("alice", "wonderland"), basic("bob", "builder")
        wrong = basic("alice", "queen")

        async def start(name: str, authorization: str | None) -> tuple[int, str]:
            headers = {"Authorization": authorization} if authorization else {}
            async with (
                aiohttp.ClientSession() as http,
                http.post(f"{m.url}/v2/{name}/blobs/uploads/", headers=headers) as resp,
            ):
                body = await resp.json() if resp.status >= 400 else {}
                return resp.status, body["errors"][0]["code"] if body else ""

        assert await start("acme/app", None) == (401, "UNAUTHORIZED")
        assert await start("acme/app", wrong) == (401, "UNAUTHORIZED")
        assert await start("acme/app", bob) == (403, "DENIED")
        assert (await start("acme/app", alice))[0] == 202
        # No push list: every mirror user may push there.
        assert (await start("secret/app", alice))[0] == 202
        # The cache's names stay read-only.
        assert (await start("library/alpine", alice))[0] == 405

        await http_push(m.url, "secret/app", "1", image, ("bob", "builder"))
        url = f"{m.url}/v2/secret/app/manifests/1"
        for authorization, status in ((None, 401), (alice, 403), (wrong, 401), (bob, 200)):
            headers = {"Accept": ALL_TYPES}
            if authorization:
                headers["Authorization"] = authorization
            async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
                assert resp.status == status, (authorization, await resp.text())
        layer = image.layers()[0].digest
        async with aiohttp.ClientSession() as http:
            blob = f"{m.url}/v2/secret/app/blobs/{layer}"
            async with http.get(blob, headers={"Authorization": alice}) as resp:
                assert resp.status == 403
            async with http.get(f"{m.url}/v2/_catalog") as resp:
                assert "secret/app" not in (await resp.json())["repositories"]
            async with http.get(f"{m.url}/v2/_catalog", headers={"Authorization": bob}) as resp:
                assert "secret/app" in (await resp.json())["repositories"]
            # Anyone may pull from acme, which holds none of secret's blobs: no digest leaks.
            async with http.get(f"{m.url}/v2/acme/app/blobs/{layer}") as resp:
                assert resp.status == 404


async def test_base_layers_are_mounted_from_the_cache_not_uploaded(
    hub: FakeHub, tmp_path: Path
) -> None:
    """An image built FROM a cached Docker Hub image: its base layer is mounted from the
    cache (201, no bytes sent), only the team's own layer is uploaded."""
    base_files = {"usr/lib/python3.12/os.py": b"import posix\n" * 500}
    base = make_image([base_files], label="python")
    hub.add("library/python", "3.12", base)
    base_layer = base.layers()[0]
    own = make_image([base_files, {"app/main.py": b"print('team')\n"}], label="team")
    assert own.layers()[0].digest == base_layer.digest
    async with hosted_mirror(hub, tmp_path) as m:
        host = m.url.removeprefix("http://")
        await skopeo_pull_and_verify(f"{host}/library/python:3.12", tmp_path / "base", base)
        alice = {"Authorization": basic("alice", "wonderland")}
        async with aiohttp.ClientSession(headers=alice) as http:
            mount = (
                f"{m.url}/v2/acme/app/blobs/uploads/?mount={base_layer.digest}&from=library/python"
            )
            async with http.post(mount) as resp:
                assert resp.status == 201, await resp.text()
                assert resp.headers["Docker-Content-Digest"] == base_layer.digest
            # A blob the named repository does not hold is not mounted: a new session instead.
            other = own.layers()[1].digest
            async with http.post(
                f"{m.url}/v2/acme/app/blobs/uploads/?mount={other}&from=library/python"
            ) as resp:
                assert resp.status == 202
        before = len(hub.log)
        await http_push(m.url, "acme/app", "1", own, ("alice", "wonderland"))
        assert not [r for r in hub.log[before:] if "acme" in r.path]
        await skopeo_pull_and_verify(f"{host}/acme/app:1", tmp_path / "own", own)


async def test_manifest_naming_a_blob_the_repository_does_not_hold_is_refused(
    hub: FakeHub, tmp_path: Path
) -> None:
    """A layer cached for Docker Hub (or pushed to another hosted repository) exists on this
    mirror, but a manifest in acme/app may name only what was uploaded or mounted there."""
    cached = small_image("cached", layers=1)
    hub.add("library/alpine", "3", cached)
    async with hosted_mirror(hub, tmp_path) as m:
        host = m.url.removeprefix("http://")
        await skopeo_pull_and_verify(f"{host}/library/alpine:3", tmp_path / "cached", cached)
        alice = {"Authorization": basic("alice", "wonderland")}
        async with aiohttp.ClientSession(headers=alice) as http:
            async with http.put(
                f"{m.url}/v2/acme/app/manifests/stolen",
                data=cached.top.data,
                headers={"Content-Type": cached.top.media_type},
            ) as resp:
                assert resp.status == 400
                body = await resp.json()
                assert body["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
            async with http.get(f"{m.url}/v2/acme/app/blobs/{cached.layers()[0].digest}") as resp:
                assert resp.status == 404


async def test_hosted_content_is_never_evicted_and_deletes_answer_404(
    hub: FakeHub, tmp_path: Path
) -> None:
    """Docker Hub pulls well past `max_size` evict cached images, never the hosted one."""
    image = small_image("kept")
    cached = [big_image(f"filler-{i}", 1 << 20, seed=i) for i in range(5)]
    for i, filler in enumerate(cached):
        hub.add("library/filler", str(i), filler)
    htpasswd = write_htpasswd(tmp_path, alice="wonderland", bob="builder")
    config = hosted_config(tmp_path, htpasswd)
    data = tmp_path / "data"
    async with mirror_process(
        data, hub.registry_url, "--config", str(config), "--max-size", "3MiB", "--workers", "1"
    ) as m:
        await http_push(m.url, "acme/app", "1", image, ("alice", "wonderland"))
        host = m.url.removeprefix("http://")
        for i, filler in enumerate(cached):
            await skopeo_pull_and_verify(f"{host}/library/filler:{i}", tmp_path / f"f{i}", filler)
        first = cached[0].layers()[0].digest
        for _ in range(100):  # the pass runs in the background
            if not (data / "blobs" / "sha256" / first[7:9] / first[7:]).exists():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("nothing was evicted: the test proves nothing")
        await skopeo_pull_and_verify(f"{host}/acme/app:1", tmp_path / "kept", image)
        alice = {"Authorization": basic("alice", "wonderland"), "Accept": ALL_TYPES}
        async with aiohttp.ClientSession(headers=alice) as http:
            url = f"{m.url}/v2/acme/app/manifests"
            async with http.delete(f"{url}/1") as resp:
                assert resp.status == 202
            async with http.get(f"{url}/1") as resp:
                assert resp.status == 404
            async with http.get(f"{url}/{image.digest}") as resp:
                assert resp.status == 200
            async with http.delete(f"{url}/{image.digest}") as resp:
                assert resp.status == 202
            async with http.get(f"{url}/{image.digest}") as resp:
                assert resp.status == 404
                assert (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"


def test_hosted_namespaces_are_configured_by_flag_environment_and_tables(tmp_path: Path) -> None:
    htpasswd = write_htpasswd(tmp_path, alice="wonderland", bob="builder")
    (tmp_path / "m.toml").write_text(
        f'auth_htpasswd = "{htpasswd}"\n[hosted."acme"]\npush = ["alice"]\npull = ["alice"]\n'
    )
    config = load_config({"hosted": ["team"]}, {}, str(tmp_path / "m.toml"))
    assert sorted(config.hosted) == ["acme", "team"]
    assert config.hosted["acme"].push == frozenset({"alice"})
    assert config.hosted["team"].push is None and config.hosted["team"].pull == "anyone"
    config = load_config(
        {"auth_htpasswd": str(htpasswd)},
        {"MIRROR_HOSTED": "one, two", "MIRROR_HOSTED_MAX_SIZE": "1GiB"},
    )
    assert sorted(config.hosted) == ["one", "two"] and config.hosted_max_size == 1 << 30
    args = _parser().parse_args(
        ["serve", "--hosted", "acme", "--hosted", "team", "--hosted-max-size", "2GiB",
         "--auth-htpasswd", str(htpasswd)]
    )  # fmt: skip
    config = config_from_args(args)
    assert sorted(config.hosted) == ["acme", "team"] and config.hosted_max_size == 2 << 30
    with pytest.raises(ConfigError, match="library"):
        load_config({"hosted": ["library"], "auth_htpasswd": str(htpasswd)}, {})
    with pytest.raises(ConfigError, match="need auth_htpasswd"):
        load_config({"hosted": ["acme"]}, {})
    with pytest.raises(ConfigError, match="one path component"):
        load_config({"hosted": ["ghcr.io"], "auth_htpasswd": str(htpasswd)}, {})
    (tmp_path / "bad.toml").write_text('[hosted."acme"]\npull = "everyone"\n')
    with pytest.raises(ConfigError, match="pull"):
        load_config({"auth_htpasswd": str(htpasswd)}, {}, str(tmp_path / "bad.toml"))


async def upload_blob(url: str, name: str, data: bytes, authorization: str) -> None:
    """A blob pushed by itself (monolithic POST), as a push does before its manifest."""
    async with (
        aiohttp.ClientSession(headers={"Authorization": authorization}) as http,
        http.post(f"{url}/v2/{name}/blobs/uploads/?digest={sha256(data)}", data=data) as resp,
    ):
        assert resp.status == 201, await resp.text()


async def test_gc_frees_exactly_the_bytes_no_manifest_names(
    hub: FakeHub, tmp_path: Path, backend: Backend
) -> None:
    shared = {"lib/shared.so": b"shared by both images\n" * 400}
    first = make_image([shared, {"app/one": b"only the first image\n" * 300}], label="one")
    second = make_image([shared, {"app/two": b"only the second image\n" * 300}], label="two")
    orphan = b"uploaded, never named by a manifest\n" * 100
    htpasswd = write_htpasswd(tmp_path, alice="wonderland", bob="builder")
    config = hosted_config(tmp_path, htpasswd)
    alice = basic("alice", "wonderland")
    async with mirror_process(
        tmp_path / "data", hub.registry_url, "--config", str(config), *backend.flags,
        env=backend.env,
    ) as m:  # fmt: skip
        await http_push(m.url, "acme/one", "1", first, ("alice", "wonderland"))
        await http_push(m.url, "acme/two", "1", second, ("alice", "wonderland"))
        await upload_blob(m.url, "acme/two", orphan, alice)
        async with (
            aiohttp.ClientSession(headers={"Authorization": alice}) as http,
            http.delete(f"{m.url}/v2/acme/one/manifests/{first.digest}") as resp,
        ):
            assert resp.status == 202
        only_first = {first.digest, *first.blobs} - {*second.blobs}
        expected = sorted(only_first | {sha256(orphan)})
        sizes = {first.digest: len(first.top.data), sha256(orphan): len(orphan)}
        sizes |= {d: len(b.data) for d, b in first.blobs.items()}
        admin = ("--admin", m.admin, "--json")
        # Within the grace period an upload no manifest names yet is a push in progress.
        kept = json.loads(await mirror_cli("gc", "--dry-run", *admin))
        assert sorted(kept["digests"]) == sorted(only_first)
        dry = json.loads(await mirror_cli("gc", "--dry-run", "--grace", "0s", *admin))
        assert sorted(dry["digests"]) == expected and dry["dry_run"] is True
        assert dry["bytes"] == sum(sizes[d] for d in expected)
        again = json.loads(await mirror_cli("gc", "--dry-run", "--grace", "0s", *admin))
        assert again == dry, "a dry run removed something"
        done = json.loads(await mirror_cli("gc", "--grace", "0s", *admin))
        assert sorted(done["digests"]) == expected and done["bytes"] == dry["bytes"]
        assert done["blobs"] == len(expected)
        host = m.url.removeprefix("http://")
        await skopeo_pull_and_verify(f"{host}/acme/two:1", tmp_path / "two", second)
        async with aiohttp.ClientSession(headers={"Authorization": alice}) as http:
            for digest in expected:
                for name in ("acme/one", "acme/two"):
                    async with http.head(f"{m.url}/v2/{name}/blobs/{digest}") as resp:
                        assert resp.status == 404, (name, digest)
        assert json.loads(await mirror_cli("gc", "--grace", "0s", *admin))["blobs"] == 0
        async with aiohttp.ClientSession() as http, http.get(f"{m.url}/metrics") as resp:
            text = await resp.text()
        assert f"mirror_hosted_gc_bytes_total {float(done['bytes'])}" in text
        assert "mirror_hosted_gc_runs_total 2.0" in text
        # What is left: the second image, its shared layer once.
        assert f"mirror_hosted_bytes {float(len(second.top.data) + second.blob_bytes)}" in text


async def test_a_push_racing_gc_for_its_shared_layer_completes_intact(
    hub: FakeHub, tmp_path: Path, backend: Backend
) -> None:
    """GC runs back to back (5 s of grace) while a layer another repository uploaded and
    abandoned (past its grace: garbage) is pushed again under a new tag each round: the
    first round's copy is collected, and every push completes and pulls back whole."""
    image = make_image([{"lib/shared.so": b"the layer GC keeps trying to take\n" * 2000}])
    layer = image.layers()[0]
    htpasswd = write_htpasswd(tmp_path, alice="wonderland", bob="builder")
    config = hosted_config(tmp_path, htpasswd)
    alice = basic("alice", "wonderland")
    async with mirror_process(
        tmp_path / "data", hub.registry_url, "--config", str(config), *backend.flags,
        env=backend.env,
    ) as m:  # fmt: skip
        collected: list[str] = []
        done = asyncio.Event()

        async def collect_all_the_time() -> None:
            async with aiohttp.ClientSession() as http:
                while not done.is_set():
                    async with http.post(f"{m.admin}/admin/gc", json={"grace": "5s"}) as resp:
                        assert resp.status == 200, await resp.text()
                        collected.extend((await resp.json())["digests"])

        gc = asyncio.create_task(collect_all_the_time())
        try:
            for round_ in range(2):
                await upload_blob(m.url, "acme/abandoned", layer.data, alice)
                await asyncio.sleep(7)  # past the grace: the abandoned upload is garbage
                await http_push(m.url, "acme/app", str(round_), image, ("alice", "wonderland"))
        finally:
            done.set()
            await gc
        assert collected[:1] == [layer.digest], "the race never happened: GC freed nothing"
        host = m.url.removeprefix("http://")
        for round_ in range(2):
            await skopeo_pull_and_verify(f"{host}/acme/app:{round_}", tmp_path / str(round_), image)


async def test_pushes_and_deletes_are_announced_by_webhook(
    hub: FakeHub, tmp_path: Path, receiver: Receiver
) -> None:
    image = small_image("announced")
    htpasswd = write_htpasswd(tmp_path, alice="wonderland", bob="builder")
    config = hosted_config(tmp_path, htpasswd)
    alice = basic("alice", "wonderland")
    async with mirror_process(
        tmp_path / "data", hub.registry_url, "--config", str(config), "--webhook", receiver.url
    ) as m:
        await http_push(m.url, "acme/app", "1", image, ("alice", "wonderland"))
        await receiver.wait_for("image.pushed")
        [pushed] = receiver.of_type("image.pushed")
        assert pushed["data"] == {
            "repository": "acme/app", "tag": "1", "digest": image.digest, "user": "alice",
            "media_type": image.top.media_type,
            "size": len(image.top.data) + image.blob_bytes,
        }  # fmt: skip
        async with aiohttp.ClientSession(headers={"Authorization": alice}) as http:
            for reference in ("1", image.digest):
                async with http.delete(f"{m.url}/v2/acme/app/manifests/{reference}") as resp:
                    assert resp.status == 202
        await receiver.wait_for("image.deleted", 2)
        by_tag, by_digest = (e["data"] for e in receiver.of_type("image.deleted"))
        common = {"repository": "acme/app", "digest": image.digest, "user": "alice"}
        assert by_tag == {**common, "tag": "1", "tags": ["1"], "size": len(image.top.data)}
        assert by_digest == {**common, "tag": None, "tags": [], "size": len(image.top.data)}


async def test_a_chunked_upload_cut_mid_chunk_resumes_where_the_mirror_says(
    hub: FakeHub, tmp_path: Path
) -> None:
    """A PATCH whose connection drops keeps what arrived; the client asks (GET) where the
    upload stands and sends the rest from there."""
    data = random_bytes(3 << 20, seed=7)
    htpasswd = write_htpasswd(tmp_path, alice="wonderland", bob="builder")
    config = hosted_config(tmp_path, htpasswd)
    alice = basic("alice", "wonderland")
    async with mirror_process(tmp_path / "data", hub.registry_url, "--config", str(config)) as m:
        async with (
            aiohttp.ClientSession(headers={"Authorization": alice}) as http,
            http.post(f"{m.url}/v2/acme/app/blobs/uploads/") as resp,
        ):
            assert resp.status == 202 and resp.headers["Range"] == "0-0"
            location = m.url + resp.headers["Location"]
        # A raw connection announces 3 MiB and sends 1 MiB, then goes away.
        host, port = m.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        path = location.removeprefix(m.url)
        writer.write(
            f"PATCH {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {alice}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Range: 0-{len(data) - 1}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data[: 1 << 20]
        )
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.close()
        del reader
        async with aiohttp.ClientSession(headers={"Authorization": alice}) as http:
            for _ in range(50):  # the server notices the cut and stops writing
                async with http.get(location) as resp:
                    assert resp.status == 204
                    held = int(resp.headers["Range"].split("-")[1]) + 1
                if held == 1 << 20:
                    break
                await asyncio.sleep(0.1)
            assert held == 1 << 20
            # Out of order is refused with where the upload stands.
            async with http.patch(
                location,
                data=data[held + 1 :],
                headers={"Content-Range": f"{held + 1}-{len(data) - 1}"},
            ) as resp:
                assert resp.status == 416 and resp.headers["Range"] == f"0-{held - 1}"
            async with http.patch(
                location, data=data[held:], headers={"Content-Range": f"{held}-{len(data) - 1}"}
            ) as resp:
                assert resp.status == 202 and resp.headers["Range"] == f"0-{len(data) - 1}"
            async with http.put(f"{location}?digest={sha256(data)}") as resp:
                assert resp.status == 201, await resp.text()
            async with http.get(f"{m.url}/v2/acme/app/blobs/{sha256(data)}") as resp:
                assert resp.status == 200 and await resp.read() == data
            async with http.get(location) as resp:
                assert resp.status == 404  # the session ended with the blob


async def test_a_wrong_digest_stores_nothing_and_the_quota_refuses_what_does_not_fit(
    hub: FakeHub, tmp_path: Path
) -> None:
    htpasswd = write_htpasswd(tmp_path, alice="wonderland", bob="builder")
    config = hosted_config(tmp_path, htpasswd)
    alice = basic("alice", "wonderland")
    data, other = random_bytes(300_000, seed=1), random_bytes(300_000, seed=2)
    async with (
        mirror_process(
            tmp_path / "data",
            hub.registry_url,
            "--config",
            str(config),
            "--hosted-max-size",
            "500KB",
        ) as m,
        aiohttp.ClientSession(headers={"Authorization": alice}) as http,
    ):
        uploads = f"{m.url}/v2/acme/app/blobs/uploads/"
        async with http.post(f"{uploads}?digest={sha256(other)}", data=data) as resp:
            assert resp.status == 400
            assert (await resp.json())["errors"][0]["code"] == "DIGEST_INVALID"
        for digest in (sha256(data), sha256(other)):
            async with http.head(f"{m.url}/v2/acme/app/blobs/{digest}") as resp:
                assert resp.status == 404
        assert not list((tmp_path / "data" / "uploads").iterdir())
        async with http.post(f"{uploads}?digest={sha256(data)}", data=data) as resp:
            assert resp.status == 201
        async with http.post(f"{uploads}?digest={sha256(other)}", data=other) as resp:
            assert resp.status == 403, await resp.text()
            body = await resp.json()
            assert body["errors"][0]["code"] == "DENIED"
            assert "hosted_max_size" in body["errors"][0]["message"]
        async with http.head(f"{m.url}/v2/acme/app/blobs/{sha256(other)}") as resp:
            assert resp.status == 404
        async with http.get(f"{m.url}/metrics") as resp:
            assert "mirror_hosted_bytes 300000.0" in await resp.text()


async def test_immutable_tags_never_move(hub: FakeHub, tmp_path: Path) -> None:
    first, second = small_image("first"), small_image("second")
    htpasswd = write_htpasswd(tmp_path, alice="wonderland", bob="builder")
    config = tmp_path / "mirror.toml"
    config.write_text(f'auth_htpasswd = "{htpasswd}"\n[hosted."acme"]\nimmutable_tags = true\n')
    alice = basic("alice", "wonderland")
    async with mirror_process(tmp_path / "data", hub.registry_url, "--config", str(config)) as m:
        await http_push(m.url, "acme/app", "1.0", first, ("alice", "wonderland"))
        await http_push(m.url, "acme/app", "1.0", first, ("alice", "wonderland"))  # the same
        await http_push(m.url, "acme/app", "2.0", second, ("alice", "wonderland"))
        async with aiohttp.ClientSession(headers={"Authorization": alice}) as http:
            url = f"{m.url}/v2/acme/app/manifests"
            headers = {"Content-Type": second.top.media_type}
            async with http.put(f"{url}/1.0", data=second.top.data, headers=headers) as resp:
                assert resp.status == 403
                assert (await resp.json())["errors"][0]["code"] == "DENIED"
            for reference in ("1.0", first.digest):
                async with http.delete(f"{url}/{reference}") as resp:
                    assert resp.status == 403
            async with http.get(f"{url}/1.0", headers={"Accept": ALL_TYPES}) as resp:
                assert await resp.read() == first.top.data


async def test_the_page_and_mirror_ls_mark_hosted_images(hub: FakeHub, tmp_path: Path) -> None:
    """The registry listener's page lists hosted images anyone may pull, marked hosted; one
    namespace with a pull list only on the admin listener's page."""
    htpasswd = write_htpasswd(tmp_path, alice="wonderland", bob="builder")
    config = hosted_config(tmp_path, htpasswd)
    data = tmp_path / "data"
    async with mirror_process(data, hub.registry_url, "--config", str(config)) as m:
        await http_push(m.url, "acme/app", "1", small_image("open"), ("alice", "wonderland"))
        await http_push(m.url, "secret/app", "1", small_image("closed"), ("bob", "builder"))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{m.url}/?q=app") as resp:
                page = await resp.text()
            async with http.get(f"{m.admin}/?q=app") as resp:
                admin_page = await resp.text()
        assert "acme/app" in page and '<td class="hosted">hosted</td>' in page
        assert "secret/app" not in page
        assert "acme/app" in admin_page and "secret/app" in admin_page
        table = await mirror_cli("ls", "--data", str(data))
    lines = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert lines["acme/app:1"][-1] == "hosted" and lines["secret/app:1"][-1] == "hosted"


async def test_a_hosted_namespace_shadows_docker_hub_except_for_containerd_ns(
    hub: FakeHub, tmp_path: Path
) -> None:
    upstream, ours = small_image("docker-hub-acme"), small_image("our-acme")
    hub.add("acme/app", "1", upstream)
    async with hosted_mirror(hub, tmp_path) as m:
        url = f"{m.url}/v2/acme/app/manifests/1"
        headers = {"Accept": ALL_TYPES}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.get(url) as resp:
                assert resp.status == 404  # not pushed yet, and never asked upstream
            assert not [r for r in hub.log if "acme" in r.path]
            await http_push(m.url, "acme/app", "1", ours, ("alice", "wonderland"))
            for _ in range(2):  # the second time from the hit path's memory, if ever
                async with http.get(url) as resp:
                    assert await resp.read() == ours.top.data
                async with http.get(url, params={"ns": "docker.io"}) as resp:
                    assert await resp.read() == upstream.top.data


async def test_pushed_artifacts_are_listed_by_the_referrers_api(
    hub: FakeHub, tmp_path: Path
) -> None:
    image = small_image("signed")
    signature = make_artifact(image, "application/vnd.dev.cosign.signature", b"sig")
    sbom = make_artifact(image, "application/spdx+json", b"{}", {"org.example": "sbom"})
    async with hosted_mirror(hub, tmp_path) as m:
        await http_push(m.url, "acme/app", "1", image, ("alice", "wonderland"))
        alice = {"Authorization": basic("alice", "wonderland")}
        async with aiohttp.ClientSession(headers=alice) as http:
            for artifact in (signature, sbom):
                await http_push(m.url, "acme/app", "unused", artifact, ("alice", "wonderland"))
                async with http.put(
                    f"{m.url}/v2/acme/app/manifests/{artifact.digest}",
                    data=artifact.top.data,
                    headers={"Content-Type": artifact.top.media_type},
                ) as resp:
                    assert resp.status == 201
                    assert resp.headers["OCI-Subject"] == image.digest
            url = f"{m.url}/v2/acme/app/referrers/{image.digest}"
            async with http.get(url) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "application/vnd.oci.image.index.v1+json"
                assert "OCI-Filters-Applied" not in resp.headers
                listed = (await resp.json())["manifests"]
            assert sorted((e["digest"], e["artifactType"]) for e in listed) == sorted(
                [
                    (signature.digest, "application/vnd.dev.cosign.signature"),
                    (sbom.digest, "application/spdx+json"),
                ]
            )
            [entry] = [e for e in listed if e["digest"] == sbom.digest]
            assert entry["size"] == len(sbom.top.data)
            assert entry["annotations"] == {"org.example": "sbom"}
            async with http.get(url, params={"artifactType": "application/spdx+json"}) as resp:
                assert resp.headers["OCI-Filters-Applied"] == "artifactType"
                assert [e["digest"] for e in (await resp.json())["manifests"]] == [sbom.digest]
            other = f"{m.url}/v2/acme/app/referrers/{signature.digest}"
            async with http.get(other) as resp:
                assert (await resp.json())["manifests"] == []


@pytest.mark.parametrize("who", ["anonymous", "wrong-password", "no-push-right", "push-right"])
async def test_every_push_request_checks_who_is_asking(
    hub: FakeHub, tmp_path: Path, who: str
) -> None:
    """The matrix: upload, mount, manifest put, manifest delete and pull, as each kind of
    client, against `acme` (push: alice; pull: anyone)."""
    image = small_image("matrix")
    htpasswd = write_htpasswd(tmp_path, alice="wonderland", bob="builder")
    config = hosted_config(tmp_path, htpasswd)
    authorization = {
        "anonymous": None,
        "wrong-password": basic("alice", "queen"),
        "no-push-right": basic("bob", "builder"),
        "push-right": basic("alice", "wonderland"),
    }[who]
    refused = {"anonymous": 401, "wrong-password": 401, "no-push-right": 403}.get(who)
    async with mirror_process(tmp_path / "data", hub.registry_url, "--config", str(config)) as m:
        await http_push(m.url, "acme/base", "1", image, ("alice", "wonderland"))
        layer = image.layers()[0]
        headers = {"Authorization": authorization} if authorization else {}
        base = f"{m.url}/v2/acme/app"
        manifest_headers = {**headers, "Content-Type": image.top.media_type}
        requests = [
            ("POST", f"{base}/blobs/uploads/", headers, b"", 202),
            ("POST", f"{base}/blobs/uploads/?digest={layer.digest}", headers, layer.data, 201),
            ("POST", f"{base}/blobs/uploads/?mount={layer.digest}&from=acme/base", headers,
             b"", 201),
            ("PUT", f"{m.url}/v2/acme/base/manifests/2", manifest_headers, image.top.data, 201),
            ("DELETE", f"{m.url}/v2/acme/base/manifests/2", headers, b"", 202),
        ]  # fmt: skip
        async with aiohttp.ClientSession() as http:
            for method, url, sent, body, allowed in requests:
                async with http.request(method, url, headers=sent, data=body) as resp:
                    expected = refused or allowed
                    assert resp.status == expected, (method, url, await resp.text())
                    if resp.status == 401:
                        assert resp.headers["WWW-Authenticate"].startswith("Basic")
                    if resp.status == 403:
                        assert (await resp.json())["errors"][0]["code"] == "DENIED"
            pull = f"{m.url}/v2/acme/base/manifests/1"
            async with http.get(pull, headers={**headers, "Accept": ALL_TYPES}) as resp:
                # anyone may pull: a wrong password is an anonymous client (anonymous_pull)
                assert resp.status == 200


def test_a_push_or_pull_list_naming_an_unknown_user_stops_the_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    htpasswd = write_htpasswd(tmp_path, alice="wonderland", bob="builder")
    config = tmp_path / "mirror.toml"
    config.write_text(f'auth_htpasswd = "{htpasswd}"\n[hosted."acme"]\npush = ["alcie"]\n')
    assert main(["serve", "--config", str(config), "--data", str(tmp_path / "d")]) == 2
    assert 'hosted."acme".push: alcie not in auth_htpasswd' in capsys.readouterr().err
