"""The web page's and the webhooks' logic, without sockets."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from pathlib import Path
from typing import Any

import pytest

from mirror.config import ConfigError, WebhookConfig, load_config, parse_webhooks
from mirror.store.index import SqliteIndex, Traffic
from mirror.traffic import HOUR, TrafficRecorder, chart_buckets
from mirror.web import render
from mirror.web.chart import traffic_chart
from mirror.web.images import index_entries, manifest_parts, platform_label
from mirror.webhooks import Webhooks, retry_delay, signature


def test_webhooks_from_flags_env_and_tables(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    assert parse_webhooks("http://a/hook, https://b/x") == (
        WebhookConfig("http://a/hook"), WebhookConfig("https://b/x"),
    )  # fmt: skip
    [hook] = parse_webhooks(
        [{"url": "http://a/", "events": ["tag.updated"], "secret_file": str(secret)}]
    )
    assert hook.events == {"tag.updated"} and hook.secret == "s3cret"
    assert "s3cret" not in repr(hook)
    for bad, message in (
        (["ftp://a/"], "http"),
        ([{"url": "http://a/", "events": ["image.pulled"]}], "events"),
        ([{"url": "http://a/", "secret": "x"}], "unknown key"),
        ([{"events": []}], "url"),
        ({"url": "http://a/"}, "list"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_webhooks(bad)
    config = load_config({"webhooks": ["http://a/"]}, {"MIRROR_WEB_UI": "admin"})
    assert config.web_ui == "admin" and config.webhooks == (WebhookConfig("http://a/"),)
    with pytest.raises(ConfigError, match="web_ui"):
        load_config({"web_ui": "lan"}, {})


def test_retries_back_off_to_a_minute_and_bodies_are_signed() -> None:
    assert 0.9 <= retry_delay(1) <= 1.1 and 1.8 <= retry_delay(2) <= 2.2
    assert 54 <= retry_delay(7) <= 66 and 54 <= retry_delay(40) <= 66
    body = b'{"type":"tag.updated"}'
    expected = hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert signature("k", body) == f"sha256={expected}"


def _queued(hooks: Webhooks) -> list[dict[str, Any]]:
    return [json.loads(body) for _, _, body in hooks._receivers[0].queue]


def test_upstream_errors_are_throttled_and_say_how_many_were_left_out() -> None:
    now = [1000.0]
    hooks = Webhooks((WebhookConfig("http://r/"),), clock=lambda: now[0])
    error = {"registry": "docker.io", "status": "503"}
    for _ in range(3):
        hooks.emit("upstream.error", error)
    hooks.emit("upstream.error", {"registry": "ghcr.io", "status": "503"})
    now[0] += 61
    hooks.emit("upstream.error", error)
    events = _queued(hooks)
    assert [(e["data"]["registry"], e["data"]["suppressed"]) for e in events] == [
        ("docker.io", 0), ("ghcr.io", 0), ("docker.io", 2),
    ]  # fmt: skip


def test_a_full_queue_drops_the_oldest_and_filters_by_event() -> None:
    hooks = Webhooks((WebhookConfig("http://r/", frozenset({"blob.evicted"})),), queue_limit=3)
    hooks.emit("image.cached", {"digest": "x"})  # not wanted by this receiver
    for n in range(5):
        hooks.emit("blob.evicted", {"digest": f"d{n}"})
    assert [e["data"]["digest"] for e in _queued(hooks)] == ["d2", "d3", "d4"]


def test_chart_buckets_cover_the_range_oldest_first() -> None:
    rows = {100: Traffic(1, 2, 3, 4), 98: Traffic(10, 0, 1, 0), 50: Traffic(5, 5, 0, 0)}
    hourly = chart_buckets(rows, 100, 3, 1)
    assert hourly == [(98, Traffic(10, 0, 1, 0)), (99, Traffic()), (100, Traffic(1, 2, 3, 4))]
    daily = chart_buckets(rows, 100, 3, 24)
    assert [start for start, _ in daily] == [48, 72, 96]
    assert daily[0][1] == Traffic(5, 5, 0, 0) and daily[2][1] == Traffic(11, 2, 4, 4)


def test_chart_draws_one_stacked_bar_per_bucket() -> None:
    svg = traffic_chart([(10, Traffic(300, 100, 0, 0)), (11, Traffic())], 1, "a <b> title")
    assert svg.count('<g class="bar"') == 2 and "a &lt;b&gt; title" in svg
    heights = [
        float(h) for h in re.findall(r'class="(?:cache|upstream)"[^>]*height="([\d.]+)"', svg)
    ]
    assert heights[0] == pytest.approx(3 * heights[1]) and heights[2:] == [0, 0]
    assert 'data-cache-bytes="300" data-upstream-bytes="100"' in svg


def test_platforms_layers_and_attestations_from_manifests() -> None:
    index = json.dumps({"manifests": [
        {"digest": "sha256:a", "size": 5, "platform": {"os": "linux", "architecture": "arm64",
                                                     "variant": "v8"}},
        {"digest": "sha256:b", "size": 6, "platform": {"os": "unknown", "architecture": "unknown"},
         "annotations": {"vnd.docker.reference.type": "attestation-manifest"}},
        "junk",
    ]}).encode()  # fmt: skip
    assert index_entries(index) == [
        ("linux/arm64/v8", "sha256:a", 5),
        ("attestation", "sha256:b", 6),
    ]
    manifest = json.dumps({
        "config": {"digest": "sha256:c", "size": 7, "mediaType": "cfg"},
        "layers": [{"digest": "sha256:l", "size": 8, "mediaType": "tar"}, {"size": 1}],
    }).encode()  # fmt: skip
    assert manifest_parts(manifest) == (("sha256:c", 7, "cfg"), [("sha256:l", 8, "tar")])
    assert manifest_parts(b"not json") == (None, [])
    assert platform_label({"os": "windows", "architecture": "amd64"}) == "windows/amd64"
    assert platform_label("x") == ""


def test_listing_escapes_what_it_shows() -> None:
    html = render.listing([], 0, '<script>alert("x")</script>', 0, admin=False, charts="")
    assert "<script>" not in html and "&lt;script&gt;" in html
    page = render.page("<t>", render.Summary(512, 1024, 3, 1, 10, 20), html)
    assert "<title>&lt;t&gt;</title>" in page and "(50%)" in page and "75.0%" in page


async def test_search_is_a_literal_substring_and_traffic_adds_up(tmp_path: Path) -> None:
    index = await SqliteIndex.open(tmp_path / "index.db")
    try:
        for tag in ("v1", "v1_x", "v10%", "latest"):
            await index.set_tag("docker.io", "library/alpine", tag, "sha256:d", 1.0)
        assert (await index.search_images("1_", 0, 10))[0] == 1
        assert (await index.search_images("0%", 0, 10))[0] == 1
        total, rows = await index.search_images("ALPINE:V1", 1, 1)
        assert total == 3 and [r.tag for r in rows] == ["v10%"]

        counters = [Traffic()]
        clock = [HOUR * 10 + 5.0]
        recorder = TrafficRecorder(index, read=lambda: counters[0], clock=lambda: clock[0])
        counters[0] = Traffic(100, 50, 3, 1)
        await recorder.flush()
        await recorder.flush()  # nothing new: nothing added
        clock[0] += HOUR
        counters[0] = Traffic(130, 50, 4, 1)
        await recorder.flush()
        assert await index.traffic_since(0) == {
            10: Traffic(100, 50, 3, 1),
            11: Traffic(30, 0, 1, 0),
        }
        assert await index.traffic_total() == Traffic(130, 50, 4, 1)
    finally:
        await index.close()
