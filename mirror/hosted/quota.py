"""The hosted quota (`hosted_max_size`): bytes of hosted content, counted once per digest,
plus what pushes in progress have reserved, never past the cap.

The index counts what is stored and pinned (`pinned_bytes`); a push reserves its bytes before
it stores them and gives the reservation back once the index counts them. Reservations are a
number in a file under a lock, shared by the machine's workers, so concurrent pushes (in any
worker) cannot all fit in the same room. Upload sessions' bytes count too: a session cannot
grow past what is left (uploads.py). The file is reset at start (no push is in progress
then). Replicas of a cluster each reserve on their own disk: together they may pass the cap
by what is in flight at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from mirror.hosted.uploads import quota_exceeded
from mirror.metrics import HOSTED_BYTES
from mirror.reference import HOSTED
from mirror.shared import FileLock
from mirror.store.index import Index

RESERVATIONS = "hosted-reserved"  # the file under the data directory


class HostedQuota:
    def __init__(self, index: Index, max_size: int, path: Path) -> None:
        self._index = index
        self.max_size = max_size
        self._path = path
        self._lock = FileLock(path.with_name(path.name + ".lock"))

    @staticmethod
    def reset(path: Path) -> None:
        """At start, before any worker serves: reservations of a previous run are void."""
        path.write_text("0")

    def _reserved(self) -> int:
        try:
            text = self._path.read_text().strip()
        except FileNotFoundError:
            return 0
        return int(text) if text.isdigit() else 0

    async def room(self) -> int:
        """Bytes left for new content."""
        used = await self._index.pinned_bytes(HOSTED)
        HOSTED_BYTES.set(used)
        return max(0, self.max_size - used - self._reserved())

    @contextlib.asynccontextmanager
    async def reserved(self, digests: dict[str, int]) -> AsyncIterator[None]:
        """Hold room for these digests (digest -> size) while they are stored and pinned;
        those hosted content already holds need none. DENIED when they do not fit."""
        size = 0
        async with self._lock.hold():
            if digests:
                known = await self._index.pinned_by(HOSTED, list(digests))
                size = sum(n for d, n in digests.items() if d not in known)
            if size and size > await self.room():
                raise quota_exceeded()
            self._path.write_text(str(self._reserved() + size))
        try:
            yield
        finally:
            if size:
                async with self._lock.hold():
                    self._path.write_text(str(max(0, self._reserved() - size)))
