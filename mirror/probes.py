"""Operational endpoints outside `/v2/`: `/healthz`, `/readyz`, `/metrics`.

`/healthz` says the process answers, and names a degraded mode; `/readyz` says it should get
traffic: the index and the content store answer (the database and the bucket, when the cache
lives there), the data directory takes writes, and no shutdown has begun (so a load balancer
drains it first).

A full disk is a degraded mode, not unreadiness: cache hits are still served and misses are
relayed from upstream, verified, uncached. Failing readiness for it would make Kubernetes drop
the pod from the Service, and the hits would stop too. So it shows in `/healthz` (still 200),
the `mirror_disk_full` gauge and the log.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mirror.keys import CONFIG, HEALTH, STORE
from mirror.metrics import registry

Handler = Callable[[web.Request], Awaitable[web.Response]]


@dataclass
class Lifecycle:
    shutting_down: bool = False


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)


def healthz_for(main: web.Application) -> Handler:
    """`/healthz` of the main app's state, for its own listener and the admin one."""

    async def healthz(_request: web.Request) -> web.Response:
        if main[STORE].full:
            return web.Response(
                text="ok, degraded: disk full: misses are served from upstream without caching\n"
            )
        return web.Response(text="ok\n")

    return healthz


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    problems: list[str] = []
    if app[LIFECYCLE].shutting_down:
        problems.append("shutting down")
    tmp = app[CONFIG].data_dir / "tmp"
    if not os.access(tmp, os.W_OK):
        problems.append(f"data directory not writable: {tmp}")
    problems += [f"{name} unavailable" for name in await app[HEALTH].probe_all()]
    if problems:
        return web.Response(status=503, text="not ready: " + "; ".join(problems) + "\n")
    return web.Response(text="ready\n")


async def metrics(_request: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(registry()), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def add_probe_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz_for(app))
    app.router.add_get("/metrics", metrics)


async def _mark_shutting_down(app: web.Application) -> None:
    app[LIFECYCLE].shutting_down = True


def add_readiness(app: web.Application) -> None:
    """`/readyz` needs the main app's objects; the admin app proxies to it."""
    app[LIFECYCLE] = Lifecycle()
    app.on_shutdown.append(_mark_shutting_down)
    app.router.add_get("/readyz", readyz)
