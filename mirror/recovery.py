"""Start-up recovery: after a crash or `kill -9`, make index and disk agree again.

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
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from mirror.errors import RegistryError
from mirror.reference import validate_digest
from mirror.store.blobs import BlobStore
from mirror.store.index import Index

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
        index = await Index.open(path)
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
    return await Index.open(path), True


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
