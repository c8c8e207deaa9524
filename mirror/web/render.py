"""The web page's HTML, built from plain values: no template engine, no script, no asset.

Every value from the index or a request goes through `escape` (repository names and tags come
from upstream registries and clients). Forms (search, and on the admin listener pin, unpin and
purge) are ordinary GET/POST forms, so the page works in any browser with scripts off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from html import escape
from urllib.parse import quote, urlencode

from mirror.prefetch import human_bytes
from mirror.reference import HOSTED, routed_name
from mirror.web.images import ImageDetail, Layer, ListedImage

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f8fa}
header{background:#24292f;color:#fff;padding:10px 20px;display:flex;gap:24px;align-items:baseline;
flex-wrap:wrap}
header h1{font-size:18px;margin:0}header a{color:#fff;text-decoration:none}
.stat{white-space:nowrap}.stat b{font-weight:600}
main{padding:16px 20px;max-width:1200px}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #d0d7de;vertical-align:top}
th{background:#eaeef2;font-weight:600}td.num,th.num{text-align:right;white-space:nowrap}
code{font:12px ui-monospace,monospace}
form.inline{display:inline;margin:0}
.search input{width:360px;padding:5px}.pages{margin:12px 0}.pages a,.pages span{margin-right:12px}
.muted{color:#57606a}.pinned{color:#1a7f37;font-weight:600}
.charts{display:flex;gap:20px;flex-wrap:wrap;margin-bottom:16px}
.charts figure{margin:0;background:#fff;padding:8px;border:1px solid #d0d7de}
.charts figcaption{font-weight:600;margin-bottom:4px}
svg.chart .cache{fill:#2da44e}svg.chart .upstream{fill:#d4a72c}
svg.chart .axis{font-size:10px;fill:#57606a}svg.chart .base{stroke:#d0d7de}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}
button{cursor:pointer}
"""
PAGE_SIZE = 50


@dataclass(frozen=True, slots=True)
class Summary:
    """The header's figures."""

    cache_bytes: int
    max_bytes: int
    hits: int
    misses: int
    saved_bytes: int
    upstream_bytes: int


def image_path(registry: str, repository: str, digest: str) -> str:
    return "/image/" + quote(f"{registry}/{repository}@{digest}", safe="/:@")


def when(seconds: float) -> str:
    if seconds <= 0:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))


def page(title: str, summary: Summary, body: str) -> str:
    ratio = summary.hits / (summary.hits + summary.misses) if summary.hits + summary.misses else 0
    used = summary.cache_bytes / summary.max_bytes if summary.max_bytes else 0
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        '<header><h1><a href="/">mirror</a></h1>'
        f'<span class="stat" id="cache-size">cache <b>{human_bytes(summary.cache_bytes)}</b> '
        f"of {human_bytes(summary.max_bytes)} ({used:.0%})</span>"
        f'<span class="stat" id="hit-ratio">hit ratio <b>{ratio:.1%}</b> '
        f'<span class="muted">({summary.hits} of {summary.hits + summary.misses})</span></span>'
        f'<span class="stat" id="saved">saved <b>{human_bytes(summary.saved_bytes)}</b></span>'
        f'<span class="stat" id="fetched">fetched {human_bytes(summary.upstream_bytes)}</span>'
        f"</header><main>{body}</main></body></html>"
    )


def _button(action: str, label: str, image: str, back: str) -> str:
    return (
        f'<form class="inline" method="post" action="/admin/{action}">'
        f'<input type="hidden" name="image" value="{escape(image)}">'
        f'<input type="hidden" name="back" value="{escape(back)}">'
        f'<button type="submit" name="{action}">{label}</button></form>'
    )


def _actions(image: str, pinned: bool, back: str) -> str:
    pin = _button("unpin", "Unpin", image, back) if pinned else _button("pin", "Pin", image, back)
    return pin + " " + _button("purge", "Purge", image, "/")


def _kept(registry: str, pinned: bool) -> str:
    """The last column: hosted images (the team's own, pushed here; kept until deleted), or
    cached ones an operator pinned."""
    if registry == HOSTED:
        return '<td class="hosted">hosted</td>'
    return '<td class="pinned">pinned</td>' if pinned else "<td></td>"


def listing(
    images: list[ListedImage], total: int, query: str, offset: int, admin: bool, charts: str
) -> str:
    """The front page: charts, search box, one page of cached images, paging links."""
    back = "/?" + urlencode({"q": query, "page": offset // PAGE_SIZE + 1})
    rows = []
    for item in images:
        r = item.row
        name = routed_name(r.registry, r.repository)
        link = image_path(r.registry, r.repository, r.digest)
        cells = [
            f"<td>{escape(name)}</td>",
            f'<td class="tag"><a href="{escape(link)}">{escape(r.tag)}</a></td>',
            f'<td><code title="{escape(r.digest)}">{escape(r.digest[:19])}</code></td>',
            f"<td>{escape(', '.join(item.platforms)) or '—'}</td>",
            f'<td class="num">{human_bytes(item.size)}</td>',
            f"<td>{when(r.last_access)}</td>",
            _kept(r.registry, r.pinned),
        ]
        if admin and r.registry == HOSTED:
            cells.append("<td></td>")  # pushed and deleted with the registry API, not here
        elif admin:
            image = f"{r.registry}/{r.repository}:{r.tag}"
            cells.append(f"<td>{_actions(image, r.pinned, back)}</td>")
        rows.append(f'<tr class="image">{"".join(cells)}</tr>')
    head = "".join(
        f"<th{' class=num' if h == 'Size' else ''}>{h}</th>"
        for h in ("Repository", "Tag", "Digest", "Platforms", "Size", "Last pulled", "Kept")
    ) + ("<th>Actions</th>" if admin else "")
    table = (
        f"<table id=images><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if rows
        else '<p id="empty">No cached image matches.</p>'
    )
    return (
        charts + '<form class="search" role="search" method="get" action="/">'
        f'<input type="search" name="q" value="{escape(query)}" '
        'placeholder="repository or tag, e.g. alpine:3" aria-label="Search images" autofocus> '
        "<button type=submit>Search</button></form>"
        f'<p id="count">{total} image{"" if total == 1 else "s"}'
        f"{' matching ' + escape(repr(query)) if query else ''}</p>"
        + table
        + _pages(query, offset, total)
    )


def _pages(query: str, offset: int, total: int) -> str:
    number = offset // PAGE_SIZE + 1
    last = max(1, -(-total // PAGE_SIZE))
    links = []
    if number > 1:
        links.append(f'<a rel="prev" href="/?{urlencode({"q": query, "page": number - 1})}">'
                     "&larr; previous</a>")  # fmt: skip
    links.append(f"<span>page {number} of {last}</span>")
    if number < last:
        links.append(f'<a rel="next" href="/?{urlencode({"q": query, "page": number + 1})}">'
                     "next &rarr;</a>")  # fmt: skip
    return f'<nav class="pages">{"".join(links)}</nav>'


def charts(hourly: str, daily: str) -> str:
    legend = (
        '<div class="legend"><span style="background:#2da44e"></span>from cache'
        '<span style="background:#d4a72c"></span>from upstream</div>'
    )
    return (
        '<section class="charts">'
        f'<figure id="chart-hours"><figcaption>Last 48 hours</figcaption>{hourly}{legend}</figure>'
        f'<figure id="chart-days"><figcaption>Last 30 days</figcaption>{daily}{legend}</figure>'
        "</section>"
    )


def _layer_row(n: int, layer: Layer, kind: str) -> str:
    shared = "—"
    if layer.shared_with:
        more = layer.shared_with - len(layer.shared_names)
        names = ", ".join(escape(name) for name in layer.shared_names)
        shared = f"{layer.shared_with}: {names}" + (f" and {more} more" if more > 0 else "")
    return (
        f'<tr class="{kind}"><td class="num">{n or kind}</td>'
        f'<td><code title="{escape(layer.digest)}">{escape(layer.digest[:19])}</code></td>'
        f"<td>{escape(layer.media_type)}</td>"
        f'<td class="num">{human_bytes(layer.size)}</td>'
        f"<td>{'yes' if layer.cached else 'not yet'}</td>"
        f'<td class="shared">{shared}</td></tr>'
    )


def detail(image: ImageDetail, admin: bool) -> str:
    """One image: its tags, platforms, and each platform's config and layers."""
    name = routed_name(image.registry, image.repository)
    tags = ", ".join(escape(t) for t in image.tags) or '<span class="muted">none</span>'
    back = image_path(image.registry, image.repository, image.digest)
    actions = ""
    if admin and image.registry != HOSTED:
        actions = "".join(
            f"<p>{escape(t)}: "
            f"{_actions(f'{image.registry}/{image.repository}:{t}', image.pinned, back)}</p>"
            for t in image.tags
        )
    sections = []
    for part in image.images:
        title = escape(part.platform or "image")
        if not part.cached:
            sections.append(
                f'<section class="platform"><h3>{title}</h3><p class="muted">'
                f"<code>{escape(part.digest)}</code> not cached yet</p></section>"
            )
            continue
        rows = [_layer_row(0, part.config, "config")] if part.config else []
        rows += [_layer_row(n, layer, "layer") for n, layer in enumerate(part.layers, 1)]
        total = sum(layer.size for layer in part.layers)
        sections.append(
            f'<section class="platform"><h3>{title}</h3>'
            f"<p><code>{escape(part.digest)}</code> · {len(part.layers)} layers, "
            f"{human_bytes(total)}</p><table class=layers><thead><tr>"
            '<th class="num">#</th><th>Digest</th><th>Media type</th><th class="num">Size</th>'
            "<th>Cached</th><th>Shared with other images</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></section>"
        )
    return (
        f'<h2 id="image-name">{escape(name)}</h2><table class="facts">'
        f"<tr><th>Tags</th><td id=tags>{tags}</td></tr>"
        f"<tr><th>Digest</th><td><code>{escape(image.digest)}</code></td></tr>"
        f"<tr><th>Media type</th><td>{escape(image.media_type)}</td></tr>"
        f"<tr><th>Size</th><td>{human_bytes(image.size)} (all cached parts)</td></tr>"
        f"<tr><th>Last pulled</th><td>{when(image.last_access)}</td></tr>"
        f"<tr><th>Pinned</th><td>{'yes' if image.pinned else 'no'}</td></tr></table>"
        f"{actions}{''.join(sections)}"
    )


def error(status: int, message: str) -> str:
    return f"<h2>{status}</h2><p>{escape(message)}</p>"
