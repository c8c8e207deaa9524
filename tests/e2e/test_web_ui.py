"""The web page in a real headless Chromium, against a real mirror process with two workers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import multiarch_image, small_image
from tests.fixtures.procs import artifact_path, chromium, mirror_process, skopeo_pull_and_verify
from tests.integration.test_pull_path import ALL_TYPES, pull

if TYPE_CHECKING:  # types only: procs.chromium imports playwright when Chromium starts
    from playwright.async_api import ElementHandle, Page

REPOS, TAGS = 20, 50  # 1,000 cached tags


async def cache_many_tags(base: str) -> None:
    """Every tag's manifest pulled through the mirror (32 at a time)."""
    gate = asyncio.Semaphore(32)
    async with aiohttp.ClientSession() as http:

        async def one(repo: int, tag: int) -> None:
            async with (
                gate,
                http.get(
                    f"{base}/v2/ci/build{repo:02d}/manifests/r{tag:03d}",
                    headers={"Accept": ALL_TYPES},
                ) as resp,
            ):
                assert resp.status == 200

        await asyncio.gather(*(one(r, t) for r in range(REPOS) for t in range(TAGS)))


async def byte_count(bar: ElementHandle, attribute: str) -> int:
    value = await bar.get_attribute(attribute)
    assert value is not None, f"a chart bar without {attribute}"
    return int(value)


async def chart_bars(page: Page) -> list[tuple[int, int]]:
    return [
        (await byte_count(bar, "data-cache-bytes"),
         await byte_count(bar, "data-upstream-bytes"))
        for bar in await page.query_selector_all("#chart-hours g.bar")
    ]  # fmt: skip


async def test_page_lists_searches_details_and_charts_in_chromium(
    hub: FakeHub, tmp_path: Path
) -> None:
    app = multiarch_image("web-app")
    hub.add("team/app", "v1", app)
    hub.add("library/alpine", "3.19", small_image("web-alpine"))
    builds = [small_image(f"build-{n}") for n in range(10)]
    for repo in range(REPOS):
        for tag in range(TAGS):
            hub.add(f"ci/build{repo:02d}", f"r{tag:03d}", builds[(repo + tag) % 10])
    async with mirror_process(tmp_path / "data", hub.registry_url, "--workers", "2") as mirror:
        host = mirror.url.removeprefix("http://")
        await skopeo_pull_and_verify(f"{host}/team/app:v1", tmp_path / "first", app)
        await skopeo_pull_and_verify(f"{host}/team/app:v1", tmp_path / "again", app)  # cached
        async with aiohttp.ClientSession() as http:
            await pull(http, mirror.url, "library/alpine", "3.19")
        await cache_many_tags(mirror.url)

        async with chromium() as browser:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(f"{mirror.url}/")
            assert await page.inner_text("#count") == "1002 images"
            names = await page.locator("tr.image td:first-child").all_inner_texts()
            assert len(names) == 50 and names[0] == "ci/build00"  # in name order, paged
            await page.click("a[rel=next]")
            await page.wait_for_selector(".pages:has-text('page 2 of 21')")
            assert await page.locator("form[action^='/admin/']").count() == 0

            # Search: one of the 1,000 tags, typed into the box, answered in under a second.
            await page.fill("input[name=q]", "build07:r042")
            started = time.monotonic()
            await page.press("input[name=q]", "Enter")
            await page.wait_for_selector("#count:has-text('1 image matching')")
            elapsed = time.monotonic() - started
            assert elapsed < 1.0, f"search took {elapsed:.3f} s"
            print(f"search among 1,002 tags: {elapsed * 1000:.0f} ms from Enter to results")
            rows = await page.locator("tr.image").all_inner_texts()
            assert len(rows) == 1 and "ci/build07" in rows[0] and "r042" in rows[0]

            await page.fill("input[name=q]", "alpine")
            await page.press("input[name=q]", "Enter")
            await page.wait_for_selector("#count:has-text('1 image matching')")
            assert "library/alpine" in await page.inner_text("tr.image")

            # Detail: the multi-platform image's layers, per platform.
            await page.fill("input[name=q]", "team/app")
            await page.press("input[name=q]", "Enter")
            await page.wait_for_selector("#count:has-text('1 image matching')")
            assert "linux/amd64, linux/arm64" in await page.inner_text("tr.image")
            await page.click("tr.image td.tag a")
            await page.wait_for_selector("#image-name")
            assert await page.inner_text("#image-name") == "team/app"
            assert await page.locator("section.platform h3").all_inner_texts() == [
                "linux/amd64", "linux/arm64",
            ]  # fmt: skip
            layers = page.locator("section.platform tr.layer")
            assert await layers.count() == 4  # two layers on each platform
            await page.screenshot(path=artifact_path("web-ui-detail.png"), full_page=True)

            # The chart: this hour's bar shows bytes from upstream and from the cache (the
            # other worker's share arrives within its 10 s flush).
            blob_bytes = sum(len(b.data) for b in app.blobs.values())
            deadline = time.monotonic() + 20
            while True:
                await page.goto(f"{mirror.url}/")
                cache, upstream = (await chart_bars(page))[-1]
                if (cache >= blob_bytes and upstream >= blob_bytes) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1)
            assert cache >= blob_bytes and upstream >= blob_bytes, (cache, upstream)
            bar = page.locator("#chart-hours g.bar").last
            for part in ("rect.cache", "rect.upstream"):
                box = await bar.locator(part).bounding_box()
                assert box is not None and box["height"] > 0
            saved = await page.inner_text("#saved")
            assert saved.startswith("saved") and not saved.endswith(" 0 B")
            await page.screenshot(path=artifact_path("web-ui.png"), full_page=True)

            # On the admin listener the buttons work in the browser (same-origin form posts).
            await page.goto(f"{mirror.admin}/?q=team/app")
            await page.click("tr.image button[name=pin]")
            await page.wait_for_selector("tr.image td.pinned")
            assert "q=team" in page.url
            await page.screenshot(path=artifact_path("web-ui-admin.png"), full_page=True)
