"""Tag listing: pass upstream pages through, rewrite their `Link`, fall back to the cache.

Upstream pages with `Link: </v2/<upstream name>/tags/list?last=x&n=y>; rel="next"`; the
client must be sent to the *mirror's* path for the same page (with its `ns`, if it routed by
`ns`), keeping every query parameter, because some registries use opaque ones.
"""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qsl, urlencode, urlsplit

from mirror.errors import RegistryError
from mirror.reference import Route
from mirror.upstream.client import TRANSIENT_ERRORS, RegistryClient, is_transient, upstream_error

MAX_TAGS_BODY = 16 * 1024 * 1024
_LINK_RE = re.compile(r"<([^>]*)>\s*;\s*rel=\"?next\"?", re.IGNORECASE)


def rewrite_link(link: str | None, mirror_path: str, ns: str | None) -> str | None:
    """The `Link` header to send the client, pointing at the mirror's own path."""
    if not link:
        return None
    match = _LINK_RE.search(link)
    if not match:
        return None
    params = parse_qsl(urlsplit(match.group(1)).query, keep_blank_values=True)
    if ns and not any(k == "ns" for k, _ in params):
        params.append(("ns", ns))
    return f'<{mirror_path}?{urlencode(params)}>; rel="next"'


def paginate(tags: list[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    """Spec pagination: sorted tags after `last`, at most `n`; and whether more remain."""
    ordered = sorted(tags)
    if last:
        ordered = [t for t in ordered if t > last]
    if n is None:
        return ordered, False
    return ordered[:n], len(ordered) > n


def parse_n(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise RegistryError(400, "PAGINATION_NUMBER_INVALID", "n must be a non-negative integer")
    return int(value)


async def list_tags(
    client: RegistryClient,
    route: Route,
    query: dict[str, str],
    mirror_path: str,
    cached: list[str],
) -> tuple[bytes, str | None, bool]:
    """The body and Link header for a tags/list request, and whether it came from the cache.

    When upstream is unreachable, the tags the mirror holds are listed instead, so a client
    that lists before pulling still works offline.
    """
    n = parse_n(query.get("n"))
    params: dict[str, str] = {k: query[k] for k in ("n", "last") if k in query}
    try:
        resp = await client.request(
            "GET",
            route.repository,
            "tags/list",
            headers={"Accept": "application/json"},
            params=params,
        )
        async with resp:
            if resp.status != 200:
                error = await upstream_error(resp, "tags", route.repository)
                if resp.status == 404:
                    error = RegistryError.name_unknown(route.repository)
                raise error
            body = await resp.content.read(MAX_TAGS_BODY + 1)
            if len(body) > MAX_TAGS_BODY:
                raise RegistryError.unavailable("upstream tag list too large")
            json.loads(body)  # relay only well-formed JSON
            return body, rewrite_link(resp.headers.get("Link"), mirror_path, query.get("ns")), False
    except TRANSIENT_ERRORS as exc:
        error = RegistryError.unavailable(f"upstream failed: {type(exc).__name__}")
    except ValueError:
        error = RegistryError.unavailable("upstream tag list is not JSON")
    except RegistryError as exc:
        error = exc
    if not is_transient(error) or not cached:
        raise error
    page, more = paginate(cached, n, query.get("last"))
    link = None
    if more and page:
        link = rewrite_link(
            f'<?{urlencode({"n": n, "last": page[-1]})}>; rel="next"', mirror_path, query.get("ns")
        )
    return json.dumps({"name": route.repository, "tags": page}).encode(), link, True
