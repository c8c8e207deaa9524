"""Reading a paged upstream answer whole: `Link: <...>; rel="next"` followed, within bounds.

Tag lists and referrers page this way (distribution-spec "Listing Tags", "Listing Referrers").
The next page is asked with the query exactly as the upstream wrote it in the Link: some
registries page with opaque parameters (`?cursor=...`) rather than `n` and `last`, and a
decoded and re-encoded value may not survive the trip. Only the query is taken from the Link,
never its host or path: a spoofed Link cannot send the mirror, or its credentials, elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from mirror.errors import RegistryError
from mirror.upstream.client import TRANSIENT_ERRORS, RegistryClient, upstream_error

_NEXT_RE = re.compile(r"<([^>]*)>\s*;\s*rel=\"?next\"?", re.IGNORECASE)


def next_query(link: str | None) -> str | None:
    """The raw query of the page a `Link` header names as `rel="next"`, or None."""
    match = _NEXT_RE.search(link or "")
    if match is None:
        return None
    return urlsplit(match.group(1)).query or None


@dataclass(frozen=True, slots=True)
class Pages:
    bodies: list[bytes]
    complete: bool  # False: a bound stopped the walk before the upstream's last page


async def read_pages(
    client: RegistryClient,
    repository: str,
    suffix: str,
    *,
    accept: str,
    what: str,
    max_pages: int,
    max_bytes: int,
) -> Pages:
    """GET `suffix` and every page after it, at most `max_pages` pages and `max_bytes` bytes.

    A status other than 200 on any page raises the client-facing error for it (`what` names
    the kind in it); a page that would pass `max_bytes` ends the walk incomplete (the first
    one raises: there is nothing to serve). A Link back to a page already read ends it too.
    """
    bodies: list[bytes] = []
    total = 0
    query: str | None = None
    seen: set[str] = set()
    for _ in range(max_pages):
        target = f"{suffix}?{query}" if query else suffix
        try:
            resp = await client.request("GET", repository, target, headers={"Accept": accept})
            async with resp:
                if resp.status != 200:
                    raise await upstream_error(resp, what, suffix)
                body = await _read_capped(resp, max_bytes - total)
                link = resp.headers.get("Link")
        except TRANSIENT_ERRORS as exc:
            raise RegistryError.unavailable(
                f"upstream connection failed while reading {what}"
            ) from exc
        if body is None:
            if not bodies:
                raise RegistryError.unavailable(f"upstream {what} exceed {max_bytes} bytes")
            return Pages(bodies, complete=False)
        total += len(body)
        bodies.append(body)
        query = next_query(link)
        if query is None or query in seen:
            return Pages(bodies, complete=True)
        seen.add(query)
    return Pages(bodies, complete=False)


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes | None:
    """The whole body, or None if it is longer than `cap`. (`content.read(n)` returns what has
    arrived so far, not necessarily the whole body.)"""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
