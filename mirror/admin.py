"""The admin API, on its own listener (127.0.0.1:5001 by default) so it never faces the LAN.

Behind `mirror stats`, `pin`, `unpin` and `purge`: what only the running server can do, because
it owns the cache's usage figures, the eviction lock and the counters. The web page's buttons
post the same endpoints as HTML forms and are sent back to the page they came from.

A browser on the operator's machine can be made to post to 127.0.0.1 by any web site, so
requests that change something and come from a browser (they carry Origin or Sec-Fetch-Site)
must come from this listener's own page. Every request, reads included, must be addressed by an
IP address or a local host name: a page whose name an attacker re-resolves to 127.0.0.1 (DNS
rebinding) is same-origin to the browser and could otherwise read the page and the stats.
The CLI sends neither Origin nor Sec-Fetch-Site; its `--admin` URL names an IP address,
`localhost` or the machine's own host name.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CollectorRegistry

from mirror.config import ConfigError, parse_duration
from mirror.errors import RegistryError
from mirror.hosted.gc import GRACE, collect
from mirror.jsondoc import parse_json
from mirror.keys import CONFIG, EVICTOR, HEALTH, HOSTED_REGISTRY, INDEX, RESOLVER
from mirror.mediatypes import INDEX_TYPES, references
from mirror.metrics import registry
from mirror.reference import parse_image
from mirror.store.health import BackendUnavailable
from mirror.web.pages import WebPages

MAIN = web.AppKey("main", web.Application)


def _counter(metrics: CollectorRegistry, name: str, **labels: str) -> float:
    return metrics.get_sample_value(name, labels) or 0.0


FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_type in FORMS:
        return {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    try:
        body = await request.json(loads=parse_json)
    except ValueError:
        raise RegistryError(400, "UNSUPPORTED", "the body must be JSON") from None
    if not isinstance(body, dict):
        raise RegistryError(400, "UNSUPPORTED", "the body must be a JSON object")
    return body


def _image(main: web.Application, body: dict[str, Any]) -> tuple[str, str, str]:
    image = body.get("image")
    if not isinstance(image, str):
        raise RegistryError(400, "NAME_INVALID", "`image` (e.g. alpine:3.19) is required")
    return parse_image(image, main[CONFIG].registry_names)


async def stats(request: web.Request) -> web.Response:
    main = request.app[MAIN]
    evictor = main[EVICTOR]
    _, blobs, manifests = await main[INDEX].usage()
    metrics = registry()  # all workers' counters, read once
    # Manifest and blob requests only: the ones a cache can answer or not.
    results = ("hit", "miss", "stale", "coalesced", "error")
    requests = {
        r: sum(_counter(metrics, "mirror_requests_total", kind=k, method=m, result=r)
               for k in ("manifest", "blob") for m in ("GET", "HEAD"))
        for r in results
    }  # fmt: skip
    return web.json_response(
        {
            "disk_bytes": evictor.usage,
            "max_bytes": evictor.max_size,
            "blobs": blobs,
            "manifests": manifests,
            "requests": requests,
            "served_from_cache_bytes": _counter(
                metrics, "mirror_served_bytes_total", source="cache"
            ),
            "served_from_upstream_bytes": _counter(
                metrics, "mirror_served_bytes_total", source="upstream"
            ),
            "fetched_from_upstream_bytes": _counter(metrics, "mirror_upstream_bytes_total"),
            "saved_bytes": _counter(metrics, "mirror_saved_bytes_total"),
            "evictions": _counter(metrics, "mirror_evictions_total"),
            "evicted_bytes": _counter(metrics, "mirror_evicted_bytes_total"),
        }
    )


async def pin(request: web.Request) -> web.Response:
    """Pin an image: resolve it (fetching manifests as needed), protect all it names."""
    main = request.app[MAIN]
    registry, repository, reference = _image(main, await _body(request))
    resolver = main[RESOLVER]
    top, _ = await resolver.resolve(registry, repository, reference, frozenset())
    if top.media_type in INDEX_TYPES:
        for child, _ in references(top.data):
            await resolver.resolve(registry, repository, child, frozenset())
    closure = await main[INDEX].closure(top.digest)
    await main[INDEX].pin(registry, repository, reference, set(closure))
    return await _reply(
        request,
        {
            "image": f"{registry}/{repository}:{reference}",
            "digest": top.digest,
            "pinned_digests": len(closure),
            "bytes": sum(closure.values()),
        },
    )


async def unpin(request: web.Request) -> web.Response:
    main = request.app[MAIN]
    registry, repository, reference = _image(main, await _body(request))
    removed = await main[INDEX].unpin(registry, repository, reference)
    return await _reply(
        request, {"image": f"{registry}/{repository}:{reference}", "unpinned": removed > 0}
    )


async def purge(request: web.Request) -> web.Response:
    """Remove a tag, or an image, now; or all unused content.

    `repo:tag` removes that tag only; `repo@digest` removes the image: every tag of the
    repository that names it. Then the content goes, except what is still in use: named by
    another tag (alias tags share a digest), by another cached image, or pinned."""
    main = request.app[MAIN]
    body = await _body(request)
    evictor = main[EVICTOR]
    index = main[INDEX]
    if "unused_for" in body:
        try:
            seconds = parse_duration(body["unused_for"], "unused_for")
        except ConfigError as exc:
            raise RegistryError(400, "UNSUPPORTED", str(exc)) from None
        done = await evictor.expire(seconds)
        return web.json_response({"removed_blobs": done.count, "removed_bytes": done.bytes})
    registry, repository, reference = _image(main, body)
    if ":" in reference:
        digest, tags = reference, await index.tags_of(registry, repository, reference)
    else:
        row = await index.get_tag(registry, repository, reference)
        if row is None:
            raise RegistryError.manifest_unknown(reference, "this image is not cached")
        digest, tags = row.digest, [reference]
    for tag in tags:
        await index.delete_tag(registry, repository, tag)
    evictor.forgotten()  # every worker drops the tag from its memory, content removed or not
    closure = await index.closure(digest)
    inside = set(closure)
    in_use = (
        await index.referenced_outside(inside)
        | await index.tagged(inside)
        | (await index.pinned() & inside)
    )
    keep: set[str] = set()
    for root in in_use:
        keep |= set(await index.closure(root))
    doomed = [
        (d, size)
        for d, size in closure.items()
        if d not in keep and await index.get_blob(d) is not None
    ]
    done = await evictor.remove(doomed)
    return await _reply(
        request,
        {"removed_tags": len(tags), "removed_blobs": done.count, "removed_bytes": done.bytes},
    )


async def gc(request: web.Request) -> web.Response:
    """`mirror gc`: collect hosted content no manifest names (hosted/gc.py) now; with
    `dry_run`, only say what would go. `grace`: how long an uploaded blob no manifest names
    yet is spared (a push in progress)."""
    main = request.app[MAIN]
    hosted = main.get(HOSTED_REGISTRY)
    if hosted is None:
        raise RegistryError(404, "UNSUPPORTED", "no hosted namespaces are configured")
    body = await _body(request)
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise RegistryError(400, "UNSUPPORTED", "dry_run: true or false")
    try:
        grace = parse_duration(body.get("grace", GRACE), "grace")
    except ConfigError as exc:
        raise RegistryError(400, "UNSUPPORTED", str(exc)) from None
    done = await collect(main[INDEX], main[EVICTOR], hosted.gc_lock, grace, dry_run)
    return web.json_response(
        {
            "blobs": done.blobs,
            "bytes": done.bytes,
            "digests": list(done.digests),
            "dry_run": dry_run,
        }
    )


async def _reply(request: web.Request, result: dict[str, Any]) -> web.Response:
    """JSON for the API; for a form from the web page, back to the page it was posted from."""
    if request.content_type not in FORMS:
        return web.json_response(result)
    back = (await _body(request)).get("back", "/")
    if not back.startswith("/") or back.startswith("//") or "\\" in back:
        back = "/"  # only this listener's own pages (browsers read "/\\x" as "//x")
    raise web.HTTPSeeOther(back)


def _local_host(host: str) -> bool:
    name = urlsplit(f"//{host}").hostname or ""
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return name in ("localhost", socket.gethostname().lower())


@web.middleware
async def same_origin(request: web.Request, handler: Any) -> web.StreamResponse:
    """Refuse requests addressed to a foreign host name (DNS rebinding), and browser requests
    that change something unless they come from this listener's own page."""
    if not _local_host(request.host):
        raise RegistryError(403, "DENIED", "the admin API answers only local host names")
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        origin = request.headers.get("Origin")
        site = request.headers.get("Sec-Fetch-Site")
        from_browser = origin is not None or site is not None
        if from_browser and (
            site not in (None, "same-origin", "none")
            or (origin is not None and urlsplit(origin).netloc != request.host)
        ):
            raise RegistryError(403, "DENIED", "cross-site request refused")
    response: web.StreamResponse = await handler(request)
    return response


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except RegistryError as exc:
        return exc.response()
    except BackendUnavailable as exc:
        # The bucket or the database is down: a pin or purge cannot be done now; say so
        # (503, Retry-After) rather than fail with a bare 500.
        return request.app[MAIN][HEALTH].refused(exc).response()


def create_admin_app(
    main: web.Application, extra_routes: list[web.RouteDef] | None = None
) -> web.Application:
    admin = web.Application(middlewares=[json_errors, same_origin])
    admin[MAIN] = main
    if main[CONFIG].web_ui != "off":
        admin.router.add_routes(WebPages(main, admin=True).routes())
    admin.router.add_get("/admin/stats", stats)
    admin.router.add_post("/admin/pin", pin)
    admin.router.add_post("/admin/unpin", unpin)
    admin.router.add_post("/admin/purge", purge)
    admin.router.add_post("/admin/gc", gc)
    admin.router.add_routes(extra_routes or [])
    return admin
