"""A stacked bar chart of bytes served from the cache vs from upstream, as inline SVG.

Drawn on the server: no script, no external asset, readable by a screen reader (each bar has a
<title>) and by a test (each bar carries its figures in data- attributes).
"""

from __future__ import annotations

import time
from html import escape

from mirror.prefetch import human_bytes
from mirror.store.index import Traffic

WIDTH = 720
HEIGHT = 160
TOP = 10
BOTTOM = 24  # room for the time labels
LEFT = 56  # room for the byte scale


def _label(start_hour: int, hours_per_bucket: int) -> str:
    stamp = time.gmtime(start_hour * 3600)
    return time.strftime("%H:00" if hours_per_bucket == 1 else "%m-%d", stamp)


def traffic_chart(buckets: list[tuple[int, Traffic]], hours_per_bucket: int, title: str) -> str:
    """`buckets`: (first hour, traffic) oldest first, as traffic.chart_buckets gives them."""
    peak = max((t.cache_bytes + t.upstream_bytes for _, t in buckets), default=0) or 1
    plot_h = HEIGHT - TOP - BOTTOM
    step = (WIDTH - LEFT) / max(len(buckets), 1)
    bar_w = max(step * 0.8, 1.0)
    label_every = max(1, len(buckets) // 8)
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
        f'height="{HEIGHT}" aria-label="{escape(title)}">',
        f'<text x="4" y="{TOP + 8}" class="axis">{escape(human_bytes(peak))}</text>',
        f'<text x="4" y="{TOP + plot_h}" class="axis">0</text>',
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH}" y2="{TOP + plot_h}" class="base"/>',
    ]
    for n, (start, traffic) in enumerate(buckets):
        x = LEFT + n * step
        cache_h = plot_h * traffic.cache_bytes / peak
        upstream_h = plot_h * traffic.upstream_bytes / peak
        when = _label(start, hours_per_bucket)
        tip = (
            f"{when}: {human_bytes(traffic.cache_bytes)} from cache, "
            f"{human_bytes(traffic.upstream_bytes)} from upstream"
        )
        parts.append(
            f'<g class="bar" data-start="{start * 3600}" data-cache-bytes="{traffic.cache_bytes}" '
            f'data-upstream-bytes="{traffic.upstream_bytes}"><title>{escape(tip)}</title>'
            f'<rect class="cache" x="{x:.1f}" y="{TOP + plot_h - cache_h:.1f}" '
            f'width="{bar_w:.1f}" height="{cache_h:.1f}"/>'
            f'<rect class="upstream" x="{x:.1f}" y="{TOP + plot_h - cache_h - upstream_h:.1f}" '
            f'width="{bar_w:.1f}" height="{upstream_h:.1f}"/></g>'
        )
        if n % label_every == 0:
            parts.append(f'<text x="{x:.1f}" y="{HEIGHT - 6}" class="axis">{when}</text>')
    parts.append("</svg>")
    return "".join(parts)
