"""Single-flight blob fetches: one upstream download per digest, any number of readers.

The first request for a missing blob starts a download task that owns the upstream response
and a temp file. Every request for that digest meanwhile (any repository, whole or ranged)
reads the growing file through its own file descriptor, so memory stays flat whatever the
blob size or the number of readers. Readers only observe the fetch; a client that leaves
does not touch the download the others depend on.

Integrity rule: no reader sends the final byte of its response before the whole blob was
verified. If the digest does not match, every reader aborts its connection, so no client ever
sees a clean end of a wrong body (a short body is what a failed fill must look like).

Across worker processes the download is claimed with a lock file (see shared.Claim): the
worker holding the claim downloads; any other worker follows the claimant's temp file, polling
its size, and treats the final name appearing as verification. So N clients spread over the
workers still cause one upstream transfer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp

from mirror.cluster.claims import Claims
from mirror.cluster.client import PeerClient
from mirror.errors import RegistryError
from mirror.evict import Evictor
from mirror.metrics import (
    COALESCED,
    DIGEST_MISMATCHES,
    INFLIGHT_FETCHES,
    UPSTREAM_BYTES,
    UPSTREAM_RESUMES,
)
from mirror.missing import MissingCache
from mirror.shared import Claim
from mirror.store.blobs import BlobWriter, DigestMismatch
from mirror.store.blobs.base import ContentStore
from mirror.store.health import BackendHealth, BackendUnavailable
from mirror.store.index import Index
from mirror.store.source import BlobSource, FileSlice, FileSource, Origin, Segment
from mirror.upstream.client import TRANSIENT_ERRORS, RegistryClient, upstream_error

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
MAX_RESUMES = 5
RESUME_DELAYS = (0.0, 0.2, 0.5, 1.0, 2.0)
CDN_EXPIRED = {403, 404, 410}  # a signed CDN URL that expired: ask the registry again
FOLLOW_POLL = 0.005  # seconds between looks at another worker's download
RELAY_WINDOW = 64 * 1024 * 1024  # bytes kept in memory for readers once the disk is full
DRAIN = 30.0  # seconds a verified download may take to be stored once shutdown begins
STALE_WAIT = 10.0  # seconds a follower waits for a broken claimant's claim to go stale
RETAKE_POLL = 0.5  # seconds between its attempts to take it over
MAX_PEER_FAILURES = 3  # broken peer streams in a row without a byte of progress
QUEUED_HEADERS = 2.0  # seconds a queued download's clients wait before headers come from a HEAD


class InflightFetch:
    """The observable state of one download, shared by all its readers."""

    def __init__(
        self,
        digest: str,
        path: Path,
        final_path: Path,
        origin: tuple[str, str] | None = None,
        pending_origin: bool = False,
    ) -> None:
        self.digest = digest
        self.path = path  # the temp file; switches to the final path at commit
        self.final_path = final_path
        # (registry, repository) the upstream is sending it for; None when following another
        # worker's download, or another replica's (cluster): then the upstream was never
        # asked as any repository of this machine's clients. Readers for any other repository
        # must be confirmed first. In a cluster it is known once the claim was taken.
        self.origin = origin
        self._origin_known = asyncio.Event()
        if not pending_origin:
            self._origin_known.set()
        self.size: int | None = None
        self.received = 0
        self.verified = False
        self.error: BaseException | None = None
        # After a disk-full error: the file holds bytes up to disk_end, later ones are relayed
        # from a bounded window in memory (readers at the live edge never notice).
        self.disk_end: int | None = None
        self._tail: collections.deque[tuple[int, bytes]] = collections.deque()
        self._tail_bytes = 0
        loop = asyncio.get_running_loop()
        self._started: asyncio.Future[None] = loop.create_future()
        self._progress: asyncio.Future[None] = loop.create_future()

    # -- writer side -------------------------------------------------------------------------
    def started(self, size: int | None) -> None:
        self.size = size
        if not self._started.done():
            self._started.set_result(None)

    def advanced(self, received: int) -> None:
        self.received = received
        self._wake()

    def relay(self, disk_end: int, offset: int, data: bytes) -> None:
        self.disk_end = disk_end
        if data:
            self._tail.append((offset, data))
            self._tail_bytes += len(data)
            while self._tail_bytes > RELAY_WINDOW and len(self._tail) > 1:
                self._tail_bytes -= len(self._tail.popleft()[1])

    def read_tail(self, pos: int, count: int) -> bytes:
        """Relayed bytes from `pos`; a reader that fell behind the window is dropped."""
        for offset, data in self._tail:
            if offset <= pos < offset + len(data):
                return data[pos - offset : pos - offset + count]
        raise ConnectionResetError("reader fell behind a download relayed from memory")

    def verified_whole(self) -> None:
        """The digest matched: readers may send their last byte (durability comes after)."""
        self.verified = True
        self.size = self.received
        self._wake()

    def succeeded(self, final_path: Path) -> None:
        self.path = final_path
        self.verified_whole()

    def origin_decided(self, origin: tuple[str, str] | None) -> None:
        self.origin = origin
        self._origin_known.set()

    async def origin_known(self) -> tuple[str, str] | None:
        """The repository the upstream was asked as, once that is decided (see __init__)."""
        await self._origin_known.wait()
        return self.origin

    def failed(self, error: BaseException) -> None:
        self.error = error
        self._origin_known.set()
        if not self._started.done():
            self._started.set_exception(error)
            self._started.exception()  # mark retrieved: a fetch nobody awaits must not warn
        self._wake()

    def _wake(self) -> None:
        done, self._progress = self._progress, asyncio.get_running_loop().create_future()
        done.set_result(None)

    # -- reader side -------------------------------------------------------------------------
    async def wait_started(self) -> None:
        """Wait for the upstream response headers; raises the upstream's error if there was one."""
        await asyncio.shield(self._started)

    async def refused(self) -> bool:
        """Wait for the upstream's answer; True if it refused the download (401, 403, 404): an
        answer about the repository the download was started for, not about the blob."""
        try:
            await self.wait_started()
        except RegistryError as exc:
            return exc.status in (401, 403, 404)
        except Exception:
            return False
        return False

    async def wait_progress(self) -> None:
        await asyncio.shield(self._progress)

    def open_file(self) -> BinaryIO:
        """The bytes so far; a descriptor survives the rename at commit. Another worker's temp
        file may have just been renamed, hence the second name."""
        for path in (self.path, self.final_path):
            try:
                return open(path, "rb")
            except FileNotFoundError:
                continue
        self.check()
        raise RegistryError.unavailable("the download of this blob vanished")

    def readable_until(self, end: int | None) -> int:
        """How far a reader whose response ends at `end` may send now.

        Until verification, the reader's final byte is held back (see module docstring).
        """
        stop = self.received if end is None else min(end, self.received)
        if self.verified:
            return stop
        final = self.received if end is None else end
        return max(0, min(stop, final - 1))

    def check(self) -> None:
        """Raise if the fetch failed: before a response started this becomes a JSON error,
        after it the connection is dropped (see app.registry_errors)."""
        if isinstance(self.error, RegistryError):
            raise self.error
        if self.error is not None:
            raise RegistryError.unavailable("upstream blob failed verification") from self.error


class FollowSource:
    """A download in flight as a BlobSource (store/source.py): the growing file, its last byte
    held back until verification, bytes past a full disk from the relay window in memory."""

    def __init__(self, fetch: InflightFetch, origin: Origin) -> None:
        self.digest = fetch.digest
        self.origin = origin
        self._fetch = fetch
        self._file: BinaryIO | None = None

    async def size(self) -> int | None:
        fetch = self._fetch
        await fetch.wait_started()
        fetch.check()
        # Opened before any further await: the file exists now (a failure unlinks it and sets
        # the error in one step), and this descriptor survives the rename at commit.
        self._file = fetch.open_file()
        return fetch.size

    async def location(self) -> None:
        return None

    async def segments(self, start: int, end: int | None) -> AsyncIterator[Segment]:
        fetch, f = self._fetch, self._file
        assert f is not None, "size() opens the file"
        pos = start
        while True:
            fetch.check()
            limit = fetch.readable_until(end)
            if pos < limit:
                if fetch.disk_end is not None and pos >= fetch.disk_end:
                    data = fetch.read_tail(pos, limit - pos)  # the disk filled up: from memory
                    yield data
                    pos += len(data)
                    continue
                stop = limit if fetch.disk_end is None else min(limit, fetch.disk_end)
                yield FileSlice(f, pos, stop - pos)
                pos = stop
                continue
            if fetch.verified and pos >= (end if end is not None else fetch.received):
                return
            await fetch.wait_progress()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class ClaimLost(ConnectionError):
    """This replica's claim on a download was taken over by another (claims.py `lost`)."""


@dataclass(slots=True)
class ClusterRole:
    """This replica's part in a blob's cluster-wide single flight; changes on takeover."""

    key: str
    held: bool
    peer: str | None  # the claimant's peer endpoint, while following


@dataclass(frozen=True, slots=True)
class Download:
    """One download this worker runs: what its readers follow, the temp file it fills, the
    claim that makes it the only one, and the upstream it asks as which repository."""

    fetch: InflightFetch
    writer: BlobWriter
    claim: Claim
    client: RegistryClient
    repository: str
    # In a cluster: whether this replica holds the blob's claim or follows the claimant's
    # peer endpoint (cluster/claims.py); None on a single replica.
    role: ClusterRole | None = None

    def parts(self) -> tuple[InflightFetch, BlobWriter, Claim, RegistryClient]:
        return self.fetch, self.writer, self.claim, self.client


class BlobFetcher:
    """The in-flight table and the download tasks it owns."""

    def __init__(
        self,
        content: ContentStore,
        index: Index,
        clients: Mapping[str, RegistryClient],
        missing: MissingCache,
        evictor: Evictor,
        max_fetches: int = 32,
        health: BackendHealth | None = None,
        cluster: tuple[Claims, PeerClient] | None = None,
    ) -> None:
        self._health = health
        self._cluster = cluster
        self._content = content
        self._store = content.files
        # Per registry, first come first served (asyncio.Semaphore wakes waiters in order):
        # a burst of cold pulls queues instead of opening hundreds of upstream transfers.
        self._slots = {name: asyncio.Semaphore(max_fetches) for name in clients}
        self._missing = missing
        self._evictor = evictor
        self._index = index
        self._clients = clients
        self._inflight: dict[str, InflightFetch] = {}
        self._tasks: dict[asyncio.Task[None], InflightFetch] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    async def open_or_join(
        self, registry: str, repository: str, digest: str, redirectable: bool = False
    ) -> BlobSource | tuple[InflightFetch, bool]:
        """A stored blob to serve, or the fetch to follow (joined, or started now).

        A hit on a local file costs no index round trip: a file under its final name was
        verified before the rename, so opening it is the lookup, and the open descriptor keeps
        serving even if eviction unlinks the file meanwhile. Without a local file, the index
        says whether the content store holds it elsewhere (the bucket); an object without an
        index row is never served. `join` re-checks the in-flight table synchronously, so a
        download started during that await is joined, not doubled. `redirectable`: a GET
        the engine may answer with a redirect (`s3_redirect`): the bucket's copy is preferred
        to a local one, so the replica does not carry the bytes.
        """
        fetch = self._inflight.get(digest)
        if fetch is not None:
            COALESCED.inc()
            return fetch, True
        if not self._content.redirects or not redirectable:
            local = await self._local_file(digest)
            if local is not None:
                return local
        self._missing.check(registry, repository, "blob", digest)
        if digest not in self._inflight:
            if self._health is not None:
                self._health.check()  # a backend known down is not waited for again
            size = await self._index.get_blob(digest)
            stored = None if size is None else await self._content.open(digest, size)
            if stored is not None:
                return stored
        if self._health is not None and digest not in self._inflight:
            self._health.check()  # went down meanwhile: nothing could be stored (health.py)
        return self.join(registry, repository, digest)

    async def _local_file(self, digest: str) -> FileSource | None:
        try:
            f = open(self._store.path(digest), "rb")  # noqa: SIM115 - closed by the caller
        except FileNotFoundError:
            return None
        if await self._content.confirm_local(digest):
            return FileSource(digest, f)
        f.close()  # a copy of a blob removed elsewhere (another replica's purge)
        return None

    async def open_stored(self, digest: str, redirectable: bool = False) -> BlobSource | None:
        """A stored blob to serve, or None: never a download (hosted content has no
        upstream). A download of it in flight is not joined: what it brings is not stored yet."""
        if not self._content.redirects or not redirectable:
            local = await self._local_file(digest)
            if local is not None:
                return local
        size = await self._index.get_blob(digest)
        return None if size is None else await self._content.open(digest, size)

    async def peek(self, digest: str) -> BlobSource | None:
        """For another replica (cluster/peers.py): the blob if this machine has it at hand,
        downloading (in this worker or another) or as a local file; never starts a download
        and asks no index: a follower asks the claimant, which has it or has failed."""
        fetch = self._inflight.get(digest)
        if fetch is not None:
            return FollowSource(fetch, "peer")
        try:
            f = open(self._store.path(digest), "rb")  # noqa: SIM115 - closed by the caller
        except FileNotFoundError:
            pass
        else:
            return FileSource(digest, f, "peer")
        claim = Claim.take(self._store.tmp / f"{digest.replace(':', '-')}.claim")
        if claim.owner:  # no worker of this machine downloads it
            claim.close()
            return None
        return FollowSource(self._follow_worker(digest, claim), "peer")

    async def stream_uncached(
        self, registry: str, repository: str, digest: str
    ) -> tuple[int | None, AsyncIterator[bytes]]:
        """The blob straight from upstream, not cached (the disk is full): its size, and its
        bytes, the last chunk held back until the digest matched (else the stream raises)."""
        resp = await self._clients[registry].request("GET", repository, f"blobs/{digest}")
        if resp.status != 200:
            async with resp:
                raise await upstream_error(resp, "blob", digest)

        async def chunks() -> AsyncIterator[bytes]:
            hasher = hashlib.new(digest.split(":", 1)[0])
            held = b""
            async with resp:
                async for chunk in resp.content.iter_chunked(CHUNK):
                    UPSTREAM_BYTES.inc(len(chunk))
                    hasher.update(chunk)
                    if held:
                        yield held
                    held = chunk
            if f"{hasher.name}:{hasher.hexdigest()}" != digest:
                DIGEST_MISMATCHES.inc()
                raise DigestMismatch(digest, f"{hasher.name}:{hasher.hexdigest()}")
            if held:
                yield held

        return resp.content_length, chunks()

    async def has(self, digest: str) -> bool:
        """Downloading, on local disk, or indexed as stored (the bucket)."""
        if digest in self._inflight or self._store.path(digest).exists():
            return True
        return await self._index.get_blob(digest) is not None

    async def upstream_size(self, registry: str, repository: str, digest: str) -> int:
        """Answer a HEAD for a missing blob without downloading it (HEADs are free upstream)."""
        self._missing.check(registry, repository, "blob", digest)
        resp = await self._clients[registry].request("HEAD", repository, f"blobs/{digest}")
        async with resp:
            if resp.status != 200 or resp.content_length is None:
                error = await upstream_error(resp, "blob", digest)
                self._missing.remember(registry, repository, "blob", digest, error)
                raise error
            return resp.content_length

    def join(self, registry: str, repository: str, digest: str) -> tuple[InflightFetch, bool]:
        """The fetch for `digest`, started now unless one runs; and whether one already ran.

        Synchronous on purpose: checking the table and inserting into it cannot interleave
        with another request on the event loop.
        """
        fetch = self._inflight.get(digest)
        if fetch is not None:
            COALESCED.inc()
            return fetch, True
        final_path = self._store.path(digest)
        claim = Claim.take(self._store.tmp / f"{digest.replace(':', '-')}.claim")
        if not claim.owner or final_path.exists():
            # Another worker downloads it (or just finished): follow its file.
            if claim.owner:
                claim.close()
            COALESCED.inc()
            return self._follow_worker(digest, claim), True
        writer = self._content.writer(digest)
        claim.note(temp=writer.temp_path.name)
        fetch = InflightFetch(
            digest, writer.temp_path, final_path, (registry, repository),
            pending_origin=self._cluster is not None,
        )  # fmt: skip
        INFLIGHT_FETCHES.inc()
        self._start(
            fetch, self._run(Download(fetch, writer, claim, self._clients[registry], repository))
        )
        return fetch, False

    def _follow_worker(self, digest: str, claim: Claim) -> InflightFetch:
        """The fetch that follows another worker's download of `digest` (its claim held by
        that worker, or closed because the final file exists), in the in-flight table now."""
        final_path = self._store.path(digest)
        fetch = InflightFetch(digest, final_path, final_path)
        self._start(fetch, self._follow(fetch, claim))
        return fetch

    def _start(self, fetch: InflightFetch, work: Coroutine[Any, Any, None]) -> None:
        self._inflight[fetch.digest] = fetch
        task = asyncio.create_task(work)
        self._tasks[task] = fetch
        task.add_done_callback(self._forget_task)

    async def _follow(self, fetch: InflightFetch, claim: Claim) -> None:
        """Drive `fetch` from another worker's download: its temp file's size, then its rename."""
        started = False
        try:
            while True:
                try:
                    size = os.stat(fetch.final_path).st_size
                except FileNotFoundError:
                    pass
                else:
                    if not started:
                        fetch.started(size)
                    fetch.advanced(size)
                    fetch.succeeded(fetch.final_path)
                    return
                if claim.closed:
                    raise RegistryError.unavailable("the download of this blob vanished")
                notes = claim.read()
                if not started and "temp" in notes and "size" in notes:
                    fetch.path = self._store.tmp / str(notes["temp"])
                    fetch.started(notes["size"])
                    started = True
                if started and not fetch.verified:
                    with contextlib.suppress(FileNotFoundError):
                        received = os.stat(fetch.path).st_size
                        if received > fetch.received:
                            fetch.advanced(received)
                    if notes.get("verified") and fetch.received == notes.get("size"):
                        fetch.verified_whole()
                if claim.released() and not fetch.final_path.exists():
                    if fetch.verified:
                        return  # served whole, not stored: the readers finish from their files
                    error = claim.read().get("error")
                    if isinstance(error, dict):
                        raise RegistryError(
                            int(error.get("status", 503)),
                            str(error.get("code", "UNAVAILABLE")),
                            str(error.get("message", "upstream fetch failed")),
                        )
                    raise RegistryError.unavailable("the worker downloading this blob stopped")
                await asyncio.sleep(FOLLOW_POLL)
        except asyncio.CancelledError:
            fetch.failed(RegistryError.unavailable("mirror shutting down"))
            raise
        except Exception as exc:
            fetch.failed(exc)
        finally:
            claim.close()
            self._inflight.pop(fetch.digest, None)

    async def close(self) -> None:
        """Stop: downloads already verified are given DRAIN seconds to be stored (their
        clients have every byte; cancelling would throw the transfer away), the others are
        cancelled now."""
        storing = [task for task, fetch in self._tasks.items() if fetch.verified]
        for task, fetch in list(self._tasks.items()):
            if not fetch.verified:
                task.cancel()
        if storing:
            await asyncio.wait(storing, timeout=DRAIN)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _backend_failed(self, error: BaseException) -> None:
        """A download's store or index write failed for a backend outage: misses are refused
        from now until the backend answers (health.py), not downloaded and thrown away."""
        if isinstance(error, BackendUnavailable) and error.outage and self._health is not None:
            self._health.failed(error.backend, error)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    async def _run(self, download: Download) -> None:
        fetch, writer, claim, client = download.parts()
        repository = download.repository
        announce = asyncio.create_task(self._announce_while_queued(download))
        try:
            try:
                if self._cluster is not None:
                    # Claimed before queueing for a slot: the origin must be known for this
                    # replica's clients to be let in (handlers.blob) while it waits.
                    role = await self._take(fetch.digest)
                    download = replace(download, role=role)
                    # A follower's bytes were asked of the upstream as another replica's
                    # client's repository, maybe not this one's: its clients are checked.
                    fetch.origin_decided(fetch.origin if role.held else None)
                async with self._slots[client.registry.name]:
                    announce.cancel()
                    if download.role is None or download.role.held:
                        writer.begin_upload()
                    media_type = await self._download(download)
            finally:
                announce.cancel()
            if download.role is not None and not download.role.held:
                await self._followed(download)
                return
            # Clients get their last byte once the bytes are proven right, not once they are
            # durable: fsync of a large layer can take longer than its download.
            await writer.verify()
            if writer.relaying:  # the disk filled up: the readers got it all, nothing is kept
                log.warning(
                    "disk full while caching blob %s: relayed to its clients, not cached; "
                    "misses are served from upstream without caching for %ds",
                    fetch.digest, self._store.FULL_FOR,
                )  # fmt: skip
                claim.note(error={"status": 503, "code": "UNAVAILABLE", "message": "disk full"})
                fetch.verified_whole()
                writer.discard()
                return
            fetch.verified_whole()
            claim.note(temp=writer.temp_path.name, size=fetch.size, verified=True)
            # The room goes back unless the row lands: a file left without one is counted
            # again when recovery indexes it, an object without one is swept.
            async with self._evictor.reserving(writer.received) as room:
                try:
                    final_path = await writer.commit()
                except Exception as exc:
                    # Verified and being served: only storing it failed (the bucket or the
                    # disk). The readers finish from their open descriptors; nothing was
                    # stored, nothing is indexed, and the next request downloads it again.
                    self._backend_failed(exc)
                    if not self._store.note_if_full(exc):
                        log.warning("blob %s: served, but storing it failed: %s", fetch.digest, exc)
                    claim.note(
                        error={"status": 503, "code": "UNAVAILABLE", "message": "not stored"}
                    )
                    writer.discard()
                    return
                # Index before the fetch leaves the table: a request arriving in between
                # still finds the fetch, one arriving after finds the row; never neither.
                fetch.succeeded(final_path)
                try:
                    await writer.sync_directory()
                    room.settle(
                        await self._index.add_blob(fetch.digest, fetch.received, media_type)
                    )
                    await self._index.add_holder(client.registry.name, repository, fetch.digest)
                except Exception as exc:
                    # The verified file is in place and being served; a missing row is what
                    # recovery repairs (local files) or the bucket sweep removes (an object).
                    # Readers must not be failed for it.
                    self._backend_failed(exc)
                    if isinstance(exc, BackendUnavailable):
                        log.warning(
                            "blob %s: stored, but indexing it failed: %s", fetch.digest, exc
                        )
                    else:
                        log.exception("blob %s: stored, but indexing it failed", fetch.digest)
        except asyncio.CancelledError:
            writer.discard()
            fetch.failed(RegistryError.unavailable("mirror shutting down"))
            raise
        except DigestMismatch as exc:
            DIGEST_MISMATCHES.inc()
            log.error("blob %s from %s: %s; discarded", fetch.digest, client.registry.name, exc)
            writer.discard()
            fetch.failed(exc)
        except Exception as exc:
            if isinstance(exc, RegistryError):
                self._missing.remember(client.registry.name, repository, "blob", fetch.digest, exc)
                claim.note(error={"status": exc.status, "code": exc.code, "message": exc.message})
            elif self._store.note_if_full(exc):
                log.warning(
                    "disk full while caching blob %s: partial file removed; misses are served "
                    "from upstream without caching for %ds", fetch.digest, self._store.FULL_FOR,
                )  # fmt: skip
            else:
                log.warning("blob %s: fetch failed: %r", fetch.digest, exc)
            writer.discard()
            fetch.failed(exc)
        finally:
            claim.close()  # followers see the final file, or the error noted above
            self._inflight.pop(fetch.digest, None)
            INFLIGHT_FETCHES.dec()
            if download.role is not None and download.role.held and self._cluster is not None:
                with contextlib.suppress(BackendUnavailable):
                    await self._cluster[0].release(download.role.key)

    async def _take(self, digest: str) -> ClusterRole:
        """Claim the blob cluster-wide, or learn which replica downloads it (claims.py)."""
        assert self._cluster is not None
        claims = self._cluster[0]
        key = f"blob:{digest}"
        holder = await claims.take(key, claims.peer)
        if holder.owner == claims.owner:
            return ClusterRole(key, True, None)
        return ClusterRole(key, False, holder.peer)

    async def _retake(self, download: Download, failed: BaseException) -> None:
        """The claimant's stream broke: take the claim over once it is stale (the claimant
        died), or follow whoever holds it now; resuming from the bytes already here."""
        assert self._cluster is not None and download.role is not None
        claims = self._cluster[0]
        role = download.role
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STALE_WAIT
        while True:
            holder = await claims.take(role.key, claims.peer)
            if holder.owner == claims.owner:
                log.warning(
                    "blob %s: took the download over from %s at %d bytes (%s)",
                    download.fetch.digest, role.peer, download.writer.received, failed,
                )  # fmt: skip
                role.held, role.peer = True, None
                download.writer.begin_upload()
                return
            if holder.peer != role.peer or loop.time() > deadline:
                role.peer = holder.peer
                return
            await asyncio.sleep(RETAKE_POLL)

    async def _followed(self, download: Download) -> None:
        """The end of a download streamed from the claimant: verified here too, kept as a hot
        copy; the claimant uploads and indexes it (a follower never does: its row could
        come before the object)."""
        fetch, writer = download.fetch, download.writer
        try:
            await writer.verify()
            fetch.verified_whole()
            final_path = await writer.commit_local()
            fetch.succeeded(final_path)
        except DigestMismatch as exc:
            DIGEST_MISMATCHES.inc()
            log.error("blob %s from a peer: %s; discarded", fetch.digest, exc)
            writer.discard()
            fetch.failed(exc)
        except OSError as exc:  # the local copy only: the readers had every byte
            self._store.note_if_full(exc)
            writer.discard()

    async def _announce_while_queued(self, download: Download) -> None:
        """A download waiting for a slot (`max_upstream_fetches`) for QUEUED_HEADERS seconds
        gets its size from an upstream HEAD (free), so its clients get their response headers
        now: containerd gives up on a response without headers after 30 s, and a 503 would
        send it (and Docker) past the mirror to the registry itself. The body follows once the
        download has its slot. Best effort: the download reports any upstream error itself."""
        fetch, writer, claim, client = download.parts()
        repository = download.repository
        await asyncio.sleep(QUEUED_HEADERS)
        try:
            resp = await client.request("HEAD", repository, f"blobs/{fetch.digest}")
            async with resp:
                size = resp.content_length if resp.status == 200 else None
        except (RegistryError, *TRANSIENT_ERRORS):
            return
        if size is not None and fetch.size is None and not writer.received:
            fetch.started(size)
            claim.note(temp=writer.temp_path.name, size=size)

    async def _download(self, download: Download) -> str | None:
        """Fill the temp file, resuming with Range after a cut; return the upstream media type."""
        fetch, writer, claim, client = download.parts()
        repository = download.repository
        media_type: str | None = None
        failures = 0
        peer_failures, peer_progress = 0, -1
        while True:
            headers = {"Range": f"bytes={writer.received}-"} if writer.received else {}
            role = download.role
            from_peer = role is not None and not role.held and role.peer is not None
            try:
                if from_peer:
                    assert role is not None and role.peer is not None and self._cluster
                    resp = await self._cluster[1].get(role.peer, fetch.digest, headers)
                else:
                    resp = await client.request("GET", repository, f"blobs/{fetch.digest}", headers)
                async with resp:
                    if from_peer and resp.status not in (200, 206):
                        raise ConnectionError(f"peer answered {resp.status}")
                    if resp.status not in (200, 206):
                        error = await upstream_error(resp, "blob", fetch.digest)
                        from_cdn = not client.is_registry_host(str(resp.url))
                        # An expired CDN URL, or a 5xx mid-transfer (the client already retried
                        # a 5xx before the first byte), is worth a fresh request and a resume.
                        if (from_cdn and resp.status in CDN_EXPIRED) or (
                            error.status >= 500 and writer.received
                        ):
                            raise ConnectionError(f"upstream answered {resp.status}")
                        raise error
                    skip = _resume_offset(resp, writer.received)
                    if not writer.received:  # the first answer (resumes carry a Range)
                        media_type = resp.headers.get("Content-Type")
                        total = _total_size(resp)
                        if fetch.size is None:
                            fetch.started(total)
                            claim.note(temp=writer.temp_path.name, size=fetch.size)
                        elif total is not None and total != fetch.size:
                            raise DigestMismatch(
                                fetch.digest, f"{total} bytes where a HEAD said {fetch.size}"
                            )
                    # As the socket delivered them: iter_chunked would join the pieces of
                    # each CHUNK into a copy, a cost per byte the download does not need.
                    async for chunk, _ in resp.content.iter_chunks():
                        if skip:
                            cut = min(skip, len(chunk))
                            chunk, skip = chunk[cut:], skip - cut
                            if not chunk:
                                continue
                        rest = writer.write(chunk)
                        if writer.relaying:
                            fetch.relay(writer.on_disk, writer.received - len(rest), rest)
                        if not from_peer:  # a peer's bytes crossed the upstream once, there
                            UPSTREAM_BYTES.inc(len(chunk))
                            cluster = self._cluster
                            if role is not None and cluster and cluster[0].lost(role.key):
                                raise ClaimLost(role.key)
                        if fetch.size is not None and writer.received > fetch.size:
                            raise DigestMismatch(fetch.digest, "more bytes than announced")
                        fetch.advanced(writer.received)
                        if writer.behind:  # the hash's thread lags: memory stays bounded
                            await writer.caught_up()
                if fetch.size is None or writer.received == fetch.size:
                    return media_type
                raise ConnectionError("upstream body ended early")
            except (*TRANSIENT_ERRORS, ConnectionError) as exc:
                if isinstance(exc, ClaimLost):
                    # Another replica took the claim over while this one could not beat
                    # (frozen, cut off): follow it from here instead of downloading twice.
                    assert download.role is not None
                    download.role.held = False
                    writer.cancel_upload()
                    await self._retake(download, exc)
                    continue
                if from_peer:
                    # Not a failure of the upstream's: take over, or follow again. A claimant
                    # alive but unreachable (a wrong secret, a network split) costs the
                    # clients a 503 after a few tries, not a wait without end.
                    peer_failures = 0 if writer.received > peer_progress else peer_failures + 1
                    peer_progress = writer.received
                    if peer_failures > MAX_PEER_FAILURES:
                        raise RegistryError.unavailable(
                            "the replica downloading this blob cannot be reached"
                        ) from exc
                    await self._retake(download, exc)
                    continue
                failures += 1
                UPSTREAM_RESUMES.inc()
                if failures > MAX_RESUMES:
                    raise RegistryError.unavailable("upstream blob transfer kept failing") from exc
                log.info(
                    "blob %s: upstream cut at %d bytes (%s); resuming",
                    fetch.digest,
                    writer.received,
                    type(exc).__name__,
                )
                await asyncio.sleep(RESUME_DELAYS[min(failures, len(RESUME_DELAYS)) - 1])


def _resume_offset(resp: aiohttp.ClientResponse, received: int) -> int:
    """Bytes of this response to drop because we already have them.

    A 206 must start exactly where we stopped; a 200 (the server ignored Range) restarts from
    zero, and the first `received` bytes are skipped rather than written twice.
    """
    if resp.status == 200:
        return received
    content_range = resp.headers.get("Content-Range", "")
    try:
        start = int(content_range.split(" ", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        raise ConnectionError("206 without a usable Content-Range") from None
    if start != received:
        raise ConnectionError(f"206 starts at {start}, expected {received}")
    return 0


def _total_size(resp: aiohttp.ClientResponse) -> int | None:
    if resp.status == 206:
        total = resp.headers.get("Content-Range", "").rpartition("/")[2]
        return int(total) if total.isdigit() else None
    return resp.content_length
