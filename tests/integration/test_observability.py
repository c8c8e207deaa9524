"""Metrics, health and the Grafana dashboard, checked against a real Prometheus."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import StartAdmin, StartMirror
from tests.fixtures.backends import Backend
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import make_image, random_bytes, small_image
from tests.fixtures.procs import (
    downloads_settled,
    http_push,
    mirror_process,
    need,
    prometheus,
    run,
)
from tests.integration.test_client_auth import write_htpasswd
from tests.integration.test_pull_path import ALL_TYPES, get, mirror_url, pull

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


# A scraped sample's value under its name and sorted labels.
Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(url: str) -> Metrics:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_saved_bytes_equal_the_warm_pull_and_upstream_bytes_the_cold_one(
    hub: FakeHub, tmp_path: Path
) -> None:
    image = make_image([{"a.bin": random_bytes(3 * MiB, 1)}, {"b": b"b" * 1000}])
    hub.add("team/obs", "v1", image)
    async with (
        mirror_process(tmp_path / "data", hub.registry_url) as mirror,
        aiohttp.ClientSession() as http,
    ):
        await pull(http, mirror.url, "team/obs", "v1")
        await downloads_settled(mirror)
        cold = await scrape(mirror.url)
        await pull(http, mirror.url, "team/obs", "v1")
        # The admin listener serves the same metrics. A request is counted when its handler
        # returns, which can be just after the client read its last byte: poll briefly.
        for _ in range(100):
            warm = await scrape(mirror.admin)
            if sample(warm, "mirror_requests_total", kind="blob", method="GET", result="hit") >= 3:
                break
            await asyncio.sleep(0.02)
    assert sample(cold, "mirror_served_bytes_total", source="upstream") == image.blob_bytes
    assert sample(warm, "mirror_served_bytes_total", source="upstream") == image.blob_bytes
    assert sample(warm, "mirror_saved_bytes_total") == image.blob_bytes
    assert sample(warm, "mirror_served_bytes_total", source="cache") == image.blob_bytes
    assert sample(warm, "mirror_upstream_bytes_total") >= image.blob_bytes
    assert (
        sample(warm, "mirror_upstream_ratelimit_remaining", registry="docker.io")
        == hub.ratelimit_remaining
    )
    assert sample(warm, "mirror_upstream_ratelimit_limit", registry="docker.io") == 100
    assert sample(warm, "mirror_requests_total", kind="blob", method="GET", result="hit") == len(
        image.blobs
    )
    assert sample(warm, "mirror_requests_total", kind="blob", method="GET", result="miss") == len(
        image.blobs
    )
    assert sample(warm, "mirror_token_requests_total", registry="docker.io", result="ok") == 1
    assert sample(warm, "mirror_build_info", version="0.1.0") == 1
    for name in (
        "mirror_request_duration_seconds_count",
        "mirror_upstream_request_duration_seconds_count",
    ):
        assert any(key[0] == name and value > 0 for key, value in warm.items()), name


# A sample of the in-process registry, keyed by its name followed by its sorted labels.
SampleKey = tuple[str | tuple[str, str], ...]


def delta(name: str, before: dict[SampleKey, float], **labels: str) -> float:
    key: SampleKey = (name, *sorted(labels.items()))
    now = REGISTRY.get_sample_value(name, labels) or 0.0
    return now - before.get(key, 0.0)


def snapshot(name: str, **labels: str) -> dict[SampleKey, float]:
    return {(name, *sorted(labels.items())): REGISTRY.get_sample_value(name, labels) or 0.0}


@pytest.mark.parametrize("path", ["hit", "miss", "coalesced", "stale"])
async def test_request_counters_follow_the_cache_path(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession, path: str
) -> None:
    hub.add("library/alpine", "3.19", small_image(f"counters-{path}"))
    base = mirror_url(await start_mirror(hub.registry_url, tag_ttl=0 if path == "stale" else 300))
    url = f"{base}/v2/library/alpine/manifests/3.19"
    labels = {"kind": "manifest", "method": "GET", "result": path}
    if path in ("hit", "stale"):
        await get(http, url, Accept=ALL_TYPES)
    if path == "stale":
        hub.down = True
    before = snapshot("mirror_requests_total", **labels)
    coalesced_before = REGISTRY.get_sample_value("mirror_coalesced_requests_total") or 0.0
    clients = 5 if path == "coalesced" else 1
    hub.slow = 0
    results = await asyncio.gather(*(get(http, url, Accept=ALL_TYPES) for _ in range(clients)))
    assert {r[0] for r in results} == {200}
    assert {r[1]["X-Mirror-Cache"] for r in results} >= {path}
    assert delta("mirror_requests_total", before, **labels) == (4 if path == "coalesced" else 1)
    if path == "coalesced":
        assert (
            REGISTRY.get_sample_value("mirror_coalesced_requests_total") or 0
        ) - coalesced_before == 4


async def test_requests_that_touch_no_cache_are_not_counted_as_hits(
    hub: FakeHub, start_mirror: StartMirror, start_admin: StartAdmin, http: aiohttp.ClientSession
) -> None:
    server = await start_mirror(hub.registry_url)
    base = mirror_url(server)
    admin = str((await start_admin(server)).make_url("")).rstrip("/")
    other = {"kind": "other", "method": "GET"}
    before = {
        result: snapshot("mirror_requests_total", **other, result=result)
        for result in ("hit", "none")
    }
    async with http.get(f"{admin}/admin/stats") as resp:
        stats_before = (await resp.json())["requests"]
    for path in ("/v2/", "/v2/_catalog", "/", "/metrics"):
        status, headers, _ = await get(http, f"{base}{path}")
        assert status == 200 and "X-Mirror-Cache" not in headers, path
    assert delta("mirror_requests_total", before["none"], **other, result="none") == 4
    assert delta("mirror_requests_total", before["hit"], **other, result="hit") == 0
    async with http.get(f"{admin}/admin/stats") as resp:
        assert (await resp.json())["requests"] == stats_before  # manifests and blobs only
    by_result = dict(dashboard_queries())["Requests by result"]
    assert 'kind=~"manifest|blob"' in by_result


async def test_health_and_readiness(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    base = mirror_url(await start_mirror(hub.registry_url))
    assert (await get(http, f"{base}/healthz"))[0] == 200
    assert (await get(http, f"{base}/readyz"))[0] == 200
    (tmp_path / "mirror-data" / "tmp").rmdir()
    status, _, body = await get(http, f"{base}/readyz")
    assert status == 503 and b"not writable" in body


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((ROOT / "grafana" / "mirror.json").read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_is_importable_shape() -> None:
    dashboard = json.loads((ROOT / "grafana" / "mirror.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["instance"]["type"] == "query"
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                 for y in range(pos["y"], pos["y"] + pos["h"])}  # fmt: skip
        assert pos["x"] + pos["w"] <= 24 and not cells & taken, panel["title"]  # no overlap
        taken |= cells
        if panel["type"] == "row":  # a heading: no queries of its own
            assert (pos["w"], pos["h"], panel["panels"]) == (24, 1, []), panel["title"]
            assert "targets" not in panel
            continue
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for needed in (
        "saved",
        "hit ratio",
        "by result",
        "upstream traffic",
        "upstream latency",
        "rate limit",
        "size vs cap",
        "evictions",
        "coalesced",
        "digest mismatches",
        "hosted content size",
        "hosted pushes",
        "received vs mounted",
        "hosted garbage collection",
    ):
        assert needed in titles, needed


async def scrapes(http: aiohttp.ClientSession, prom: str, count: int, timeout: float = 60) -> None:
    """Wait until Prometheus has scraped the mirror `count` times (its first scrape comes late)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        params = {"query": 'count_over_time(up{job="mirror"}[5m])'}
        async with http.get(f"{prom}/api/v1/query", params=params) as resp:
            result = (await resp.json())["data"]["result"]
        if result and float(result[0]["value"][1]) >= count:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"Prometheus did not scrape {count} times in {timeout}s")


# Panels about the bucket and the database: a mirror on local files and SQLite has no such
# operations to time, so they are empty there (and must not be elsewhere).
SHARED_STORAGE_PANELS = {"Storage backend latency"}


@pytest.mark.backends("local", "s3")
async def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    hub: FakeHub, tmp_path: Path, backend: Backend
) -> None:
    need("prometheus")
    hub.add("library/alpine", "3.19", small_image("prom"))
    # A cache that is also the team's registry, so the hosted panels have pushes to show.
    htpasswd = write_htpasswd(tmp_path, alice="wonderland")
    (tmp_path / "mirror.toml").write_text(
        f'auth_htpasswd = "{htpasswd}"\nanonymous_pull = true\n[hosted."acme"]\n'
    )
    async with mirror_process(
        tmp_path / "data", hub.registry_url, "--max-size", "1GiB", *backend.flags,
        "--config", str(tmp_path / "mirror.toml"), env=backend.env,
    ) as mirror:  # fmt: skip
        target = mirror.url.removeprefix("http://")
        async with prometheus(tmp_path / "prom", [target]) as prom, aiohttp.ClientSession() as http:
            await scrapes(http, prom.url, 2)
            await pull(http, mirror.url, "library/alpine", "3.19")
            await pull(http, mirror.url, "library/alpine", "3.19")
            await get(http, f"{mirror.url}/v2/library/alpine/manifests/missing", Accept=ALL_TYPES)
            await http_push(
                mirror.url, "acme/app", "1", small_image("team"), ("alice", "wonderland")
            )
            await scrapes(http, prom.url, 5)  # several scrapes after the traffic
            empty: list[str] = []
            for title, expr in dashboard_queries():
                query = (
                    expr.replace("$__rate_interval", "1m").replace("$__range", "1h")
                    .replace('instance=~"$instance"', 'instance=~".*"')
                )  # fmt: skip
                assert "$" not in re.sub(r"\{\{.*?\}\}", "", query), query
                async with http.get(f"{prom.url}/api/v1/query", params={"query": query}) as resp:
                    answer = await resp.json()
                assert answer["status"] == "success", (title, answer)
                expected = backend.shared or title not in SHARED_STORAGE_PANELS
                if expected and not answer["data"]["result"]:
                    empty.append(f"{title}: {query}")
            assert empty == [], "dashboard queries without data:\n" + "\n".join(empty)


async def test_alert_rules_pass_promtool() -> None:
    need("promtool")
    out = await run("promtool", "check", "rules", str(ROOT / "grafana" / "alerts.yml"))
    assert "SUCCESS" in out
