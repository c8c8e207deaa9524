"""One execution per key at a time, shared by every caller that asks meanwhile.

Used for token requests (one per credential and scope) and manifest fetches (one per
reference). The shared work runs in its own task: a caller that goes away (client disconnect)
does not cancel what the others wait for. Blobs have their own, richer table in fetch.py
because their readers consume a growing file rather than a finished value.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._calls: dict[K, asyncio.Task[V]] = {}

    async def do(self, key: K, work: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """Run `work` for `key` unless it already runs; return its value and whether it was shared.

        The shared work is shielded: a caller that is cancelled leaves it running for the rest.
        """
        task = self._calls.get(key)
        shared = task is not None
        if task is None:
            task = asyncio.ensure_future(work())
            self._calls[key] = task
            task.add_done_callback(lambda t, k=key: self._finished(k, t))  # type: ignore[misc]
        return await asyncio.shield(task), shared

    def _finished(self, key: K, task: asyncio.Task[V]) -> None:
        if self._calls.get(key) is task:
            del self._calls[key]
        if not task.cancelled():
            task.exception()  # retrieved here so a failure nobody awaited is not logged as lost

    def __len__(self) -> int:
        return len(self._calls)

    async def close(self) -> None:
        tasks = list(self._calls.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
