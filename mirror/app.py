"""Builds the aiohttp Application: routes, the error middleware, start-up and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from aiohttp import web

from mirror import __version__
from mirror.access import AccessTracker
from mirror.admin import create_admin_app
from mirror.clientauth import ClientAuth, load_htpasswd
from mirror.cluster.claims import Claims
from mirror.cluster.client import PeerClient
from mirror.cluster.notify import Coherence
from mirror.cluster.peers import peer_app
from mirror.config import Config, ConfigError
from mirror.errors import RegistryError
from mirror.evict import Evictor
from mirror.fetch import BlobFetcher
from mirror.handlers import add_cache_header, catalog, v2_dispatch, v2_root
from mirror.hitpath import hit_path_factory
from mirror.hosted.access import HostedAccess
from mirror.hosted.gc import collect_periodically
from mirror.hosted.handlers import HostedRegistry
from mirror.hosted.quota import RESERVATIONS, HostedQuota
from mirror.hosted.repository import HostedContent
from mirror.hosted.uploads import UploadSessions, sweep_uploads
from mirror.keys import (
    ACCESS,
    CACHE_RESULT,
    CLIENT_AUTH,
    CONFIG,
    CONTENT,
    EVICTOR,
    FETCHER,
    HEALTH,
    HOSTED_REGISTRY,
    INDEX,
    MEMBERSHIP,
    REFERRERS,
    RESOLVER,
    ROUTE,
    STARTED,
    STORE,
    TAG_LISTS,
    TRAFFIC,
    UPSTREAMS,
    VIEWS,
    VISIBILITY,
)  # fmt: skip
from mirror.listeners import ListenError, bind
from mirror.logs import AccessLogger
from mirror.manifests import ManifestResolver
from mirror.membership import BlobMembership
from mirror.metrics import BUILD_INFO, CACHE_MAX_BYTES, observers
from mirror.missing import MissingCache
from mirror.probes import add_probe_routes, add_readiness, healthz_for, metrics
from mirror.recovery import mark_pending, open_checked
from mirror.referrers import ReferrerLists
from mirror.search import docker_search
from mirror.shared import FileLock, SharedState
from mirror.store.blobs import BlobStore
from mirror.store.engines import open_content, open_index
from mirror.store.health import BackendHealth, BackendUnavailable
from mirror.store.index import Index
from mirror.tags import TagLists
from mirror.traffic import TrafficRecorder
from mirror.upstream.auth import TokenCache
from mirror.upstream.client import RegistryClient, make_session
from mirror.visibility import Visibility
from mirror.web.images import ImageViews
from mirror.web.pages import WebPages
from mirror.webhooks import Webhooks

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
    except BackendUnavailable as exc:
        refusal = request.app[HEALTH].refused(exc)
        if _started(request):
            raise
        return refusal.response()
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
    return bool(request.get(STARTED))


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every request by kind and cache result (labels with bounded values).

    A request that touches no cache (`/v2/`, `_catalog`, the web page, probes, `/metrics`) is
    result `none`: counted as a hit, it would inflate the hit ratio with requests that saved
    nothing."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        route = request.get(ROUTE)
        kind = route.endpoint.value if route is not None else "other"
        kind = kind if kind in ("manifest", "blob", "tags") else "other"
        result = request.get(CACHE_RESULT) if kind != "other" else None
        result = "error" if status >= 400 else result or "none"
        method = request.method if request.method in ("GET", "HEAD") else "other"
        counter, duration = observers(kind, method, result)
        counter.inc()
        duration.observe(time.perf_counter() - started)


async def prepare_data(config: Config) -> tuple[Index, SharedState]:
    """The start-up part of recovery (once per start, before anything serves: temp files,
    a damaged index), and the cache usage published to the shared state every worker reads.
    The rest of recovery, a look at every file, is marked due: the primary process runs it
    in the background while the cache serves (recovery.py, evict.py)."""
    store = BlobStore(config.data_dir)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    if config.s3 is not None or config.index_url is not None:
        # The index is shared and the truth; the local files are this machine's staging and
        # hot tier: only their temp files (crashed downloads) go. The bucket is swept apart.
        store.prepare()
        index = await open_index(config)
    else:
        index, report = await open_checked(store, config.data_dir / "index.db")
        mark_pending(config.data_dir)
        if report.repaired:
            log.warning("%s", report.describe())
    shared = SharedState(config.data_dir / "state")
    if config.hosted:  # before any worker serves: no push of a previous run is in flight
        HostedQuota.reset(config.data_dir / RESERVATIONS)
    usage, _, _ = await index.usage()
    shared.set_usage(usage)
    return index, shared


async def create_app(config: Config, worker: int | None = None) -> web.Application:
    """Open the store and index, the upstream clients, and wire them onto an Application.

    `worker` is None for a single process (which recovers the data itself), else this worker's
    number: the supervisor recovered already, and worker 0 runs the periodic maintenance.
    """
    store = BlobStore(config.data_dir)
    if worker is None:
        index, shared = await prepare_data(config)
    else:
        index, shared = await open_index(config), SharedState(config.data_dir / "state")
    try:
        content = await open_content(config, store)
    except BaseException:
        await index.close()
        raise
    content.start(index, primary=worker in (None, 0), generation=lambda: shared.generation)
    access = AccessTracker(index, content)
    # Cluster mode (cluster/): claims for cluster-wide single flight and eviction, the peer
    # client for streaming other replicas' downloads, notifications for coherence.
    cluster: tuple[Claims, PeerClient] | None = None
    if config.clustered:
        assert config.index_url is not None and config.cluster_secret is not None
        claims = await Claims.open(config.index_url, config.index_password, config.peer_url)
        cluster = (claims, PeerClient(config.cluster_secret))
        coherence = Coherence(config.index_url, config.index_password, shared)
        await coherence.start()
    webhooks = Webhooks(config.webhooks)
    events = webhooks.emit
    evictor = Evictor(
        index, content, access, config.max_size,
        {name: reg.tag_ttl for name, reg in config.registries.items()}, config.max_age,
        shared=shared, primary=worker in (None, 0), events=events,
        index_shared=config.index_url is not None,
        claims=cluster[0] if cluster is not None else None,
    )  # fmt: skip
    CACHE_MAX_BYTES.set(config.max_size)
    await evictor.start()
    session = make_session(config.upstream_read_timeout)
    tokens = TokenCache()
    clients = {
        name: RegistryClient(reg, session, tokens, events)
        for name, reg in config.registries.items()
    }
    client_auth = ClientAuth(
        load_htpasswd(config.auth_htpasswd) if config.auth_htpasswd else None, config.anonymous_pull
    )
    # Registries with credentials serve only what anonymous clients could pull (visibility.py).
    anonymous = TokenCache()
    visibility = Visibility(
        {
            name: RegistryClient(replace(reg, username=None, password=None), session, anonymous)
            for name, reg in config.registries.items() if reg.credentials
        },
        lambda name, user, password: RegistryClient(
            replace(config.registries[name], username=user, password=password), session,
            TokenCache(),
        ),
        identify=client_auth.identify,
    )  # fmt: skip
    missing = MissingCache(config.negative_ttl)
    health = BackendHealth(
        {content.name: content.ping, "postgresql" if config.index_url else "sqlite": index.ping}
    )
    fetcher = BlobFetcher(
        content, index, clients, missing, evictor, config.max_upstream_fetches, health, cluster
    )
    resolver = ManifestResolver(
        index, content, clients, missing, evictor, shared, events=events,
        claims=cluster[0] if cluster is not None else None,
    )  # fmt: skip
    traffic = TrafficRecorder(index)
    tag_lists = TagLists(clients)
    referrers = ReferrerLists(clients, resolver)
    membership = BlobMembership(index, clients, visibility, shared)

    app = web.Application(middlewares=[observe, registry_errors], client_max_size=1024 * 1024)
    app[CONFIG] = config
    app[STORE] = store
    app[INDEX] = index
    app[UPSTREAMS] = clients
    app[FETCHER] = fetcher
    app[RESOLVER] = resolver
    app[TAG_LISTS] = tag_lists
    app[REFERRERS] = referrers
    app[MEMBERSHIP] = membership
    app[EVICTOR] = evictor
    app[ACCESS] = access
    app[VISIBILITY] = visibility
    app[TRAFFIC] = traffic
    app[CONTENT] = content
    app[HEALTH] = health
    app[VIEWS] = ImageViews(index, content)
    app[CLIENT_AUTH] = client_auth
    hosted_tasks: list[asyncio.Task[None]] = []
    if config.hosted:
        uploads = UploadSessions(config.data_dir / "uploads")
        gc_lock = FileLock(config.data_dir / "hosted-gc.lock")
        quota = HostedQuota(index, config.hosted_max_size, config.data_dir / RESERVATIONS)
        tag_lock = FileLock(config.data_dir / "hosted-tags.lock")
        app[HOSTED_REGISTRY] = HostedRegistry(
            config,
            HostedAccess(config.hosted, app[CLIENT_AUTH]),
            uploads,
            HostedContent(index, content, fetcher, evictor, quota, gc_lock, tag_lock, events),
            visibility,
            membership,
            gc_lock,
        )
        if worker in (None, 0):
            hosted_tasks = [
                asyncio.create_task(sweep_uploads(uploads)),
                asyncio.create_task(collect_periodically(index, evictor, gc_lock)),
            ]
    app.on_response_prepare.append(add_cache_header)
    add_probe_routes(app)
    add_readiness(app)
    app.router.add_route("*", "/v2/", v2_root)
    app.router.add_route("*", "/v2", v2_root)
    app.router.add_route("*", "/v2/_catalog", catalog)  # before the catch-all below
    app.router.add_route("*", "/v1/search", docker_search)
    app.router.add_route("*", "/v2/{path:.+}", v2_dispatch)
    if config.web_ui == "registry":
        app.router.add_routes(WebPages(app, admin=False).routes())
    webhooks.start()
    traffic.start()

    async def shutdown(_app: web.Application) -> None:
        for task in hosted_tasks:
            task.cancel()
        await asyncio.gather(*hosted_tasks, return_exceptions=True)
        await traffic.close()
        await webhooks.close()
        await fetcher.close()
        await referrers.close()
        await membership.close()
        await tag_lists.close()
        await resolver.close()
        await visibility.close()
        await evictor.close()
        for client in clients.values():
            await client.close()
        await session.close()
        await health.close()
        if cluster is not None:
            await coherence.close()
            await cluster[1].close()
            await cluster[0].close()
        await content.close()
        await index.close()
        shared.close()

    app.on_cleanup.append(shutdown)
    return app


def raise_open_files_limit() -> None:
    """Every connection costs descriptors (its socket, an open blob, a dup while a blob is
    sent), and 1024, a common soft default, runs out at a few hundred slow clients. The hard
    limit is the operator's decision; the soft one is ours to raise up to it (as nginx does)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The registry listener's TLS settings, loaded before start so a bad file stops the start."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls_cert/tls_key: cannot load {config.tls_cert}: {exc}") from exc
    return context


async def run(
    config: Config,
    tls: ssl.SSLContext | None = None,
    worker: int | None = None,
    ready: Callable[[], None] | None = None,
) -> None:
    """Serve the registry API (and, in a single process or worker 0, the admin API) until
    SIGTERM or SIGINT; call `ready` once both listen. Workers share the listen address
    through SO_REUSEPORT.

    The addresses are bound first: one another process holds stops the start (ListenError)
    before recovery or anything else touches the data directory (see listeners.py).
    """
    raise_open_files_limit()
    admin_sockets: list[socket.socket] = []
    if worker in (None, 0):
        admin_sockets = bind(config.admin_host, config.admin_port, "admin_listen", reuse_port=False)
    main_sockets: list[socket.socket] = []
    peer_sockets: list[socket.socket] = []
    try:
        main_sockets = bind(
            config.listen_host, config.listen_port, "listen", reuse_port=worker is not None
        )
        if config.peer_host is not None and config.peer_port is not None:
            peer_sockets = bind(
                config.peer_host, config.peer_port, "peer_listen", reuse_port=worker is not None
            )
    except ListenError:
        for sock in admin_sockets + main_sockets:
            sock.close()
        raise
    try:
        app = await create_app(config, worker)
    except BaseException:
        for sock in admin_sockets + main_sockets + peer_sockets:
            sock.close()
        raise
    BUILD_INFO.labels(__version__).set(1)
    runner = web.AppRunner(app, access_log_class=AccessLogger, shutdown_timeout=30)
    await runner.setup()
    assert runner.server is not None
    admin_app = create_admin_app(
        app, [web.get("/metrics", metrics), web.get("/healthz", healthz_for(app))]
    )
    admin_runner = web.AppRunner(admin_app, access_log=None)
    await admin_runner.setup()
    peer_runner: web.AppRunner | None = None
    if peer_sockets:
        assert config.cluster_secret is not None
        peer_runner = web.AppRunner(
            peer_app(config.cluster_secret, app[FETCHER].peek), access_log=None,
            shutdown_timeout=30,
        )  # fmt: skip
        await peer_runner.setup()
    loop = asyncio.get_running_loop()
    listeners: list[asyncio.Server] = []
    try:
        # Admin first: once the registry port answers, everything answers.
        for sock in admin_sockets:
            await web.SockSite(admin_runner, sock).start()
        for sock in peer_sockets:
            assert peer_runner is not None
            await web.SockSite(peer_runner, sock).start()
        # Connections start in the hit path, which hands them to aiohttp (see hitpath.py).
        for sock in main_sockets:
            listeners.append(
                await loop.create_server(
                    hit_path_factory(app, runner.server), sock=sock, ssl=tls, backlog=1024
                )
            )
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready()
        await stop.wait()
        log.info("shutting down")
    finally:
        for listener in listeners:
            listener.close()  # no new connections; runner.cleanup drains the open ones
        await admin_runner.cleanup()
        if peer_runner is not None:
            await peer_runner.cleanup()
        await runner.cleanup()
