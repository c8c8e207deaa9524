"""Tag lists as the distribution-spec says, whatever the upstream does with `n`, `last` and
its own paging."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import unquote

import aiohttp
import pytest

from tests.conftest import StartMirror
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import small_image
from tests.fixtures.procs import need, run
from tests.integration.test_pull_path import get, mirror_url

UNSORTED = ["v10", "b", "latest", "a", "v2", "1.0", "B"]


def add_tags(hub: FakeHub, name: str, tags: list[str]) -> None:
    image = small_image(name.replace("/", "-"))
    for tag in tags:
        hub.add(name, tag, image)


async def walk(http: aiohttp.ClientSession, base: str, path: str) -> tuple[list[str], list[str]]:
    """Follow the mirror's Link headers from `path`: every tag seen, and each Link."""
    tags: list[str] = []
    links: list[str] = []
    while path:
        status, headers, body = await get(http, f"{base}{path}")
        assert status == 200, body
        tags.extend(json.loads(body)["tags"])
        link = headers.get("Link")
        path = link[1 : link.index(">")] if link else ""
        links.extend([link] if link else [])
    return tags, links


async def test_an_upstream_that_ignores_n_and_last_and_does_not_sort_is_paged_by_the_mirror(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    add_tags(hub, "team/tags", UNSORTED)
    hub.tags_ignore_paging = hub.tags_unsorted = True
    base = mirror_url(await start_mirror(hub.registry_url))
    status, headers, body = await get(http, f"{base}/v2/team/tags/tags/list?n=2")
    assert status == 200 and json.loads(body) == {"name": "team/tags", "tags": ["1.0", "B"]}
    assert headers["Link"] == '</v2/team/tags/tags/list?last=B&n=2>; rel="next"'
    tags, links = await walk(http, base, "/v2/team/tags/tags/list?n=3")
    assert tags == sorted(UNSORTED) and len(links) == 2
    status, _, body = await get(http, f"{base}/v2/team/tags/tags/list?last=latest")
    assert json.loads(body)["tags"] == ["v10", "v2"]
    # one upstream walk served every page: the list is kept briefly
    assert len(hub.requests(contains="/tags/list")) == 1


async def test_opaque_upstream_pages_are_followed_with_their_own_parameters(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    add_tags(hub, "team/cursor", UNSORTED)
    hub.tags_unsorted = True
    hub.tags_cursor_page = 3
    base = mirror_url(await start_mirror(hub.registry_url))
    status, headers, body = await get(http, f"{base}/v2/team/cursor/tags/list")
    assert status == 200 and json.loads(body)["tags"] == sorted(UNSORTED)
    assert "Link" not in headers
    asked = hub.requests(contains="/tags/list")
    assert [r.query.get("cursor") is None for r in asked] == [True, False, False]
    # each cursor reached the upstream exactly as it wrote it in its Link
    assert all(r.query["cursor"] in hub._cursors for r in asked[1:])
    assert all("n" not in r.query and "last" not in r.query for r in asked)


async def test_the_next_link_keeps_containerd_ns(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    add_tags(hub, "library/alpine", ["3.18", "3.19", "3.20"])
    base = mirror_url(await start_mirror(hub.registry_url))
    status, headers, _ = await get(http, f"{base}/v2/library/alpine/tags/list?ns=docker.io&n=1")
    assert status == 200
    assert headers["Link"] == (
        '</v2/library/alpine/tags/list?last=3.18&n=1&ns=docker.io>; rel="next"'
    )
    tags, _ = await walk(http, base, "/v2/library/alpine/tags/list?ns=docker.io&n=2")
    assert tags == ["3.18", "3.19", "3.20"]


async def test_n_zero_is_empty_and_a_bad_n_is_refused_before_upstream(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    add_tags(hub, "team/zero", ["a", "b"])
    base = mirror_url(await start_mirror(hub.registry_url))
    status, headers, body = await get(http, f"{base}/v2/team/zero/tags/list?n=0")
    assert status == 200 and json.loads(body)["tags"] == [] and "Link" not in headers
    hub.reset_log()
    status, _, body = await get(http, f"{base}/v2/team/zero/tags/list?n=lots")
    assert status == 400 and json.loads(body)["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"
    assert hub.log == []


async def test_concurrent_listings_share_one_upstream_walk(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    add_tags(hub, "team/many", [f"t{i}" for i in range(30)])
    hub.tags_cursor_page = 10
    base = mirror_url(await start_mirror(hub.registry_url))
    answers = await asyncio.gather(
        *(get(http, f"{base}/v2/team/many/tags/list?n=5&last=t{i}") for i in range(8))
    )
    assert {status for status, _, _ in answers} == {200}
    assert len(hub.requests(contains="/tags/list")) == 3  # the upstream's three pages, once


async def test_the_last_list_read_is_served_while_the_upstream_is_down(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    add_tags(hub, "team/offline", ["b", "a", "c"])
    base = mirror_url(await start_mirror(hub.registry_url, tag_ttl=0))
    await get(http, f"{base}/v2/team/offline/tags/list")
    hub.down = True
    status, headers, body = await get(http, f"{base}/v2/team/offline/tags/list?n=2")
    assert status == 200 and json.loads(body)["tags"] == ["a", "b"]
    assert headers["X-Mirror-Cache"] == "stale"
    assert unquote(headers["Link"]) == '</v2/team/offline/tags/list?last=b&n=2>; rel="next"'


@pytest.mark.integration
async def test_skopeo_lists_a_cursor_paged_unsorted_upstream_in_order(
    hub: FakeHub, start_mirror: StartMirror
) -> None:
    need("skopeo")
    add_tags(hub, "team/skopeo", UNSORTED)
    hub.tags_unsorted, hub.tags_cursor_page = True, 2
    mirror = await start_mirror(hub.registry_url)
    out = await run(
        "skopeo", "list-tags", "--tls-verify=false",
        f"docker://127.0.0.1:{mirror.port}/team/skopeo",
    )  # fmt: skip
    assert json.loads(out)["Tags"] == sorted(UNSORTED)
