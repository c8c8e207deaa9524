"""`GET /v1/search`: `docker search MIRROR/term` finds the hosted and cached repositories, in
Docker Hub's v1 format, under the same pull rules as `_catalog`.

A real mirror process against the fake hub; the pure parts are tests/unit/test_search.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import small_image
from tests.fixtures.procs import http_push, mirror_process
from tests.integration.test_client_auth import basic, write_htpasswd
from tests.integration.test_pull_path import ALL_TYPES, pull

# -- a real mirror --------------------------------------------------------------------------------


def search_config(tmp_path: Path, hub: FakeHub, *, anonymous_pull: bool = True) -> Path:
    """Users alice and bob; `acme` open to all, `secret` to bob only; ghcr.io beside Docker Hub
    (the fake hub serves both)."""
    htpasswd = write_htpasswd(tmp_path, alice="wonderland", bob="builder")
    path = tmp_path / "mirror.toml"
    path.write_text(
        f'auth_htpasswd = "{htpasswd}"\n'
        f"anonymous_pull = {'true' if anonymous_pull else 'false'}\n"
        '[hosted."acme"]\npush = ["alice"]\n'
        '[hosted."secret"]\npull = ["bob"]\n'
        f'[registries."ghcr.io"]\nurl = "{hub.registry_url}"\n'
    )
    return path


async def search(
    base: str, query: str, authorization: str | None = None, method: str = "GET"
) -> tuple[int, Any]:
    headers = {"Authorization": authorization} if authorization else {}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, f"{base}/v1/search?{query}", headers=headers) as resp,
    ):
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


def names(document: dict[str, Any]) -> list[str]:
    return [result["name"] for result in document["results"]]


async def test_search_finds_hosted_and_cached_repositories_a_client_may_pull(
    hub: FakeHub, tmp_path: Path
) -> None:
    for name in ("library/alpine", "library/busybox", "team/alpine-tools", "owner/alpine-web"):
        hub.add(name, "v1", small_image(f"search-{name}"))
    async with mirror_process(
        tmp_path / "data", hub.registry_url, "--config", str(search_config(tmp_path, hub))
    ) as m:
        async with aiohttp.ClientSession() as http:
            for name in ("library/alpine", "busybox", "team/alpine-tools"):
                await pull(http, m.url, name, "v1")
            await pull(http, m.url, "ghcr.io/owner/alpine-web", "v1")
        await http_push(m.url, "acme/alpine-app", "1", small_image("acme"), ("alice", "wonderland"))
        await http_push(m.url, "secret/alpine-x", "1", small_image("secret"), ("bob", "builder"))
        hub.reset_log()

        status, found = await search(m.url, "q=alpine")
        assert status == 200
        assert names(found) == [
            "acme/alpine-app",
            "alpine",
            "ghcr.io/owner/alpine-web",
            "team/alpine-tools",
        ]
        assert [r["is_official"] for r in found["results"]] == [False, True, False, False]
        assert found["results"][1] == {
            "name": "alpine",
            "description": "",
            "is_official": True,
            "is_automated": False,
            "star_count": 0,
        }
        assert (found["num_results"], found["num_pages"], found["page"]) == (4, 1, 1)
        assert (found["page_size"], found["query"]) == (25, "alpine")
        # The hosted namespace with a `pull` list: listed only to users allowed to pull.
        for authorization in (basic("alice", "wonderland"), basic("bob", "nope")):
            status, found = await search(m.url, "q=alpine", authorization)
            assert "secret/alpine-x" not in names(found), authorization
        _, found = await search(m.url, "q=ALPINE", basic("bob", "builder"))
        assert "secret/alpine-x" in names(found) and found["num_results"] == 5
        # The daemon sends `library/x` for `docker search MIRROR/library/x`.
        _, found = await search(m.url, "q=library/alp&n=1")
        assert names(found) == ["alpine"]
        _, found = await search(m.url, "q=ghcr.io/owner")
        assert names(found) == ["ghcr.io/owner/alpine-web"]
        _, found = await search(m.url, "q=busy")
        assert names(found) == ["busybox"]
        _, found = await search(m.url, "q=nothing-like-it")
        assert (found["num_results"], found["results"]) == (0, [])
    assert not hub.log, "a search reached upstream"


async def test_search_pages_and_refuses_bad_page_numbers_with_json_errors(
    hub: FakeHub, tmp_path: Path
) -> None:
    async with mirror_process(
        tmp_path / "data", hub.registry_url, "--config", str(search_config(tmp_path, hub))
    ) as m:
        alice = ("alice", "wonderland")
        for i in range(5):
            await http_push(m.url, f"acme/app{i}", "1", small_image(f"page{i}"), alice)
        pages = []
        for page in (1, 2, 3, 4):
            status, found = await search(m.url, f"q=app&n=2&page={page}")
            assert status == 200
            assert (found["num_results"], found["num_pages"], found["page"]) == (5, 3, page)
            assert found["page_size"] == 2
            pages.append(names(found))
        assert pages == [["acme/app0", "acme/app1"], ["acme/app2", "acme/app3"], ["acme/app4"], []]
        for query in ("q=app&n=0", "q=app&n=101", "q=app&n=x", "q=app&page=0", "q=app&page=-1"):
            status, body = await search(m.url, query)
            assert status == 400, query
            assert body["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID", query
        status, body = await search(m.url, "q=app", method="POST")
        assert status == 405 and body["errors"][0]["code"] == "UNSUPPORTED"


async def test_search_is_behind_the_same_client_gate_as_the_registry_api(
    hub: FakeHub, tmp_path: Path
) -> None:
    hub.add("library/alpine", "v1", small_image("gated-search"))
    config = search_config(tmp_path, hub, anonymous_pull=False)
    async with mirror_process(tmp_path / "data", hub.registry_url, "--config", str(config)) as m:
        alice = basic("alice", "wonderland")
        async with aiohttp.ClientSession(headers={"Authorization": alice}) as http:
            await pull(http, m.url, "library/alpine", "v1")
        for authorization in (None, basic("alice", "queen")):
            headers = {"Authorization": authorization} if authorization else {}
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{m.url}/v1/search?q=alp", headers=headers) as resp,
            ):
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"].startswith("Basic")
                assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"
        status, found = await search(m.url, "q=alp", alice)
        assert status == 200 and names(found) == ["alpine"]


async def test_search_lists_a_credentialed_upstreams_repository_only_once_known_public(
    hub: FakeHub, tmp_path: Path
) -> None:
    hub.add("library/alpine", "v1", small_image("public-alpine"))
    hub.add("team/alpine-private", "v1", small_image("private-alpine"), private=True)
    password = tmp_path / "hub-password"
    password.write_text(hub.password)
    async with mirror_process(
        tmp_path / "data", hub.registry_url, "--workers", "1",
        "--upstream-username", hub.username, "--upstream-password-file", str(password),
    ) as m:  # fmt: skip
        async with aiohttp.ClientSession() as http:
            # Cached by the operator with the mirror's credentials: private, never listed.
            pin = {"image": "team/alpine-private:v1"}
            async with http.post(f"{m.admin}/admin/pin", json=pin) as resp:
                assert resp.status == 200, await resp.text()
            _, found = await search(m.url, "q=alpine")
            assert found["num_results"] == 0
            await pull(http, m.url, "library/alpine", "v1")
            url = f"{m.url}/v2/team/alpine-private/manifests/v1"
            async with http.get(url, headers={"Accept": ALL_TYPES}) as resp:
                assert resp.status == 401  # what a search must not reveal either
        _, found = await search(m.url, "q=alpine")
        assert names(found) == ["alpine"]
