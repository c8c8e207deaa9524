"""Manifest hits answered before routing: the requests a CI fleet repeats most.

A pull starts with manifest requests (by tag, then by digest); when the answer is in a
worker's memory, the router, the middleware chain and the response signals are pure
overhead: together they were half the cost of such a hit. This handler sits in front of
the Application and answers exactly those requests itself, with the same bytes, headers,
metrics and access line; everything else (misses, conditional requests, percent-encoded
paths, errors) goes to the Application unchanged.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from mirror.errors import RegistryError
from mirror.keys import ACCESS, CONFIG, RESOLVER
from mirror.mediatypes import parse_accept
from mirror.metrics import observers
from mirror.reference import Endpoint, parse_v2_path
from mirror.responses import manifest_response

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

# Pure and small: a hit path sees the same few thousand paths over and over.
_route = functools.lru_cache(maxsize=8192)(parse_v2_path)


def with_hit_path(app: web.Application, fallback: Handler) -> Handler:
    resolver, access, names = app[RESOLVER], app[ACCESS], app[CONFIG].registry_names

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        path = request.raw_path
        if (
            request.method not in ("GET", "HEAD")
            or not path.startswith("/v2/")
            or "/manifests/" not in path
            or "%" in path
            or "If-None-Match" in request.headers
        ):
            return await fallback(request)
        try:
            route = _route(path[4:], request.query.get("ns"), names)
        except RegistryError:
            return await fallback(request)
        manifest = None
        if route.endpoint is Endpoint.MANIFEST:
            client_types = parse_accept(tuple(request.headers.getall("Accept", ())))
            manifest = resolver.served_from_memory(route, client_types)
        if manifest is None:
            return await fallback(request)
        request["cache"] = "hit"
        access.touch(manifest.digest)
        response = manifest_response(request, manifest)
        response.headers["X-Mirror-Cache"] = "hit"
        counter, duration = observers("manifest", request.method, "hit")
        counter.inc()
        duration.observe(time.perf_counter() - started)
        return response

    return handle
