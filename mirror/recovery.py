"""Recovery: after a crash or `kill -9`, make index and disk agree again, and clear what a dead
worker left in `tmp/` (while the other workers serve, see `sweep_after_worker_crash`).

What can be found, and why it is safe to act on it:
- files in `tmp/`: downloads a crash interrupted; never verified, so removed;
- index rows without a file: eviction deletes files before rows; the rows are dropped;
- files without a row: a crash between the rename and the index write; the name is the digest,
  so the file is hashed again and indexed if it matches, deleted if not;
- a damaged SQLite file: moved aside and rebuilt from the verified files on disk.
Nothing under a final name was ever partial (see store/blobs/local.py), so nothing partial is
served.

Start-up does only what serving depends on (`open_checked`): temp files go (followers read a
temp file only when a live download's claim names it, and no download is live yet), and the
index opens or is rebuilt. What costs one look at every file and row (`reconcile`, 20 s at a
million blobs) runs afterwards in the background, in the primary process, because each thing
it repairs is harmless meanwhile:
- a row without a file is a miss: the hit path opens files by name, finds none, and fetches;
- a file without a row is served by name, as it is between the rename and the index write of
  every download: it reached that name only after its digest was verified. It is missing from
  the usage account until reconcile indexes it (and re-hashes it: a file tampered with or
  damaged under its name is deleted then, as at a synchronous start);
- a stray name (not a digest) is never asked for.
Reconcile takes one `<algorithm>/<2 hex>` directory at a time and the index rows of the same
digest range, so memory stays bounded and downloads and evictions running meanwhile are taken
into account (see `_reconcile_directory`). A marker file says that a reconcile is due; it is
removed only once one finished, so a primary restarted after a crash runs it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from mirror.errors import RegistryError
from mirror.reference import validate_digest
from mirror.shared import claim_notes, remove_if_unheld
from mirror.store.blobs import BlobStore
from mirror.store.index import Index, SqliteIndex
from mirror.store.index.sqlite import SchemaTooNew

log = logging.getLogger(__name__)

ALGORITHMS = ("sha256", "sha512")  # the digests reference.validate_digest accepts
PREFIXES = tuple(f"{n:02x}" for n in range(256))
PENDING = "recovery-pending"  # the marker file, in the data directory
PROGRESS_EVERY = 64  # directories between progress lines (4 lines per algorithm)


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


def _hash_unchanged(path: Path, algorithm: str) -> tuple[str, bool] | None:
    """The digest of the file at `path`, and whether `path` still names the file hashed
    (a download may rename a fresh copy over it meanwhile); None if it is gone."""
    digest = hashlib.new(algorithm)
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
            hashed = os.fstat(fh.fileno()).st_ino
        unchanged = os.stat(path).st_ino == hashed
    except FileNotFoundError:
        return None
    return f"{algorithm}:{digest.hexdigest()}", unchanged


def _scan_directory(directory: Path, algorithm: str) -> tuple[dict[str, int], list[Path]]:
    """Files named by a digest in one prefix directory (digest -> size), and files that are
    not (a name that is no digest, or in the wrong prefix directory)."""
    found: dict[str, int] = {}
    strays: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return found, strays
    for entry in entries:
        digest = f"{algorithm}:{entry.name}"
        try:
            validate_digest(digest)
            if entry.name[:2] != directory.name:
                raise RegistryError.digest_invalid(digest)
            found[digest] = entry.stat().st_size
        except RegistryError:
            strays.append(Path(entry.path))
        except FileNotFoundError:
            continue  # evicted since the listing
    return found, strays


def _strays_outside_prefixes(store: BlobStore) -> list[Path]:
    """Files under `blobs/` outside every `<algorithm>/<2 hex>` directory: never asked for."""
    strays: list[Path] = []
    if not store.blobs.is_dir():
        return strays
    for top in store.blobs.iterdir():
        if top.name not in ALGORITHMS or not top.is_dir():
            strays.extend(p for p in ([top] if not top.is_dir() else top.rglob("*")) if p.is_file())
            continue
        for sub in top.iterdir():
            if sub.name not in PREFIXES or not sub.is_dir():
                strays.extend(p for p in ([sub] if not sub.is_dir() else sub.rglob("*"))
                              if p.is_file())  # fmt: skip
    return strays


class IndexOpenError(Exception):
    """The index cannot be opened now, and is not damaged: start-up stops and says why."""


# SQLite's primary result codes that mean the file itself is bad (its extended codes add bits
# above the low byte).
_DAMAGE = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


async def _open_index(path: Path) -> tuple[Index, bool]:
    """Open the index; if SQLite finds it damaged, move it aside and start a new one.

    Damaged means a file SQLite calls corrupt or not a database, or one that fails its
    quick_check. Anything else (the disk full, the file locked past the busy timeout, an
    I/O error, a schema newer than this mirror's) stops the start instead: the file may be
    sound, and starting anew would throw away its pins, tags and holders for good."""
    try:
        index = await SqliteIndex.open(path)
        if await index.integrity_ok():
            return index, False
        await index.close()
    except SchemaTooNew as exc:
        raise IndexOpenError(f"index {path}: {exc}") from None
    except sqlite3.DatabaseError as exc:
        if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) not in _DAMAGE:
            raise IndexOpenError(f"index {path} cannot be opened: {exc}") from None
    aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
    for suffix in ("", "-wal", "-shm"):
        candidate = Path(f"{path}{suffix}")
        if candidate.exists():
            candidate.rename(Path(f"{aside}{suffix}"))
    log.error("index %s is damaged: moved to %s, rebuilding from the files on disk", path, aside)
    return await SqliteIndex.open(path), True


async def open_checked(store: BlobStore, index_path: Path) -> tuple[Index, RecoveryReport]:
    """The start-up part of recovery: temp files removed, the index opened (moved aside and
    started anew if damaged). Costs the temp files and SQLite's quick_check (0.4 s at a
    million rows), not a look at every blob; `reconcile` does that afterwards."""
    temp_removed = store.prepare()
    index, rebuilt = await _open_index(index_path)
    return index, RecoveryReport(temp_removed=temp_removed, index_rebuilt=rebuilt)


def mark_pending(data: Path) -> None:
    """Record that a reconcile is due (at every start: a crash can have happened before)."""
    (data / PENDING).touch()


def pending(data: Path) -> bool:
    return (data / PENDING).exists()


def _no_adjustment(_delta: int) -> None:
    pass


async def reconcile(
    store: BlobStore,
    index: Index,
    adjust_usage: Callable[[int], None] = _no_adjustment,
    report: RecoveryReport = RecoveryReport(),
) -> RecoveryReport:
    """Make index and files agree, one prefix directory at a time, while the cache serves;
    `adjust_usage` is told every change to the bytes indexed (rows dropped: negative; files
    indexed: positive), so the usage account is right once this returns. Returns `report`
    with what was repaired added. The marker is not touched (see `ReconcileTask`)."""
    strays = await asyncio.to_thread(_strays_outside_prefixes, store)
    for stray in strays:
        stray.unlink(missing_ok=True)
    report = replace(report, files_deleted=report.files_deleted + len(strays))
    directories = [(algorithm, prefix) for algorithm in ALGORITHMS for prefix in PREFIXES]
    started = time.monotonic()
    for done, (algorithm, prefix) in enumerate(directories, start=1):
        report = await _reconcile_directory(store, index, algorithm, prefix, adjust_usage, report)
        if done % PROGRESS_EVERY == 0 and done < len(directories):
            log.info(
                "recovery: %d of %d blob directories checked (%.1f s)",
                done, len(directories), time.monotonic() - started,
            )  # fmt: skip
    return report


async def _reconcile_directory(
    store: BlobStore,
    index: Index,
    algorithm: str,
    prefix: str,
    adjust_usage: Callable[[int], None],
    report: RecoveryReport,
) -> RecoveryReport:
    """One directory against the rows of its digest range, safe beside live downloads and
    evictions (a download renames its file, then indexes it; eviction deletes files, then rows):

    - the files are listed before the rows are read, so a file listed without a row is either
      a crash's leftover or a download between rename and index write: hashing and indexing it
      is right for both (`add_blob` says whether the row is new; only a new row is counted,
      and the download then gives back its reservation);
    - a row without a listed file is dropped only if the file is still missing when looked at
      again (a download may have renamed and indexed it since the listing);
    - `forget_blobs` says how many bytes it actually deleted, so a row that an eviction pass
      drops at the same time is subtracted from the usage account once.
    """
    directory = store.blobs / algorithm / prefix
    on_disk, strays = await asyncio.to_thread(_scan_directory, directory, algorithm)
    low = f"{algorithm}:{prefix}"
    indexed = await index.blobs_in_range(low, low + "g")  # 'g' sorts after every hex digit
    for stray in strays:
        stray.unlink(missing_ok=True)
    rows_dropped, files_indexed, files_deleted = 0, 0, len(strays)

    missing = [d for d in indexed if d not in on_disk]
    if missing:
        gone = await asyncio.to_thread(lambda: [d for d in missing if not store.path(d).exists()])
        if gone:
            adjust_usage(-await index.forget_blobs(gone))
            rows_dropped += len(gone)

    for digest, size in on_disk.items():
        recorded = indexed.get(digest)
        if recorded == size:
            continue
        if recorded is not None:  # recorded with another size: trust neither, verify the file
            adjust_usage(-await index.forget_blobs([digest]))
        path = store.path(digest)
        hashed = await asyncio.to_thread(_hash_unchanged, path, algorithm)
        if hashed is None:
            continue  # evicted since the listing
        actual, unchanged = hashed
        if actual == digest:
            if await index.add_blob(digest, size, None):
                adjust_usage(size)
            files_indexed += 1
        elif unchanged:  # not a verified copy renamed over it since it was hashed
            path.unlink(missing_ok=True)
            files_deleted += 1
    return replace(
        report,
        rows_dropped=report.rows_dropped + rows_dropped,
        files_indexed=report.files_indexed + files_indexed,
        files_deleted=report.files_deleted + files_deleted,
    )


async def recover(store: BlobStore, index_path: Path) -> tuple[Index, RecoveryReport]:
    """All of recovery before returning (tools, tests): `open_checked`, then `reconcile`."""
    index, report = await open_checked(store, index_path)
    try:
        report = await reconcile(store, index, report=report)
    except BaseException:
        await index.close()
        raise
    (store.root / PENDING).unlink(missing_ok=True)
    (log.warning if report.repaired else log.info)("%s", report.describe())
    return index, report


class ReconcileTask:
    """The background reconcile the primary process owns: started after the cache serves,
    cancelled at shutdown (the marker stays, so the next start runs it again), logged when
    done, and followed by `then` (the usage gauge, counts, and an eviction pass if the bytes
    found push the cache over its cap)."""

    def __init__(
        self,
        store: BlobStore,
        index: Index,
        adjust_usage: Callable[[int], None],
        then: Callable[[], Awaitable[None]],
    ) -> None:
        self._store = store
        self._index = index
        self._adjust = adjust_usage
        self._then = then
        self._task: asyncio.Task[RecoveryReport] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="recovery")

    async def _run(self) -> RecoveryReport:
        started = time.monotonic()
        log.info("recovery: checking every blob against the index in the background")
        try:
            report = await reconcile(self._store, self._index, self._adjust)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("recovery failed; it runs again at the next start")
            raise
        (self._store.root / PENDING).unlink(missing_ok=True)
        (log.warning if report.repaired else log.info)(
            "%s (background, %.1f s)", report.describe(), time.monotonic() - started
        )
        await self._then()
        return report

    async def wait(self) -> RecoveryReport:
        """The report once the reconcile finished (tests, the bench)."""
        assert self._task is not None
        return await asyncio.shield(self._task)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


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
