"""Recovery: after a crash or `kill -9`, make index and disk agree again (at start), and clear
what a dead worker left in `tmp/` (while the other workers serve, see `sweep_after_worker_crash`).

What can be found, and why it is safe to act on it:
- files in `tmp/`: downloads a crash interrupted; never verified, so removed;
- index rows without a file: eviction deletes files before rows; the rows are dropped;
- files without a row: a crash between the rename and the index write; the name is the digest,
  so the file is hashed again and indexed if it matches, deleted if not;
- a damaged SQLite file: moved aside and rebuilt from the verified files on disk.
Nothing under a final name was ever partial (see store/blobs.py), so nothing partial is served.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mirror.errors import RegistryError
from mirror.reference import validate_digest
from mirror.shared import claim_notes, remove_if_unheld
from mirror.store.blobs import BlobStore
from mirror.store.index import Index, SqliteIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    temp_removed: int = 0
    rows_dropped: int = 0
    files_indexed: int = 0
    files_deleted: int = 0
    index_rebuilt: bool = False

    @property
    def repaired(self) -> bool:
        return any((self.temp_removed, self.rows_dropped, self.files_indexed, self.files_deleted,
                    self.index_rebuilt))  # fmt: skip

    def describe(self) -> str:
        if not self.repaired:
            return "cache consistent, nothing to repair"
        parts = [
            f"{self.temp_removed} incomplete download(s) removed",
            f"{self.rows_dropped} index row(s) without a file dropped",
            f"{self.files_indexed} unindexed file(s) verified and indexed",
            f"{self.files_deleted} file(s) failing verification deleted",
        ]
        if self.index_rebuilt:
            parts.insert(0, "damaged index moved aside and rebuilt from disk")
        return "recovery: " + "; ".join(parts)


def _hash_file(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return f"{algorithm}:{digest.hexdigest()}"


def scan(store: BlobStore) -> tuple[dict[str, int], list[Path]]:
    """Verified-by-name files on disk (digest -> size), and files whose name is no digest."""
    found: dict[str, int] = {}
    strays: list[Path] = []
    if not store.blobs.exists():
        return found, strays
    for algorithm_dir in store.blobs.iterdir():
        for prefix_dir in algorithm_dir.iterdir() if algorithm_dir.is_dir() else ():
            for entry in os.scandir(prefix_dir):
                digest = f"{algorithm_dir.name}:{entry.name}"
                try:
                    validate_digest(digest)
                except RegistryError:
                    strays.append(Path(entry.path))
                    continue
                if entry.name[:2] != prefix_dir.name:
                    strays.append(Path(entry.path))
                    continue
                found[digest] = entry.stat().st_size
    return found, strays


async def _open_index(path: Path) -> tuple[Index, bool]:
    """Open the index; if SQLite finds it damaged, move it aside and start a new one."""
    try:
        index = await SqliteIndex.open(path)
        if await index.integrity_ok():
            return index, False
        await index.close()
    except sqlite3.DatabaseError:
        pass
    aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
    for suffix in ("", "-wal", "-shm"):
        candidate = Path(f"{path}{suffix}")
        if candidate.exists():
            candidate.rename(Path(f"{aside}{suffix}"))
    log.error("index %s is damaged: moved to %s, rebuilding from the files on disk", path, aside)
    return await SqliteIndex.open(path), True


async def recover(store: BlobStore, index_path: Path) -> tuple[Index, RecoveryReport]:
    temp_removed = store.prepare()
    index, rebuilt = await _open_index(index_path)
    indexed = await index.all_blobs()
    on_disk, strays = await asyncio.to_thread(scan, store)
    for stray in strays:
        stray.unlink(missing_ok=True)

    rows_dropped = [d for d in indexed if d not in on_disk]
    if rows_dropped:
        await index.forget_blobs(rows_dropped)

    files_indexed, files_deleted = 0, len(strays)
    for digest, size in on_disk.items():
        if indexed.get(digest) == size:
            continue
        if digest in indexed:  # recorded with another size: trust neither, verify the file
            await index.forget_blobs([digest])
        path = store.path(digest)
        actual = await asyncio.to_thread(_hash_file, path, digest.split(":", 1)[0])
        if actual == digest:
            await index.add_blob(digest, size, None)
            files_indexed += 1
        else:
            path.unlink(missing_ok=True)
            files_deleted += 1
    report = RecoveryReport(temp_removed, len(rows_dropped), files_indexed, files_deleted, rebuilt)
    (log.warning if report.repaired else log.info)("%s", report.describe())
    return index, report


# A worker names its temp file in its claim microseconds after creating it (fetch.py); this is
# how long after a worker's death the sweep waits, so that every live download's file is named.
SWEEP_GRACE = 2.0
_TEMP_NAME = re.compile(r"^(?P<key>[a-z0-9]+-[0-9a-f]+)\.[0-9a-f]+$")  # BlobWriter's names


@dataclass(frozen=True, slots=True)
class Swept:
    downloads: int = 0
    bytes: int = 0
    claims_and_locks: int = 0


def orphaned_downloads(
    temps: Mapping[str, float], claimed: Mapping[str, str | None], died_at: float
) -> list[str]:
    """The temp files (name -> mtime) no live download owns, a worker having died at `died_at`.

    `claimed` maps the key (`<algorithm>-<hex>`) of every claim a live worker holds to the temp
    file its notes name, or None if they could not be read (then all of that blob's temp files
    stay). Any other temp file is kept if it was written after `died_at`: a live worker's file
    not named yet (the sweep runs SWEEP_GRACE later, when such a file has been named), or a
    manifest being stored, which takes no claim. The dead worker wrote nothing after it died.
    """
    doomed = []
    for name, mtime in temps.items():
        match = _TEMP_NAME.fullmatch(name)
        if match is None or mtime > died_at:
            continue
        key = match["key"]
        if key in claimed and claimed[key] in (None, name):
            continue
        doomed.append(name)
    return sorted(doomed)


def sweep_after_worker_crash(tmp: Path, died_at: float) -> Swept:
    """Remove what a worker killed mid-download left in `tmp/`: its partial downloads (which
    the size cap does not count and nothing would remove before the next start), its claims
    and its locks. Call it SWEEP_GRACE after `died_at`. Files of live workers stay: a download
    in progress holds its claim, which names its temp file; a held lock is left alone."""
    claimed: dict[str, str | None] = {}
    removed = 0
    for claim in tmp.glob("*.claim"):
        if remove_if_unheld(claim):
            removed += 1
            continue
        notes = claim_notes(claim)
        temp = notes.get("temp") if notes is not None else None
        claimed[claim.stem] = temp if isinstance(temp, str) else None
    temps: dict[str, tuple[float, int]] = {}
    for entry in os.scandir(tmp):
        if _TEMP_NAME.fullmatch(entry.name):
            try:
                stat = entry.stat()
            except FileNotFoundError:
                continue  # committed or discarded meanwhile
            temps[entry.name] = (stat.st_mtime, stat.st_size)
    downloads = orphaned_downloads({n: t[0] for n, t in temps.items()}, claimed, died_at)
    for name in downloads:
        (tmp / name).unlink(missing_ok=True)
    removed += sum(remove_if_unheld(lock) for lock in tmp.glob("*.lock"))
    return Swept(len(downloads), sum(temps[n][1] for n in downloads), removed)
