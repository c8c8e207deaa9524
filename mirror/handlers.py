"""Thin HTTP handlers: parse the request, ask the cache, respond. No business logic here."""

from __future__ import annotations

import contextlib
import json
from urllib.parse import urlencode

from aiohttp import web

from mirror.errors import RegistryError
from mirror.fetch import FollowSource
from mirror.keys import (
    ACCESS,
    CACHE_RESULT,
    CLIENT_AUTH,
    CONFIG,
    FETCHER,
    HOSTED_REGISTRY,
    INDEX,
    MEMBERSHIP,
    REFERRERS,
    RESOLVER,
    ROUTE,
    STORE,
    TAG_LISTS,
    VISIBILITY,
)  # fmt: skip
from mirror.mediatypes import OCI_INDEX, parse_accept
from mirror.reference import HOSTED, Endpoint, Route, listed_name, parse_v2_path
from mirror.referrers import referrers_index
from mirror.responses import (
    manifest_response,
    send_blob,
    send_blob_head,
    send_uncached_blob,
)
from mirror.store.source import Origin
from mirror.tags import paginate, parse_n, tags_page
from mirror.visibility import CHALLENGE

API_VERSION_HEADER = {"Docker-Distribution-API-Version": "registry/2.0"}
READ_METHODS = ("GET", "HEAD")


def _authorization(request: web.Request) -> str | None:
    return request.headers.get("Authorization")


async def v2_root(request: web.Request) -> web.Response:
    """The API version check. A challenge only where credentials are needed: the mirror's own
    users without `anonymous_pull`, `private = "passthrough"`, or hosted namespaces to push
    to. Docker and skopeo learn auth here, and Docker then sends the user's Docker Hub login
    (moby#42022)."""
    if request.method not in READ_METHODS:
        raise RegistryError.unsupported()
    auth = request.app[CLIENT_AUTH]
    # Hosted namespaces: push clients (docker, skopeo, podman) send credentials only where
    # this ping asked for them, whatever the later requests answer.
    hosted = HOSTED_REGISTRY in request.app
    wants_login = auth.challenges or request.app[VISIBILITY].challenges or hosted
    if wants_login and "Authorization" not in request.headers:
        raise RegistryError(401, "UNAUTHORIZED", "credentials accepted", headers=CHALLENGE)
    await auth.check(_authorization(request))
    return web.Response(body=b"{}", content_type="application/json", headers=API_VERSION_HEADER)


async def v2_dispatch(request: web.Request) -> web.StreamResponse:
    await request.app[CLIENT_AUTH].check(_authorization(request))
    path = request.match_info["path"]
    hosted = request.app.get(HOSTED_REGISTRY)
    if hosted is not None:
        answer = await hosted.dispatch(request, path)
        if answer is not None:
            return answer
    if request.method not in READ_METHODS:
        raise RegistryError.unsupported()
    config = request.app[CONFIG]
    route = parse_v2_path(path, request.query.get("ns"), config.registry_names)
    request[ROUTE] = route
    if route.endpoint is Endpoint.MANIFEST:
        return await manifest(request, route)
    if route.endpoint is Endpoint.BLOB:
        return await blob(request, route)
    if route.endpoint is Endpoint.TAGS:
        return await tags(request, route)
    if route.endpoint is Endpoint.REFERRERS:
        return await referrers(request, route)
    raise RegistryError.not_found_route(request.path)


async def manifest(request: web.Request, route: Route) -> web.Response:
    await request.app[VISIBILITY].check(
        route.registry, route.repository, f"manifests/{route.reference}", _authorization(request)
    )
    client_types = parse_accept(tuple(request.headers.getall("Accept", ())))
    found, result = await request.app[RESOLVER].for_client(route, client_types)
    request[CACHE_RESULT] = result
    request.app[ACCESS].touch(found.digest)
    return manifest_response(request, found)


async def blob(request: web.Request, route: Route) -> web.StreamResponse:
    """A blob by digest, from disk, from a download in flight, or fetched now.

    Stored once by digest, served per repository: what is on disk or downloading for another
    repository is served under this one only once this one is known to hold it (see
    membership.py). What is fetched now is fetched as this repository, so upstream decides."""
    fetcher = request.app[FETCHER]
    registry, repository, digest = route.registry, route.repository, route.reference
    grant = await request.app[VISIBILITY].check(
        registry, repository, f"blobs/{digest}", _authorization(request)
    )
    if request.method == "HEAD" and not await fetcher.has(digest):
        # A HEAD never starts a download: it is answered with an upstream HEAD, which is free.
        size = await fetcher.upstream_size(registry, repository, digest)
        request[CACHE_RESULT] = "miss"
        return await send_blob_head(request, digest, size)
    if request.app[STORE].full and not await fetcher.has(digest):
        request[CACHE_RESULT] = "miss"
        length, chunks = await fetcher.stream_uncached(registry, repository, digest)
        return await send_uncached_blob(request, digest, length, chunks)
    membership = request.app[MEMBERSHIP]
    for attempt in range(2):
        found = await fetcher.open_or_join(
            registry, repository, digest, redirectable=request.method == "GET"
        )
        if not isinstance(found, tuple):
            with contextlib.closing(found):
                await membership.check(registry, repository, digest, grant)
                request[CACHE_RESULT] = "hit"
                request.app[ACCESS].touch(digest)
                return await send_blob(request, found)
        fetch, joined = found
        if await fetch.origin_known() == (registry, repository):
            break
        await membership.check(registry, repository, digest, grant)
        # A download for another repository can be refused for that repository (it does not
        # hold the blob); this one does, and downloads it itself rather than fail with it.
        if attempt or not await fetch.refused():
            break
    request[CACHE_RESULT] = "coalesced" if joined else "miss"
    # Bytes of a download another replica makes (origin None) did not cross the upstream for
    # this client: counted as served from the cache, so cluster totals count each once.
    origin: Origin = "upstream" if not joined and fetch.origin is not None else "cache"
    with contextlib.closing(FollowSource(fetch, origin)) as source:
        return await send_blob(request, source)


async def tags(request: web.Request, route: Route) -> web.Response:
    await request.app[VISIBILITY].check(
        route.registry, route.repository, "tags/list", _authorization(request)
    )
    parse_n(request.query.get("n"))  # a bad `n` is refused before any upstream request
    found, result = await request.app[TAG_LISTS].tags(
        route.registry,
        route.repository,
        lambda: request.app[INDEX].list_tags(route.registry, route.repository),
    )
    request[CACHE_RESULT] = result
    body, link = tags_page(route.repository, found, request.query, request.path)
    headers = {"Link": link} if link else {}
    return web.Response(body=body, content_type="application/json", headers=headers)


async def referrers(request: web.Request, route: Route) -> web.Response:
    """`GET /v2/<name>/referrers/<digest>`: always an OCI index (see referrers.py). A HEAD
    gets the same headers."""
    digest = route.reference
    await request.app[VISIBILITY].check(
        route.registry, route.repository, f"manifests/{digest}", _authorization(request)
    )
    found, result = await request.app[REFERRERS].of(route.registry, route.repository, digest)
    request[CACHE_RESULT] = result
    body, filtered = referrers_index(found, request.query.getall("artifactType", ()))
    headers = {"OCI-Filters-Applied": "artifactType"} if filtered else {}
    return web.Response(body=body, content_type=OCI_INDEX, headers=headers)


async def visible_repositories(request: web.Request) -> list[tuple[str, str]]:
    """(registry, repository) of every cached or hosted repository this client may see.

    One filter for every listing (`_catalog`, `/v1/search`), so a name that a pull would
    refuse is never disclosed by any of them: a hosted repository only to users its
    namespace lets pull, an upstream one with credentials only once known to be public
    (see visibility.py).
    """
    visibility = request.app[VISIBILITY]
    hosted = request.app.get(HOSTED_REGISTRY)
    return [
        (registry, repository)
        for registry, repository in await request.app[INDEX].repositories()
        if (
            visibility.known_public(registry, repository)
            if registry != HOSTED
            else hosted is not None
            and await hosted.access.may_pull(repository, _authorization(request))
        )
    ]


async def catalog(request: web.Request) -> web.Response:
    """`GET /v2/_catalog`: the repositories this mirror holds, paginated as the spec says.

    Docker Hub repositories are listed by name (`library/alpine`), others with their registry
    as prefix (`ghcr.io/owner/app`), the form the mirror routes. A repository from a registry
    with credentials is listed only once it is known to be public (see visibility.py).
    """
    await request.app[CLIENT_AUTH].check(_authorization(request))
    if request.method not in READ_METHODS:
        raise RegistryError.unsupported()
    hosted = request.app[CONFIG].hosted_names
    names = [listed_name(*pair, hosted) for pair in await visible_repositories(request)]
    n = parse_n(request.query.get("n"))
    page, more = paginate(names, n, request.query.get("last"))
    headers = API_VERSION_HEADER.copy()
    if more and page:
        query = urlencode({"last": page[-1], "n": n})
        headers["Link"] = f'</v2/_catalog?{query}>; rel="next"'
    body = json.dumps({"repositories": page}).encode()
    return web.Response(body=body, content_type="application/json", headers=headers)


async def add_cache_header(request: web.Request, response: web.StreamResponse) -> None:
    """`X-Mirror-Cache: hit|miss|stale|coalesced`: lets `mirror prefetch` and people see it."""
    result = request.get(CACHE_RESULT)
    if result is not None and response.status < 400:
        response.headers["X-Mirror-Cache"] = result
