"""Hostile request paths, queries and headers against a running mirror: never a 500, never a
file outside the data directory. Hypothesis draws the inputs (a short run here; set
MIRROR_FUZZ_EXAMPLES=20000 for a long one), then every input goes through real HTTP."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import OCI_MANIFEST, small_image
from tests.fixtures.procs import mirror_process

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


Snapshot = dict[Path, tuple[int, int]]


def snapshot(root: Path, data: Path) -> Snapshot:
    """Every file under `root` but outside `data`, with its size and modification time: a
    new file and a changed one both show."""
    found: Snapshot = {}
    for path in root.rglob("*"):
        if data in path.parents or path == data:
            continue
        with contextlib.suppress(OSError):
            st = path.lstat()
            found[path] = (st.st_size, st.st_mtime_ns)
    return found


async def test_no_input_causes_a_server_error_or_touches_files_outside_data(
    hub: FakeHub, tmp_path: Path
) -> None:
    """Against a real `mirror serve` (uvloop, the memory hit path in front of aiohttp), with
    the upstream up: no answer is a 5xx, 503 included (nothing here is unavailable)."""
    hub.add("library/alpine", "latest", image := small_image("fuzz"))
    data, cwd, home, tmp = (tmp_path / d for d in ("mirror-data", "cwd", "home", "tmp"))
    for directory in (cwd, home, tmp):
        directory.mkdir()
    # Its working directory, home and temp directory are the test's own, so anything it would
    # write where it should not lands where this test looks.
    private = {"HOME": str(home), "TMPDIR": str(tmp)}
    failures = []
    async with mirror_process(
        data, hub.registry_url, "--workers", "1", cwd=cwd, env=private
    ) as mirror:
        async with aiohttp.ClientSession() as http:  # warm: the hit path holds a manifest
            url = f"{mirror.url}/v2/library/alpine/manifests/latest"
            async with http.get(url, headers={"Accept": OCI_MANIFEST}) as resp:
                assert resp.status == 200 and await resp.read() == image.top.data
        before = snapshot(tmp_path, data)
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            for method, path, query, headers in draw_inputs():
                url = f"{mirror.url}/v2/{path}{query}"
                try:
                    async with http.request(
                        method, URL(url, encoded=True), headers=headers
                    ) as resp:
                        await resp.read()
                        if resp.status >= 500:
                            failures.append((resp.status, method, url, headers))
                except (aiohttp.InvalidURL, ValueError):
                    continue  # the client library itself refused to send it
                except aiohttp.ClientResponseError as exc:
                    if exc.status >= 500:  # an answer the client could not even parse
                        failures.append((exc.status, method, url, headers))
            after = snapshot(tmp_path, data)
            async with http.get(f"{mirror.url}/v2/") as resp:
                assert resp.status == 200  # still serving
    assert failures == []
    changed = {p for p in after.keys() | before.keys() if after.get(p) != before.get(p)}
    # The mirror's own log (next to the data directory) is the one file it writes outside.
    assert changed <= {mirror.log}, sorted(changed)
