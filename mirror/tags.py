"""Tag lists served as the distribution-spec says, whatever the upstream does.

The spec ("Listing Tags"): tags in lexical order, at most `n` of them, those after `last`,
and a `Link: <...>; rel="next"` to the next page. Upstreams differ: some ignore `n` and
`last`, some answer unsorted, some page with opaque parameters (`?cursor=...`). So the mirror
reads the upstream's whole list, following its Link pages with every parameter it gives
(upstream/pages.py, bounded), merges, sorts and dedupes it, keeps it in memory for a short
while per repository (a client paging with n=100 through 10,000 tags costs one upstream walk,
not one per page), and pages it itself. Upstream unreachable: the list kept in memory, else
the tags the index holds, served stale, so a client that lists before pulling works offline.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlencode

from cachetools import LRUCache

from mirror.errors import RegistryError
from mirror.jsondoc import parse_json
from mirror.manifests import Result
from mirror.singleflight import SingleFlight
from mirror.upstream.client import RegistryClient, is_transient
from mirror.upstream.pages import read_pages

log = logging.getLogger(__name__)

MAX_TAGS_BODY = 16 * 1024 * 1024  # upstream bytes read for one repository's list, all pages
MAX_TAG_PAGES = 200
MAX_N = 10**18  # a page size meaning "all": more than any list holds, within int64
LIST_TTL = 30.0  # seconds a list read upstream is served again (never beyond the tag_ttl)
MEMORY_CHARS = 32 * 1024 * 1024  # tag characters kept in memory per worker, all lists

Key = tuple[str, str]  # registry, repository


@dataclass(frozen=True, slots=True)
class TagList:
    tags: tuple[str, ...]  # sorted, unique
    fetched: float


def _list_size(listing: TagList) -> int:
    return sum(len(t) + 8 for t in listing.tags) + 64


def page_after(ordered: Sequence[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    """Spec pagination of an already sorted list: the items after `last`, at most `n`; and
    whether more remain."""
    start = bisect.bisect_right(ordered, last) if last else 0
    if n is None:
        return list(ordered[start:]), False
    return list(ordered[start : start + n]), start + n < len(ordered)


def paginate(items: Iterable[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    """Spec pagination: sorted items after `last`, at most `n`; and whether more remain."""
    return page_after(sorted(items), n, last)


def parse_n(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    if not (value.isascii() and value.isdigit()):
        raise RegistryError(400, "PAGINATION_NUMBER_INVALID", "n must be a non-negative integer")
    # More than any list holds means all of it; past 18 digits int() would pass an index
    # engine's int64, and past 4,300 Python refuses it.
    return int(value) if len(value) <= 18 else MAX_N


def merge_tags(bodies: Iterable[bytes]) -> tuple[str, ...]:
    """The sorted, deduplicated tags of upstream pages (`{"name": ..., "tags": [...]}` each;
    `"tags": null` is an empty page). ValueError for anything else."""
    tags: set[str] = set()
    for body in bodies:
        doc = parse_json(body)
        page = doc.get("tags") if isinstance(doc, dict) else ()
        if page is None:
            continue
        if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
            raise ValueError("not a tag list")
        tags.update(page)
    return tuple(sorted(tags))


def tags_page(
    name: str, tags: Sequence[str], query: Mapping[str, str], mirror_path: str
) -> tuple[bytes, str | None]:
    """The body and `Link` header answering a tags/list request with `query` from sorted
    `tags`. The Link names the mirror's own path, with the client's `ns` if it routed by it."""
    n = parse_n(query.get("n"))
    page, more = page_after(tags, n, query.get("last"))
    link = None
    if more and page:
        params = [("last", page[-1]), ("n", str(n))]
        if query.get("ns"):
            params.append(("ns", query["ns"]))
        link = f'<{mirror_path}?{urlencode(params)}>; rel="next"'
    return json.dumps({"name": name, "tags": page}).encode(), link


class TagLists:
    """Each repository's whole upstream tag list, kept briefly; one upstream walk at a time."""

    def __init__(
        self, clients: Mapping[str, RegistryClient], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clients = clients
        self._clock = clock
        self._memory: LRUCache[Key, TagList] = LRUCache(MEMORY_CHARS, _list_size)
        self._flight: SingleFlight[Key, TagList] = SingleFlight()

    async def close(self) -> None:
        await self._flight.close()

    async def tags(
        self, registry: str, repository: str, indexed: Callable[[], Awaitable[list[str]]]
    ) -> tuple[tuple[str, ...], Result]:
        """The sorted tags of a repository and where they came from. `indexed` gives the tags
        the index holds: the answer of last resort while the upstream fails."""
        key = (registry, repository)
        kept = self._memory.get(key)
        ttl = min(LIST_TTL, self._clients[registry].registry.tag_ttl)
        if kept is not None and self._clock() - kept.fetched < ttl:
            return kept.tags, "hit"
        try:
            listing, shared = await self._flight.do(key, lambda: self._fetch(key))
        except RegistryError as exc:
            if exc.status == 404:
                self._memory.pop(key, None)
            if not is_transient(exc):
                raise
            kept = self._memory.get(key)
            if kept is not None:
                return kept.tags, "stale"
            cached = await indexed()
            if not cached:
                raise
            return tuple(sorted(set(cached))), "stale"
        return listing.tags, "coalesced" if shared else "miss"

    async def _fetch(self, key: Key) -> TagList:
        registry, repository = key
        try:
            pages = await read_pages(
                self._clients[registry], repository, "tags/list", accept="application/json",
                what="tags", max_pages=MAX_TAG_PAGES, max_bytes=MAX_TAGS_BODY,
            )  # fmt: skip
        except RegistryError as exc:
            if exc.status == 404:
                raise RegistryError.name_unknown(repository) from exc
            raise
        try:
            tags = merge_tags(pages.bodies)
        except ValueError as exc:
            raise RegistryError.unavailable("upstream tag list is not a JSON tag list") from exc
        if not pages.complete:
            log.warning(
                "tag list of %s/%s cut at %d upstream pages or %d bytes: serving %d tags",
                registry, repository, MAX_TAG_PAGES, MAX_TAGS_BODY, len(tags),
            )  # fmt: skip
        listing = TagList(tags, self._clock())
        self._memory[key] = listing
        return listing
