"""Garbage collection of hosted content: the bytes no hosted manifest names any more.

Mark and sweep with a grace period. The mark is the index's (`collect_garbage`, one
transaction): the pins of deleted manifests go, then the pins of blobs a push uploaded or
mounted that no manifest of that repository names and that were not used for `GRACE` (a
push touches every blob it uploads, mounts or names, so one in progress keeps them), and
what no pin, manifest or cached image keeps any more is swept: deleted like an eviction
(content first, rows after, each part's pins looked at again just before it goes).

Against a push on this machine, a lock: pushes share it around "is it stored? pin it", GC
holds it from the mark to the end of the sweep, so a blob is never found stored by a push
and deleted under it. (Replicas of a cluster take the lock each on their own disk; between
them the index's conditions and the grace period are what protect a push.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from mirror.evict import Evictor
from mirror.metrics import HOSTED_BYTES, HOSTED_GC_BYTES, HOSTED_GC_RUNS
from mirror.reference import HOSTED
from mirror.shared import FileLock
from mirror.store.index import Index

log = logging.getLogger(__name__)

GRACE = 3600.0  # seconds an uploaded blob no manifest names is kept: a push in progress
EVERY = 3600.0  # seconds between collections run by the mirror itself


@dataclass(frozen=True, slots=True)
class Collected:
    blobs: int
    bytes: int
    digests: tuple[str, ...]


async def collect(
    index: Index, evictor: Evictor, lock: FileLock, grace: float = GRACE, dry_run: bool = False
) -> Collected:
    async with lock.hold():
        doomed = await index.collect_garbage(HOSTED, time.time() - grace, dry_run)
        if dry_run:
            return Collected(len(doomed), sum(size for _, size in doomed), _names(doomed))
        done = await evictor.remove(doomed, "gc") if doomed else None
    HOSTED_GC_RUNS.inc()
    HOSTED_BYTES.set(await index.pinned_bytes(HOSTED))
    freed = done.bytes if done else 0
    HOSTED_GC_BYTES.inc(freed)
    if doomed:
        log.info("hosted GC: %d blobs no manifest names, %d bytes, removed", len(doomed), freed)
    return Collected(done.count if done else 0, freed, _names(doomed))


def _names(doomed: list[tuple[str, int]]) -> tuple[str, ...]:
    return tuple(sorted(digest for digest, _ in doomed))


async def collect_periodically(
    index: Index, evictor: Evictor, lock: FileLock, every: float = EVERY
) -> None:
    """The primary process's collections; a failure (the database down) waits for the next.
    The quota gauge is set at once: pushes set it, but none may come for hours."""
    try:
        HOSTED_BYTES.set(await index.pinned_bytes(HOSTED))
    except Exception as exc:  # the gauge waits for the next push or GC
        log.warning("hosted content: cannot count it now: %s", exc)
    while True:
        await asyncio.sleep(every)
        try:
            await collect(index, evictor, lock)
        except Exception as exc:
            log.warning("hosted GC failed: %s", exc)
