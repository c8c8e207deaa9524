"""The bucket engine of the content seam (base.py): blobs and manifests as objects in
S3-compatible storage (s3.py), the most used blobs also as local files (the hot tier).

A download is staged in a local temp file exactly as with the local engine (readers follow it,
workers coalesce on it) and uploaded from that file while it grows: a task of its own reads
each part back (from the page cache) and sends it, so a slow bucket never slows the download or
its readers, and memory holds one part, not the blob. `commit` verifies the digest, finishes the
multipart upload (the object exists from that moment, and only then), and keeps the file under
its final name as the hot copy. A wrong digest, a failed upload or a cancelled download aborts
the multipart upload: no object is ever visible for bytes that were not verified. Only then is
the blob indexed (fetch.py), and an object without an index row is never served (the fetcher
looks rows up, not objects) and is swept later (sweep.py).

The hot tier is bounded by `local_cache_size`: least recently served files go first (their
mtime is the access time, set in batches by `touched`). Deleting a hot copy loses nothing: the
bucket holds the blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

from cachetools import LRUCache

from mirror.metrics import DIGEST_MISMATCHES
from mirror.reference import validate_digest
from mirror.store.blobs.local import BlobStore, BlobWriter, DigestMismatch, digest_of
from mirror.store.blobs.s3 import ObjectStore
from mirror.store.hashing import StreamHash
from mirror.store.health import BackendUnavailable
from mirror.store.index.base import Index
from mirror.store.source import Origin, Segment
from mirror.store.sweep import BucketSweeper

log = logging.getLogger(__name__)

HOT_LOW_WATERMARK = 0.9  # a trim of the hot tier goes down to this share of its cap
CONFIRM_EVERY = 2.0  # seconds a hot copy is served without asking the index again
# ... in cluster mode, where every replica's removals move this machine's generation within
# milliseconds (cluster/notify.py): the confirmations are dropped when it moves instead.
CONFIRM_EVERY_COHERENT = 300.0
PRESIGN_EXPIRES = 600.0  # seconds a redirect URL is valid: enough to start a big layer
ABORT_TIMEOUT = 10.0  # seconds an abort may take when a download is dropped


def _read_part(path: Path, offset: int, count: int) -> bytes:
    """Opened and closed within the worker thread: no descriptor number is shared with the
    loop, which may discard (close and unlink) the temp file meanwhile."""
    with open(path, "rb") as fh:
        return os.pread(fh.fileno(), count, offset)


class UploadingWriter(BlobWriter):
    """A download's temp file, uploaded to the bucket as it grows (see module docstring),
    from `begin_upload` on: in a cluster, only the replica holding the blob's claim uploads."""

    def __init__(self, files: BlobStore, digest: str, content: BucketContent) -> None:
        super().__init__(files, digest)
        self._content = content
        self._grew = asyncio.Event()
        self._finished = False
        self._task: asyncio.Task[None] | None = None

    def begin_upload(self) -> None:
        """Start the upload (from the start of the file, whatever was written already)."""
        if self._task is None:
            self._task = self._content.own(self._upload())

    def cancel_upload(self) -> None:
        if self._task is not None:
            self._task.cancel()  # its multipart upload is aborted as the task ends
            self._task = None

    def write(self, chunk: bytes) -> bytes:
        rest = super().write(chunk)
        self._grew.set()
        return rest

    async def _upload(self) -> None:
        objects = self._content.objects
        upload = await objects.begin_upload(self.digest)
        part = upload.part_size
        sent = 0
        try:
            while True:
                available = self.on_disk
                if self._finished and sent >= available:
                    break
                if available - sent >= part or (self._finished and available > sent):
                    count = min(part, available - sent)
                    data = await asyncio.to_thread(_read_part, self.temp_path, sent, count)
                    if len(data) != count:
                        raise OSError(f"temp file of {self.digest} shorter than written")
                    await upload.write(data)
                    sent += count
                    continue
                self._grew.clear()
                await self._grew.wait()
            await upload.complete()
        except BaseException:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(ABORT_TIMEOUT):
                    await asyncio.shield(upload.abort())
            raise

    async def commit(self) -> Path:
        """Verify, finish the upload (the object becomes visible), keep the file as the hot
        copy; raises DigestMismatch or the bucket's error, and then nothing was stored."""
        await self.verify()
        if self.relaying:
            raise OSError(28, "disk full: not all of it reached the file")
        self._finished = True
        self._grew.set()
        self.begin_upload()
        assert self._task is not None
        await asyncio.shield(self._task)
        path = await super().commit()
        self._content.hot.added(self.received)
        return path

    def discard(self) -> None:
        if self._task is not None:
            self._task.cancel()  # aborts the upload (its task is owned by the content store)
        super().discard()


class ObjectSource:
    """A blob in the bucket as a BlobSource (store/source.py): a ranged GET streamed, or a
    redirect to a presigned URL when `s3_redirect` is on.

    A whole-blob read also fills the hot tier: the bytes streamed to the client are written
    to a local temp file on the way, verified at the end, and kept under the blob's final
    name, so the next request is a sendfile hit. A full disk or the client leaving only
    drops the local copy; a digest mismatch drops it and ends the client's response short
    of its last chunk."""

    origin: Origin = "cache"

    def __init__(self, content: BucketContent, digest: str, size: int) -> None:
        self.digest = digest
        self._content = content
        self._objects = content.objects
        self._size = size
        self._redirect = content.redirects

    async def size(self) -> int:
        return self._size

    async def location(self) -> str | None:
        if not self._redirect:
            return None
        return await self._objects.presign(self.digest, PRESIGN_EXPIRES)

    async def segments(self, start: int, end: int | None) -> AsyncIterator[Segment]:
        """Bytes [start, end) as the bucket holds them, unless a whole-blob read fills the hot
        tier: that copy is verified before it is kept, and the client's last chunk is held
        back until it is, so a bad object is neither kept nor served in full.

        Without a copy (the tier is off or the disk full, or a ranged read) the object is
        relayed as stored, as distribution's S3 driver relays it: it was verified before its
        upload was completed (nothing else becomes an object under a digest key, bucket.py),
        and every pull client checks the digest of what it receives. Hashing it again on
        each read was half the relay's throughput on a machine whose cores also run the
        store and the client (bench/README.md, bench/shared figure 2)."""
        stop = self._size if end is None else end
        stream = await self._objects.read(self.digest, start, stop)
        copy = self._content.hot_copy(self.digest) if (start, stop) == (0, self._size) else None
        if copy is None:
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                await stream.aclose()
            return
        hasher: StreamHash | None = None  # takes over from the copy if its disk fails
        held = b""
        try:
            async for chunk in stream:
                if copy is not None:
                    try:
                        copy.write(chunk)
                    except OSError:  # raised before this chunk was hashed
                        hasher = await copy.rehash()
                        hasher.update(chunk)
                        copy.discard()
                        copy = None
                else:
                    assert hasher is not None
                    hasher.update(chunk)
                hashing = copy or hasher
                if hashing is not None and hashing.behind:  # its thread lags: bounded memory
                    await hashing.caught_up()
                if held:
                    yield held
                held = chunk
            if copy is not None:
                actual = await copy.actual_digest()
            else:
                assert hasher is not None
                await hasher.settled()
                actual = f"{hasher.name}:{hasher.hexdigest()}"
            if actual != self.digest:
                DIGEST_MISMATCHES.inc()
                log.error("object %s in the bucket is %s: not served", self.digest, actual)
                raise DigestMismatch(self.digest, actual)
            if held:
                yield held
            if copy is not None:
                await self._content.keep_hot(copy)
                copy = None
        finally:
            if copy is not None:
                copy.discard()
            if hasher is not None:
                hasher.close()
            await stream.aclose()

    def close(self) -> None:
        return None


class HotTier:
    """Local copies of bucket blobs under a byte cap, least recently served removed first."""

    def __init__(self, files: BlobStore, cap: int) -> None:
        self._files = files
        self.cap = cap
        self._usage: int | None = None  # from the last scan plus what was added since
        self._trim: asyncio.Task[None] | None = None

    def added(self, size: int) -> None:
        if self._usage is not None:
            self._usage += size
        if (self._usage is None or self._usage > self.cap) and self._trim is None:
            self._trim = asyncio.create_task(self.trim())

    async def trim(self) -> None:
        """Scan the files; remove the least recently served until under the low watermark."""
        try:
            found = await asyncio.to_thread(self._files.scan)
            usage = sum(size for size, _ in found.values())
            if usage > self.cap:
                target = int(self.cap * HOT_LOW_WATERMARK)
                doomed: list[str] = []
                for digest, (size, _mtime) in sorted(found.items(), key=lambda i: i[1][1]):
                    if usage <= target:
                        break
                    doomed.append(digest)
                    usage -= size
                await self._files.remove(doomed)
                log.info("hot tier: %d local copies removed, %d bytes kept", len(doomed), usage)
            self._usage = usage
        except Exception:
            log.exception("hot tier trim failed")
        finally:
            self._trim = None

    async def close(self) -> None:
        if self._trim is not None:
            self._trim.cancel()
            await asyncio.gather(self._trim, return_exceptions=True)


def _touch_all(paths: list[Path], now: float) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.utime(path, (now, now))


class BucketContent:
    """The bucket engine (see module docstring)."""

    name = "s3"

    def __init__(
        self,
        files: BlobStore,
        objects: ObjectStore,
        hot_cap: int,
        redirect: bool,
        coherent: bool = False,
    ) -> None:
        self._confirm_every = CONFIRM_EVERY_COHERENT if coherent else CONFIRM_EVERY
        self.files = files
        self.objects = objects
        self.hot = HotTier(files, hot_cap)
        self._redirect = redirect
        self.redirects = redirect
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: BucketSweeper | None = None
        self._index: Index | None = None  # set by start(): hot copies of purged blobs go
        self._confirmed: LRUCache[str, float] = LRUCache(100_000)  # digest -> when confirmed
        self._generation: Callable[[], int] | None = None
        self._confirmed_at = -1  # the generation the confirmations were made in

    def own(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A background task this store cancels and awaits at close (uploads)."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve)
        return task

    def start(
        self, index: Index, primary: bool, generation: Callable[[], int] | None = None
    ) -> None:
        self._index = index
        self._generation = generation
        if primary:
            self._sweeper = BucketSweeper(self, index)
            self._sweeper.start()

    async def ping(self) -> bool:
        return await self.objects.ping()

    def writer(self, digest: str) -> BlobWriter:
        return UploadingWriter(self.files, digest, self)

    async def confirm_local(self, digest: str) -> bool:
        """A hot copy is served while the index lists the blob, asked at most once per
        CONFIRM_EVERY seconds per blob and process: a purge or eviction on another replica
        stops this one serving its copy within that time (the copy is then deleted); in
        cluster mode, as soon as this machine hears of it (and only then is the index asked). If the
        index cannot answer, the copy is served: it was verified, and hits outlive outages."""
        now = time.monotonic()
        if self._generation is not None and self._generation() != self._confirmed_at:
            self._confirmed_at = self._generation()
            self._confirmed.clear()  # something was removed, here or on another replica
        confirmed = self._confirmed.get(digest)
        if confirmed is not None and now - confirmed < self._confirm_every:
            return True
        if self._index is None:
            return True
        try:
            listed = await self._index.get_blob(digest) is not None
        except BackendUnavailable:
            return True
        if listed:
            self._confirmed[digest] = now
            return True
        self._confirmed.pop(digest, None)
        self.files.path(digest).unlink(missing_ok=True)
        return False

    async def read(self, digest: str) -> bytes | None:
        data = self.files.read(digest)
        if data is not None:
            return data
        data = await self.objects.get(digest)
        if data is None:
            return None
        if digest_of(data, digest.split(":", 1)[0]) != digest:
            # Never trusted: what is in the bucket was verified on the way in, but a bucket
            # is shared storage others can write to.
            log.error("object %s in the bucket does not match its digest: ignored", digest)
            return None
        with contextlib.suppress(OSError, DigestMismatch):
            await self.files.put(digest, data)  # the hot copy; best effort
            self.hot.added(len(data))
        return data

    async def put(self, digest: str, data: bytes) -> None:
        """A small object already in memory (a manifest), checked against its digest before
        the bucket gets it: nothing unverified is ever written under a digest key."""
        actual = digest_of(data, validate_digest(digest).split(":", 1)[0])
        if actual != digest:
            raise DigestMismatch(digest, actual)
        await self.objects.put(digest, data)
        await self.files.put(digest, data)
        self.hot.added(len(data))

    async def open(self, digest: str, size: int) -> ObjectSource | None:
        """The object, if the bucket has it with the indexed size (one HEAD: a row whose
        object is gone becomes a miss before any header is sent, not a broken body)."""
        stored = await self.objects.stat(digest)
        if stored != size:
            if stored is not None:
                log.error("object %s: %d bytes in the bucket, %d indexed", digest, stored, size)
            return None
        return ObjectSource(self, digest, size)

    def hot_copy(self, digest: str) -> BlobWriter | None:
        """A temp file for a local copy of a blob read from the bucket, unless the hot tier
        is off (size 0) or the disk is full."""
        if self.hot.cap <= 0 or self.files.full:
            return None
        try:
            return self.files.writer(digest)
        except OSError:
            return None

    async def keep_hot(self, copy: BlobWriter) -> None:
        """Verify and keep a local copy made by `hot_copy`; on any failure drop it.

        The blob may have been purged or evicted while it streamed: the index is asked after
        the rename (a removal before it found no file to delete; one after it deletes this
        one), so a removed blob never lingers as a local file the hit path would serve."""
        try:
            path = await copy.commit()
        except (OSError, DigestMismatch) as exc:
            copy.discard()
            if isinstance(exc, DigestMismatch):
                log.error("object %s in the bucket does not match its digest", copy.digest)
            return
        try:
            indexed = self._index is None or await self._index.get_blob(copy.digest) is not None
        except BackendUnavailable:
            indexed = False  # cannot tell: the bucket still has it if it is wanted
        if not indexed:
            path.unlink(missing_ok=True)
            return
        self.hot.added(copy.received)

    async def remove(self, digests: list[str]) -> None:
        await self.objects.delete(digests)
        await self.files.remove(digests)

    async def touched(self, digests: list[str]) -> None:
        paths = [self.files.path(d) for d in digests]
        await asyncio.to_thread(_touch_all, paths, time.time())

    def listing(self) -> AsyncIterator[tuple[str, int, float]]:
        return self.objects.listing()

    async def abort_stale_uploads(self, older_than: float) -> int:
        return await self.objects.abort_stale_uploads(older_than)

    async def close(self) -> None:
        if self._sweeper is not None:
            await self._sweeper.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.hot.close()
        await self.objects.close()


def _retrieve(task: asyncio.Task[None]) -> None:
    """An upload's error reaches its writer's commit; nobody else needs to hear of it."""
    if not task.cancelled():
        task.exception()
