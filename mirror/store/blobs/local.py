"""Content-addressed files: `<data>/blobs/<algorithm>/<2 hex>/<hex>`.

A file reaches its final name only after its digest was verified: bytes go to a temp file
under `<data>/tmp`, the hash is checked, the file is fsync'd and renamed, then the directory is
fsync'd. Whatever is found under a final name was therefore complete and correct when it was
written; whatever is in `tmp/` at start-up is a crash's leftover and is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mirror.cpus import cgroup_cpu_limit, default_workers
from mirror.metrics import DISK_FULL
from mirror.reference import is_digest, validate_digest
from mirror.store.hashing import Budget, StreamHash
from mirror.store.index.base import Index

log = logging.getLogger(__name__)

UNLINKERS = 8  # concurrent unlinks of an eviction pass (see BlobStore.remove)


class DigestMismatch(Exception):
    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"digest mismatch: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _fsync_path(path: Path) -> None:
    _fsync_and_close(os.open(path, os.O_RDONLY))


def _fsync_and_close(fd: int) -> None:
    """For a worker thread that owns `fd`: a descriptor number shared with the loop could be
    closed there (a cancelled download discards its file) and reused for something else while
    the thread still works on it."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.blobs = root / "blobs"
        self._full_until = 0.0
        self._unlinkers: ThreadPoolExecutor | None = None
        self._hashers: ThreadPoolExecutor | None = None
        self._hash_budget = Budget()

    FULL_FOR = 60.0  # seconds a disk-full error keeps the store in pass-through mode

    def note_if_full(self, error: BaseException) -> bool:
        """Remember a disk-full error (ENOSPC, EDQUOT): while it lasts, misses are streamed
        from upstream without caching, a degraded mode that `/healthz`, the `mirror_disk_full`
        gauge and the log report (not `/readyz`: hits still work). True if it was one."""
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            if not self.full:
                log.warning(
                    "disk full (%s): degraded for %ds: misses are served from upstream "
                    "without caching", error.strerror, self.FULL_FOR,
                )  # fmt: skip
            self._full_until = time.monotonic() + self.FULL_FOR
            DISK_FULL.set(1)
            return True
        return False

    @property
    def full(self) -> bool:
        return time.monotonic() < self._full_until

    def refresh_full(self) -> None:
        """End the disk-full mode once its time is up: called by the periodic maintenance, so
        the gauge falls back to 0 whether or not a miss came to ask."""
        if self._full_until and not self.full:
            self._full_until = 0.0
            DISK_FULL.set(0)
            log.info("disk-full mode over: misses are cached again")

    def prepare(self) -> int:
        """Create the layout and remove temp files left by a crash; return how many were removed."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.blobs.mkdir(parents=True, exist_ok=True)
        removed = 0
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
            removed += leftover.suffix not in (".claim", ".lock")  # only downloads count
        return removed

    def scan(self) -> dict[str, tuple[int, float]]:
        """Every file under a valid digest name: (size, mtime). Names that are no digest are
        skipped (recovery removes them)."""
        found: dict[str, tuple[int, float]] = {}
        if not self.blobs.exists():
            return found
        for algorithm_dir in self.blobs.iterdir():
            for prefix_dir in algorithm_dir.iterdir() if algorithm_dir.is_dir() else ():
                for entry in os.scandir(prefix_dir):
                    digest = f"{algorithm_dir.name}:{entry.name}"
                    if entry.name[:2] != prefix_dir.name or not is_digest(digest):
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        stat = entry.stat()
                        found[digest] = (stat.st_size, stat.st_mtime)
        return found

    def path(self, digest: str) -> Path:
        """The final path of a digest; validation keeps every path inside `<data>/blobs`."""
        algorithm, hexdigest = validate_digest(digest).split(":", 1)
        return self.blobs / algorithm / hexdigest[:2] / hexdigest

    def read(self, digest: str) -> bytes | None:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            return None

    async def remove(self, digests: list[str]) -> None:
        """Delete these blobs' files (eviction, purge). A reader holding one open keeps its
        descriptor and completes; unlinks run off the loop, a pass may delete thousands.

        An unlink may wait for the disk (0.3 ms each on a journaled virtual disk), so
        UNLINKERS run at once, on threads of their own, and the default pool stays free for
        commits' fsync. Where it does not wait (0.06 ms of CPU each on this 2-core machine),
        more threads only take turns at the GIL and the cores: a 10% pass at a million blobs
        took 16.2 s with 32, 13.1 s with 8, 13.8 s with 4. Paths are made on those threads
        too: 25 us each is 0.1 s of the loop for a batch of 5,000."""
        if not digests:
            return
        if self._unlinkers is None:
            self._unlinkers = ThreadPoolExecutor(UNLINKERS, thread_name_prefix="unlink")
        loop = asyncio.get_running_loop()
        parts = [digests[n::UNLINKERS] for n in range(min(UNLINKERS, len(digests)))]
        await asyncio.gather(
            *(loop.run_in_executor(self._unlinkers, self._unlink_all, part) for part in parts)
        )

    def _unlink_all(self, digests: list[str]) -> None:
        """Paths as strings, not `path()`'s Path objects: 100,000 of those were a third of
        the Python these threads ran, each holding the GIL the loop and the index's thread
        wait for."""
        blobs = str(self.blobs)
        for digest in digests:
            algorithm, hexdigest = validate_digest(digest).split(":", 1)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{blobs}/{algorithm}/{hexdigest[:2]}/{hexdigest}")

    def writer(self, digest: str) -> BlobWriter:
        return BlobWriter(self, digest)

    def stream_hash(self, algorithm: str) -> StreamHash:
        """A hash computed on this process's hashing threads (hashing.py), created on first
        use: one per CPU the process may use (its cgroup quota counted, as for the number of
        workers), since more would only queue for them; one memory budget for all."""
        if self._hashers is None:
            cores = len(os.sched_getaffinity(0))
            threads = default_workers(cores, cgroup_cpu_limit(), cap=cores)
            self._hashers = ThreadPoolExecutor(threads, thread_name_prefix="hash")
        return StreamHash(algorithm, self._hashers, self._hash_budget)

    async def put(self, digest: str, data: bytes) -> None:
        """Store a small, already-in-memory object (a manifest) under its verified digest."""
        writer = self.writer(digest)
        try:
            writer.write(data)
            await writer.commit()
        except BaseException:
            writer.discard()
            raise


class BlobWriter:
    """A temp file growing toward one digest; `commit` verifies and publishes it atomically."""

    def __init__(self, store: BlobStore, digest: str) -> None:
        self.digest = digest
        self.final_path = store.path(digest)
        self._hash = store.stream_hash(digest.split(":", 1)[0])
        self.temp_path = store.tmp / f"{digest.replace(':', '-')}.{secrets.token_hex(6)}"
        self._fd: int | None = os.open(
            self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
        )
        self.received = 0
        self.on_disk = 0  # bytes in the file: fewer than received once the disk filled up
        self.relaying = False
        self._store = store

    def write(self, chunk: bytes) -> bytes:
        """Append synchronously: a page-cache write of one chunk costs microseconds.

        Once the disk is full (ENOSPC) the writer keeps hashing but stops writing: it returns
        what did not reach the file, for the caller to relay, and it can no longer commit."""
        assert self._fd is not None
        rest = chunk
        if not self.relaying:
            view = memoryview(chunk)
            try:
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
                    self.on_disk += written
                rest = b""
            except OSError as exc:
                if not self._store.note_if_full(exc):
                    raise
                self.relaying = True
                rest = bytes(view)
        self._hash.update(chunk)
        self.received += len(chunk)
        return rest

    @property
    def behind(self) -> bool:
        """The hash (on its thread) lags far behind `write`: await `caught_up` before more."""
        return self._hash.behind

    async def caught_up(self) -> None:
        await self._hash.caught_up()

    async def rehash(self) -> StreamHash:
        """The running hash, to go on hashing after this writer is dropped (a copy that hit
        a full disk while its reader still needs the digest checked)."""
        await self._hash.settled()
        return self._hash.fork()

    def begin_upload(self) -> None:
        """Start sending the bytes to where the engine keeps them for good, if that is not
        this file (bucket.py); called once this process is the one to store the blob."""
        return None

    def cancel_upload(self) -> None:
        """Stop an upload begun by `begin_upload` and drop what it sent (another replica
        stores the blob after all)."""
        return None

    async def commit_local(self) -> Path:
        """Verify and keep as a local file only, whatever the engine: a copy of a blob that
        another replica stores (a cluster follower's)."""
        return await BlobWriter.commit(self)

    async def actual_digest(self) -> str:
        """The digest of every byte written, once the hashing thread has caught up."""
        await self._hash.settled()
        return f"{self._hash.name}:{self._hash.hexdigest()}"

    async def verify(self) -> None:
        """Raises DigestMismatch (the caller discards) unless the bytes are the digest's."""
        actual = await self.actual_digest()
        if actual != self.digest:
            raise DigestMismatch(self.digest, actual)

    async def commit(self) -> Path:
        """Verify, fsync, rename into place; raises DigestMismatch (the caller discards).

        The rename happens on the event loop after the awaited fsync, with no await between it
        and the return, so a caller can switch its readers to the final path atomically.
        """
        await self.verify()
        if self.relaying:
            raise OSError(errno.ENOSPC, "disk full: not all of it reached the file")
        fd = self._fd
        assert fd is not None
        await asyncio.to_thread(_fsync_and_close, os.dup(fd))
        os.close(fd)
        self._fd = None
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.temp_path, self.final_path)
        return self.final_path

    async def sync_directory(self) -> None:
        """Make the rename itself durable (after readers were switched over)."""
        await asyncio.to_thread(_fsync_path, self.final_path.parent)

    def discard(self) -> None:
        self._hash.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.temp_path.unlink(missing_ok=True)


class LocalContent:
    """The local engine of the content seam (base.py): the files are the store."""

    name = "local"
    redirects = False

    def __init__(self, files: BlobStore) -> None:
        self.files = files

    def start(
        self, index: Index, primary: bool, generation: Callable[[], int] | None = None
    ) -> None:
        return None  # recovery.py keeps the files and the index in agreement

    async def ping(self) -> bool:
        return os.access(self.files.tmp, os.W_OK)

    def writer(self, digest: str) -> BlobWriter:
        return self.files.writer(digest)

    async def confirm_local(self, digest: str) -> bool:
        return True

    async def read(self, digest: str) -> bytes | None:
        return self.files.read(digest)

    async def put(self, digest: str, data: bytes) -> None:
        await self.files.put(digest, data)

    async def open(self, digest: str, size: int) -> None:
        return None  # the file was looked for first: nothing is stored anywhere else

    async def remove(self, digests: list[str]) -> None:
        await self.files.remove(digests)

    async def touched(self, digests: list[str]) -> None:
        return None  # the index's access times are the only LRU order

    async def listing(self) -> AsyncIterator[tuple[str, int, float]]:
        for digest, (size, mtime) in (await asyncio.to_thread(self.files.scan)).items():
            yield digest, size, mtime

    async def abort_stale_uploads(self, older_than: float) -> int:
        return 0  # downloads stage in tmp/, which recovery empties

    async def close(self) -> None:
        return None
