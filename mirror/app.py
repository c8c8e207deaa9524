"""Builds the aiohttp Application: routes, the error middleware, start-up and shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from mirror.config import Config
from mirror.errors import RegistryError
from mirror.fetch import BlobFetcher
from mirror.handlers import v2_dispatch, v2_root
from mirror.keys import CONFIG, FETCHER, INDEX, RESOLVER, STORE, UPSTREAMS
from mirror.manifests import ManifestResolver
from mirror.missing import MissingCache
from mirror.store.blobs import BlobStore
from mirror.store.index import Index
from mirror.upstream.auth import TokenCache
from mirror.upstream.client import RegistryClient, make_session

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def registry_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as distribution-spec JSON, except once a body has started.

    After `prepare()` the status line is gone; re-raising makes aiohttp close the connection,
    which is exactly what a failed fill must do (the client sees a short body).
    """
    try:
        return await handler(request)
    except RegistryError as exc:
        if _started(request):
            raise
        return exc.response()
    except web.HTTPException as exc:
        if exc.status == 405:
            return RegistryError.unsupported().response()
        if exc.status == 404:
            return RegistryError.not_found_route(request.path).response()
        return RegistryError(exc.status, "UNSUPPORTED", exc.reason).response()
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        if _started(request):
            raise
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return RegistryError(500, "UNKNOWN", "internal error").response()


def _started(request: web.Request) -> bool:
    return bool(request.get("started"))


async def create_app(config: Config) -> web.Application:
    """Open the store, index and upstream clients, and wire them onto a new Application."""
    store = BlobStore(config.data_dir)
    removed = store.prepare()
    if removed:
        log.info("removed %d incomplete download(s) left from an earlier run", removed)
    index = await Index.open(config.data_dir / "index.db")
    session = make_session()
    tokens = TokenCache()
    clients = {
        name: RegistryClient(reg, session, tokens) for name, reg in config.registries.items()
    }
    missing = MissingCache(config.negative_ttl)
    fetcher = BlobFetcher(store, index, clients, missing)
    resolver = ManifestResolver(index, store, clients, missing)

    app = web.Application(middlewares=[registry_errors], client_max_size=1024 * 1024)
    app[CONFIG] = config
    app[STORE] = store
    app[INDEX] = index
    app[UPSTREAMS] = clients
    app[FETCHER] = fetcher
    app[RESOLVER] = resolver
    app.router.add_route("*", "/v2/", v2_root)
    app.router.add_route("*", "/v2", v2_root)
    app.router.add_route("*", "/v2/{path:.+}", v2_dispatch)

    async def shutdown(_app: web.Application) -> None:
        await fetcher.close()
        await resolver.close()
        for client in clients.values():
            await client.close()
        await session.close()
        await index.close()

    app.on_cleanup.append(shutdown)
    return app
