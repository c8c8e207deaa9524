"""The web page's handlers: `/` (search and list) and `/image/<registry>/<repository>@<digest>`.

Served read-only on the registry listener (unless `web_ui` says otherwise), where the same
rules as `/v2/` apply: the mirror's own client login, and no repository of a credentialed
registry that anonymous clients could not pull. On the admin listener the operator sees
everything, with pin, unpin and purge buttons (plain forms posting to the admin API).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from mirror.errors import RegistryError
from mirror.keys import CLIENT_AUTH, EVICTOR, HOSTED_REGISTRY, INDEX, TRAFFIC, VIEWS, VISIBILITY
from mirror.reference import HOSTED, routed_name
from mirror.store.index import ImageRow
from mirror.traffic import chart_buckets
from mirror.web import render
from mirror.web.chart import traffic_chart

MAX_QUERY = 200
MAX_PAGE = 10**9  # pages of the web listing; more is past any cache
HEADERS = {
    # Nothing but the page itself: inline CSS, forms back to this origin, no framing.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class WebPages:
    def __init__(self, main: web.Application, admin: bool) -> None:
        self._main = main
        self._admin = admin

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/", self.front), web.get("/image/{path:.+}", self.image)]

    async def front(self, request: web.Request) -> web.Response:
        return await self._answer(request, self._front)

    async def image(self, request: web.Request) -> web.Response:
        return await self._answer(request, self._image)

    async def _answer(
        self, request: web.Request, build: Callable[[web.Request], Awaitable[tuple[str, str]]]
    ) -> web.Response:
        summary = render.Summary(0, 0, 0, 0, 0, 0)
        try:
            await self._allowed(request)
            summary = await self._summary()
            title, body = await build(request)
            status, headers = 200, {}
        except RegistryError as exc:
            title, body = "mirror", render.error(exc.status, exc.message)
            status, headers = exc.status, dict(exc.headers)
        return web.Response(
            text=render.page(title, summary, body),
            status=status,
            content_type="text/html",
            headers={**HEADERS, **headers},
        )

    async def _allowed(self, request: web.Request) -> None:
        if not self._admin:
            await self._main[CLIENT_AUTH].check(request.headers.get("Authorization"))

    def _visible(self, registry: str, repository: str) -> bool:
        """What the page lists: hosted repositories whose namespace anyone may pull (one with
        a `pull` list only on the admin listener: the page knows no user), and cached ones
        anonymous clients could pull."""
        if self._admin:
            return True
        if registry == HOSTED:
            hosted = self._main.get(HOSTED_REGISTRY)
            return hosted is not None and hosted.access.listed_to_anyone(repository)
        return self._main[VISIBILITY].known_public(registry, repository)

    @property
    def _gated(self) -> bool:
        hosted = self._main.get(HOSTED_REGISTRY)
        restricted = hosted is not None and hosted.access.restricted
        return restricted or self._main[VISIBILITY].gated

    async def _summary(self) -> render.Summary:
        traffic = self._main[TRAFFIC]
        await traffic.flush()  # this worker's latest figures; the others' flush every 10 s
        total = await self._main[INDEX].traffic_total()
        evictor = self._main[EVICTOR]
        return render.Summary(
            evictor.usage, evictor.max_size, total.hits, total.misses, total.cache_bytes,
            total.upstream_bytes,
        )  # fmt: skip

    async def _front(self, request: web.Request) -> tuple[str, str]:
        query = request.query.get("q", "").strip()[:MAX_QUERY]
        try:
            # A page past any listing is an empty page; the index binds offsets as int64.
            number = min(max(1, int(request.query.get("page", "1"))), MAX_PAGE)
        except ValueError:
            raise RegistryError(400, "UNSUPPORTED", "page must be a number") from None
        offset = (number - 1) * render.PAGE_SIZE
        total, rows = await self._search(query, offset)
        images = await self._main[VIEWS].listed(rows)
        return "mirror" + (f": {query}" if query else ""), render.listing(
            images, total, query, offset, self._admin, await self._charts()
        )

    async def _search(self, query: str, offset: int) -> tuple[int, list[ImageRow]]:
        index = self._main[INDEX]
        if self._admin or not self._gated:
            return await index.search_images(query, offset, render.PAGE_SIZE)
        # Some rows may be hidden: filter every match, then page (counts stay right).
        _, rows = await index.search_images(query, 0, -1)
        shown = [r for r in rows if self._visible(r.registry, r.repository)]
        return len(shown), shown[offset : offset + render.PAGE_SIZE]

    async def _charts(self) -> str:
        traffic = self._main[TRAFFIC]
        now = traffic.hour()
        rows = await self._main[INDEX].traffic_since(now - 30 * 24)
        hourly = chart_buckets(rows, now, 48, 1)
        daily = chart_buckets(rows, now, 30, 24)
        return render.charts(
            traffic_chart(hourly, 1, "Bytes served per hour, last 48 hours"),
            traffic_chart(daily, 24, "Bytes served per day, last 30 days"),
        )

    async def _image(self, request: web.Request) -> tuple[str, str]:
        name, at, digest = request.match_info["path"].rpartition("@")
        registry, _, repository = name.partition("/")
        found = None
        if at and repository and self._visible(registry, repository):
            found = await self._main[VIEWS].detail(registry, repository, digest, self._visible)
        if found is None:
            raise RegistryError(404, "MANIFEST_UNKNOWN", "this image is not in the cache")
        title = routed_name(registry, repository)
        return title, render.detail(found, self._admin)
