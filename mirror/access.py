"""Last-access times, batched: a hit costs a dict write, not a SQLite write.

The evictor flushes before it chooses, so eviction order is exact up to the moment it runs;
a crash loses at most one flush interval of access times, which only makes a few blobs look
older than they are.
"""

from __future__ import annotations

import time

from mirror.store.blobs.base import ContentStore
from mirror.store.index import Index


class AccessTracker:
    def __init__(self, index: Index, content: ContentStore | None = None) -> None:
        self._index = index
        self._content = content
        self._pending: dict[str, float] = {}

    def touch(self, digest: str) -> None:
        self._pending[digest] = time.time()

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        await self._index.touch_many(batch)
        if self._content is not None:
            await self._content.touched(list(batch))
