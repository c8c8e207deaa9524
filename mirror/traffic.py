"""What was served from where, per hour, kept in the index so the web page's chart and totals
survive restarts.

The figures are the Prometheus counters this process already keeps (bytes served by source,
requests by cache result); a periodic flush adds what grew since the last flush to the current
hour's row. So the hot path pays nothing, every worker adds its own share, and a crash loses at
most one flush interval. Hours are coarse on purpose: a year is 8,760 small rows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from mirror.metrics import REQUESTS, SERVED_BYTES
from mirror.store.index import Index, Traffic

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 10.0
HOUR = 3600
LOCAL = ("hit", "stale", "coalesced")  # answered without a new upstream transfer


def current_totals() -> Traffic:
    """This process's counters since it started, read through prometheus-client's public
    `collect()` (in multiprocess mode a metric object still reports only its own process)."""
    cache = upstream = hits = misses = 0
    for family in SERVED_BYTES.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                source = sample.labels.get("source")
                if source == "cache":
                    cache += int(sample.value)
                elif source == "upstream":
                    upstream += int(sample.value)
    for family in REQUESTS.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            if sample.labels.get("kind") not in ("manifest", "blob"):
                continue
            result = sample.labels.get("result")
            if result in LOCAL:
                hits += int(sample.value)
            elif result == "miss":
                misses += int(sample.value)
    return Traffic(cache, upstream, hits, misses)


def chart_buckets(
    rows: dict[int, Traffic], now_hour: int, count: int, hours_per_bucket: int
) -> list[tuple[int, Traffic]]:
    """The last `count` buckets of `hours_per_bucket` hours, oldest first, ending with the
    one holding `now_hour`; each is (first hour, summed traffic), empty buckets included."""
    last_start = now_hour - now_hour % hours_per_bucket
    buckets: list[tuple[int, Traffic]] = []
    for n in range(count - 1, -1, -1):
        start = last_start - n * hours_per_bucket
        total = Traffic()
        for hour in range(start, start + hours_per_bucket):
            total = total + rows.get(hour, Traffic())
        buckets.append((start, total))
    return buckets


class TrafficRecorder:
    def __init__(
        self,
        index: Index,
        read: Callable[[], Traffic] = current_totals,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._index = index
        self._read = read
        self._clock = clock
        self._flushed = read()  # counters may not start at zero (tests reuse the process)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._periodic())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.flush()

    def hour(self) -> int:
        return int(self._clock()) // HOUR

    async def flush(self) -> None:
        """Add what the counters gained since the last flush to the current hour."""
        async with self._lock:
            now = self._read()
            delta = now - self._flushed
            if delta == Traffic():
                return
            await self._index.add_traffic(self.hour(), delta)
            self._flushed = now

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self.flush()
            except Exception:
                log.exception("recording the traffic history failed")
