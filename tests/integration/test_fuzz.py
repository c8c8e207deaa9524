"""Hostile request paths, queries and headers against a running mirror: never a 500, never a
file outside the data directory. Hypothesis draws the inputs (a short run here; set
MIRROR_FUZZ_EXAMPLES=20000 for a long one), then every input goes through real HTTP."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import small_image

EXAMPLES = int(os.environ.get("MIRROR_FUZZ_EXAMPLES", "300"))
DIGEST = "sha256:" + "a" * 64
SEGMENTS = st.one_of(
    st.sampled_from(
        ["library", "alpine", "..", ".", "%2e%2e", "%2F", "%00", "manifests", "blobs", "tags",
         "list", "referrers", "v2", "docker.io", "ghcr.io", "localhost:5000", "UPPER", "a" * 300,
         DIGEST, "sha512:" + "b" * 128, "sha256:xyz", "latest", ":", "@", "~", "é", "\\"]
    ),
    st.text(alphabet="abcz09._-:%/@~", min_size=0, max_size=12),
)  # fmt: skip
PATHS = st.lists(SEGMENTS, min_size=0, max_size=7).map(lambda parts: "/".join(parts))
QUERIES = st.one_of(
    st.just(""),
    st.builds(lambda v: f"?ns={v}", st.text(alphabet="abc.:/%-", max_size=20)),
    st.builds(lambda n, last: f"?n={n}&last={last}", st.text(max_size=6), st.text(max_size=6)),
)
HEADERS = st.dictionaries(
    st.sampled_from(["Accept", "Range", "If-None-Match", "Authorization"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ,;=/*-+\"'", max_size=60),
    max_size=3,
)


def draw_inputs() -> list[tuple[str, str, str, dict[str, str]]]:
    found: list[tuple[str, str, str, dict[str, str]]] = []

    @settings(max_examples=EXAMPLES, database=None, suppress_health_check=list(HealthCheck))
    @given(
        st.sampled_from(["GET", "HEAD", "DELETE", "PUT"]), PATHS, QUERIES, HEADERS,
    )  # fmt: skip
    def collect(method: str, path: str, query: str, headers: dict[str, str]) -> None:
        found.append((method, path, query, headers))

    collect()
    return found


def files_outside(root: Path, data: Path) -> set[Path]:
    return {p for p in root.rglob("*") if data not in p.parents and p != data}


async def test_no_input_causes_a_500_or_touches_files_outside_data(
    hub: FakeHub, start_mirror, tmp_path
):
    hub.add("library/alpine", "latest", small_image("fuzz"))
    data = tmp_path / "mirror-data"
    server = await start_mirror(hub.registry_url, data=data)
    before = files_outside(tmp_path, data)
    base = f"http://127.0.0.1:{server.port}"
    failures = []
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        for method, path, query, headers in draw_inputs():
            url = f"{base}/v2/{path}{query}"
            try:
                async with http.request(
                    method, aiohttp.client.URL(url, encoded=True), headers=headers
                ) as resp:
                    await resp.read()
                    if resp.status >= 500 and resp.status != 503:
                        failures.append((resp.status, method, url, headers))
            except (aiohttp.InvalidURL, ValueError):
                continue  # the client library itself refused to send it
            except aiohttp.ClientResponseError as exc:
                if exc.status >= 500:  # an answer the client could not even parse
                    failures.append((exc.status, method, url, headers))
    assert failures == []
    assert files_outside(tmp_path, data) == before
    assert server.app is not None  # still serving
    async with aiohttp.ClientSession() as http, http.get(f"{base}/v2/") as resp:
        assert resp.status == 200
