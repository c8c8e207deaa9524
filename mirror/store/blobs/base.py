"""The content seam: verified blobs and manifests by digest, whatever holds them for good.

Two engines: `local.py` (files under the data directory: the embedded default) and
`bucket.py` (objects in S3-compatible storage, with the most used blobs also kept as local
files: the hot tier). Both keep the same local files layout (`BlobStore`), because a download
is always staged in a local temp file: readers of a download in flight follow that file
(sendfile), workers on one machine coalesce through it, and the verify-before-last-byte rule
lives there. What differs is what "stored" means and where a blob not on this disk comes from.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol

from mirror.store.blobs.local import BlobStore, BlobWriter
from mirror.store.index.base import Index
from mirror.store.source import BlobSource


class ContentStore(Protocol):
    files: BlobStore  # local files: the whole store (local), staging and hot tier (bucket)
    name: str  # the engine, for logs, metrics and /readyz: "local", "s3"
    # GETs of stored blobs are answered with a redirect to the engine's own URL, not served
    # from the local files (`s3_redirect`).
    redirects: bool

    def start(
        self, index: Index, primary: bool, generation: Callable[[], int] | None = None
    ) -> None:
        """Begin the engine's own maintenance, if it has any (the bucket's sweep, by the
        primary process only). `generation` reads the machine's shared generation, which
        moves whenever content is removed (shared.py)."""
        ...

    async def ping(self) -> bool:
        """Reachable and writable now; False (never raises) when not."""
        ...

    def writer(self, digest: str) -> BlobWriter:
        """A download's temp file; its `commit` verifies and stores the blob for good."""
        ...

    async def confirm_local(self, digest: str) -> bool:
        """May the local file of `digest` be served? The local engine: always (the file is
        the store). An engine whose local files are copies: only while the shared index still
        lists the blob (another replica may have purged or evicted it)."""
        ...

    async def read(self, digest: str) -> bytes | None:
        """A small stored object (a manifest) whole, verified; None if not stored."""
        ...

    async def put(self, digest: str, data: bytes) -> None:
        """Store a small, already verified object (a manifest) for good."""
        ...

    async def open(self, digest: str, size: int) -> BlobSource | None:
        """A stored blob that is not a local file, as a source to serve; None if this engine
        keeps nothing beyond the local files (then a missing file means a missing blob)."""
        ...

    async def remove(self, digests: list[str]) -> None:
        """Delete these blobs for good (eviction, purge); missing ones are fine."""
        ...

    async def touched(self, digests: list[str]) -> None:
        """These were just served (a batch): an engine with a local tier of its own keeps
        its least recently used order with it."""
        ...

    def listing(self) -> AsyncIterator[tuple[str, int, float]]:
        """Every stored blob: (digest, size, modification time); for recovery and sweeps."""
        ...

    async def abort_stale_uploads(self, older_than: float) -> int:
        """Abort uploads begun more than `older_than` seconds ago and never finished (a
        crashed replica's); how many. Engines that stage in local temp files only: 0."""
        ...

    async def close(self) -> None: ...
