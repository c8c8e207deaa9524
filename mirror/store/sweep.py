"""Sweeping the bucket: what a crash or a lost race left there, removed in the background.

Two kinds of leftovers, both invisible to clients (the fetcher serves only what the index
lists, and an incomplete multipart upload is no object at all):
- objects without an index row: a replica died between completing an upload and indexing
  it, or an eviction deleted the row and then failed to delete the object. Re-verifying one
  would mean downloading it, so it is deleted; if it is wanted, the next miss brings it again.
- multipart uploads never completed or aborted: a replica killed mid-download. Their parts
  are billed storage until aborted.
Both only once older than `grace`: an upload completes before its row is written, and a live
download's upload is in progress, so anything younger may still be someone's work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from mirror.store.blobs.base import ContentStore
from mirror.store.index.base import Index

log = logging.getLogger(__name__)

GRACE = 3600.0  # seconds: older than any download (an upload lives as long as its download)
EVERY = 6 * 3600.0  # seconds between sweeps
FIRST_AFTER = 60.0  # seconds after start: not while a restarted fleet is warming up
PAGE = 1000


@dataclass(frozen=True, slots=True)
class Swept:
    objects: int = 0
    bytes: int = 0
    uploads: int = 0


async def sweep_bucket(content: ContentStore, index: Index, grace: float = GRACE) -> Swept:
    """Delete objects older than `grace` without an index row; abort uploads as old."""
    cutoff = time.time() - grace
    doomed: list[tuple[str, int]] = []
    page: list[tuple[str, int]] = []

    async def check(page: list[tuple[str, int]]) -> None:
        known = await index.stored([digest for digest, _ in page])
        doomed.extend(item for item in page if item[0] not in known)

    async for digest, size, mtime in content.listing():
        if mtime < cutoff:
            page.append((digest, size))
        if len(page) >= PAGE:
            await check(page)
            page = []
    if page:
        await check(page)
    # Asked again just before deleting: a row may have been written since the page was read.
    known = await index.stored([digest for digest, _ in doomed]) if doomed else set()
    doomed = [item for item in doomed if item[0] not in known]
    if doomed:
        await content.remove([digest for digest, _ in doomed])
    uploads = await content.abort_stale_uploads(grace)
    swept = Swept(len(doomed), sum(size for _, size in doomed), uploads)
    if swept.objects or swept.uploads:
        log.warning(
            "bucket sweep: %d object(s) without an index row deleted (%d bytes), "
            "%d abandoned upload(s) aborted", swept.objects, swept.bytes, swept.uploads,
        )  # fmt: skip
    return swept


class BucketSweeper:
    """Runs `sweep_bucket` FIRST_AFTER the start, then every EVERY seconds (primary process)."""

    def __init__(self, content: ContentStore, index: Index) -> None:
        self._content = content
        self._index = index
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        await asyncio.sleep(FIRST_AFTER)
        while True:
            try:
                await sweep_bucket(self._content, self._index)
            except Exception:
                log.exception("bucket sweep failed; trying again later")
            await asyncio.sleep(EVERY)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
