"""`docker search MIRROR/term`: the hosted and cached repositories in Docker Hub's v1 format.

`docker search` has no registry-API (v2) counterpart: the daemon asks `GET /v1/search?q=&n=`
(moby registry/search_session.go `searchRepositories`: the term after the mirror's address,
`n` the `--limit`, 1 to 100, default 25; no page is ever sent) and decodes `SearchResults`
(moby api/types/registry: `query`, `num_results`, `results` of `name`, `description`,
`star_count`, `is_official`, `is_automated`). Docker Hub's answer also carries `num_pages`,
`page` and `page_size`, so `page=` works for scripts as it does there.

What a client may see is what `_catalog` lists (handlers.visible_repositories): a search must
never reveal a repository a pull would refuse. The listing, matching and paging are pure
functions over (registry, repository) pairs; only `docker_search` touches the request.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mirror.errors import RegistryError
from mirror.handlers import READ_METHODS, visible_repositories
from mirror.keys import CLIENT_AUTH, CONFIG
from mirror.reference import DOCKER_HUB, listed_name

DEFAULT_PAGE_SIZE = 25  # the daemon's default `--limit`, and Docker Hub's
MAX_PAGE_SIZE = 100  # the daemon refuses a larger `--limit` before asking
MAX_PAGE = 10**9  # beyond any real listing; keeps int() away from huge digit strings
_OFFICIAL_PREFIX = "library/"


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A validated `/v1/search` query: the term as sent, the page size and the 1-based page."""

    term: str
    page_size: int = DEFAULT_PAGE_SIZE
    page: int = 1


@dataclass(frozen=True, slots=True)
class SearchEntry:
    """One repository as `docker search` shows it, and the routed name a term may also match."""

    name: str
    routed: str
    is_official: bool


def _positive(value: str | None, setting: str, default: int, highest: int) -> int:
    if value is None or value == "":
        return default
    digits = value.isascii() and value.isdigit() and len(value) <= 10
    if not digits or not 1 <= int(value) <= highest:
        raise RegistryError(
            400,
            "PAGINATION_NUMBER_INVALID",
            f"{setting} must be an integer from 1 to {highest}",
            {setting: value[:50]},
        )
    return int(value)


def parse_search_query(q: str | None, n: str | None, page: str | None) -> SearchQuery:
    """The query parameters, or a 400 naming the bad one. An absent or empty `q` matches
    every repository (the daemon always sends a term; a person with curl may want a list)."""
    return SearchQuery(
        q or "",
        _positive(n, "n", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE),
        _positive(page, "page", 1, MAX_PAGE),
    )


def search_entry(registry: str, repository: str, hosted_namespaces: frozenset[str]) -> SearchEntry:
    """How a repository is shown: as the name to pull it by through the mirror.

    Docker Hub's official images are shown as Docker Hub shows them (`alpine`, not
    `library/alpine`), which the mirror routes to `library/alpine` too. Except where a hosted
    namespace has that very name: the mirror routes `alpine` there (reference.parse_v2_path),
    so the official image keeps its `library/` prefix. Other repositories are shown by the
    name that reaches them (`acme/app`, `ghcr.io/owner/app`; reference.listed_name).
    """
    routed = listed_name(registry, repository, hosted_namespaces)
    official = registry == DOCKER_HUB and repository.startswith(_OFFICIAL_PREFIX)
    short = repository.removeprefix(_OFFICIAL_PREFIX)
    shown = short if official and short.partition("/")[0] not in hosted_namespaces else routed
    return SearchEntry(shown, routed, official)


def matches(entry: SearchEntry, term: str) -> bool:
    """Case-insensitive substring of the shown or the routed name, so both `alp` and
    `library/alp` find `alpine`, and `ghcr.io/owner` finds that owner's repositories."""
    needle = term.lower()
    return needle in entry.name.lower() or needle in entry.routed.lower()


def search_results(
    repositories: Iterable[tuple[str, str]], query: SearchQuery, hosted_namespaces: frozenset[str]
) -> dict[str, Any]:
    """The v1 search document for these (registry, repository) pairs: the matches sorted by
    shown name (the mirror has no stars or pull counts to rank by), one page of them, and
    the totals over all pages. A page past the end is empty, not an error."""
    entries = (search_entry(*pair, hosted_namespaces) for pair in repositories)
    found = sorted(
        (entry for entry in entries if matches(entry, query.term)),
        key=lambda entry: (entry.name, entry.routed),
    )
    start = (query.page - 1) * query.page_size
    return {
        "num_results": len(found),
        "num_pages": math.ceil(len(found) / query.page_size),
        "page": query.page,
        "page_size": query.page_size,
        "query": query.term,
        "results": [
            {
                "name": entry.name,
                "description": "",
                "is_official": entry.is_official,
                "is_automated": False,
                "star_count": 0,
            }
            for entry in found[start : start + query.page_size]
        ],
    }


async def docker_search(request: web.Request) -> web.Response:
    """`GET /v1/search?q=&n=&page=`: behind the same client gate as `/v2/`, so a mirror that
    asks its users to log in answers a search only to them (the daemon sends the login it
    has for the mirror's address)."""
    await request.app[CLIENT_AUTH].check(request.headers.get("Authorization"))
    if request.method not in READ_METHODS:
        raise RegistryError.unsupported()
    query = parse_search_query(
        request.query.get("q"), request.query.get("n"), request.query.get("page")
    )
    repositories = await visible_repositories(request)
    document = search_results(repositories, query, request.app[CONFIG].hosted_names)
    return web.Response(body=json.dumps(document).encode(), content_type="application/json")
