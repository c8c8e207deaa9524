"""Event notifications: JSON POSTed to configured URLs, retried with backoff, never in the way.

`emit` only appends to a bounded queue per receiver, so a pull never waits for a webhook; one
sender task per receiver delivers in order and retries a failing delivery with exponential
backoff for up to `RETRY_FOR` (a receiver down for a deploy gets everything once it is back).
When a queue is full the oldest event is dropped, and counted, rather than memory growing.

Events (`type`, with `data`): image.cached (a manifest stored for the first time), tag.updated
(a revalidation found a new digest upstream), blob.evicted (size cap, max_age or purge),
upstream.error (an upstream request failed after retries; at most one a minute per registry
and status, with the number left out).

With a `secret`, the body is signed like GitHub's webhooks: `X-Mirror-Signature-256:
sha256=<HMAC-SHA256 of the body, hex>`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aiohttp

from mirror import __version__
from mirror.config import WebhookConfig
from mirror.metrics import WEBHOOK_EVENTS, WEBHOOK_FAILURES

log = logging.getLogger(__name__)

EventSink = Callable[[str, Mapping[str, object]], None]
QUEUE_LIMIT = 10_000
TIMEOUT = 10.0  # one delivery attempt, connect to response
FIRST_RETRY = 1.0
MAX_RETRY_DELAY = 60.0
RETRY_FOR = 3600.0  # then the event is abandoned (and counted)
THROTTLE = 60.0  # seconds between two upstream.error events for the same registry and status


def ignore_event(_type: str, _data: Mapping[str, object]) -> None:
    """The sink of components built without webhooks (tests, the CLI)."""


def retry_delay(attempt: int, jitter: float = 0.1) -> float:
    """Seconds before retry `attempt` (1, 2, ...): doubling from 1 s up to a minute, with
    jitter so receivers coming back are not hit by every mirror at the same instant."""
    base = min(MAX_RETRY_DELAY, FIRST_RETRY * 2.0 ** (attempt - 1))
    return base * (1 + random.uniform(-jitter, jitter))


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def event_body(event_type: str, data: Mapping[str, object], when: float) -> tuple[str, bytes]:
    event_id = str(uuid.uuid4())
    stamp = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
    document = {
        "id": event_id,
        "type": event_type,
        "time": stamp.replace("+00:00", "Z"),
        "source": socket.gethostname(),
        "data": dict(data),
    }
    return event_id, json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


@dataclass(slots=True)
class _Receiver:
    config: WebhookConfig
    queue: deque[tuple[str, str, bytes]] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    busy: bool = False  # an event taken off the queue is being delivered


class Webhooks:
    def __init__(
        self,
        targets: tuple[WebhookConfig, ...],
        *,
        retry_for: float = RETRY_FOR,
        queue_limit: int = QUEUE_LIMIT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._receivers = [_Receiver(t) for t in targets]
        self._retry_for = retry_for
        self._queue_limit = queue_limit
        self._clock = clock
        self._throttled: dict[tuple[str, ...], tuple[float, int]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def enabled(self) -> bool:
        return bool(self._receivers)

    def start(self) -> None:
        if not self._receivers:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=TIMEOUT),
            headers={"User-Agent": f"mirror/{__version__}"},
        )
        self._tasks = [asyncio.create_task(self._deliver(r)) for r in self._receivers]

    async def close(self, drain: float = 2.0) -> None:
        """Give queued events a moment to go out, then stop (the queue lives in memory: what
        is still in it at exit is lost, and a shutdown must not wait on a receiver)."""
        deadline = time.monotonic() + drain
        while any(r.queue or r.busy for r in self._receivers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def emit(self, event_type: str, data: Mapping[str, object]) -> None:
        """Queue an event for every receiver that wants it. Never blocks, never raises."""
        wanted = [r for r in self._receivers if event_type in r.config.events]
        if not wanted:
            return
        if event_type == "upstream.error":
            data = self._throttle(data)
            if not data:
                return
        event_id, body = event_body(event_type, data, self._clock())
        for receiver in wanted:
            if len(receiver.queue) >= self._queue_limit:
                dropped = receiver.queue.popleft()
                WEBHOOK_EVENTS.labels(dropped[0], "dropped").inc()
            receiver.queue.append((event_type, event_id, body))
            receiver.ready.set()

    def _throttle(self, data: Mapping[str, object]) -> Mapping[str, object]:
        """One upstream.error per registry and status a minute; the next one says how many
        were left out. An outage must not turn every pull into a webhook."""
        key = (str(data.get("registry")), str(data.get("status")))
        now = self._clock()
        last, suppressed = self._throttled.get(key, (float("-inf"), 0))
        if now - last < THROTTLE:
            self._throttled[key] = (last, suppressed + 1)
            return {}
        self._throttled[key] = (now, 0)
        return {**data, "suppressed": suppressed}

    async def _deliver(self, receiver: _Receiver) -> None:
        while True:
            while not receiver.queue:
                receiver.ready.clear()
                await receiver.ready.wait()
            event_type, event_id, body = receiver.queue.popleft()
            receiver.busy = True
            try:
                result = await self._send_with_retries(receiver.config, event_type, event_id, body)
            finally:
                receiver.busy = False
            WEBHOOK_EVENTS.labels(event_type, result).inc()

    async def _send_with_retries(
        self, config: WebhookConfig, event_type: str, event_id: str, body: bytes
    ) -> str:
        give_up = time.monotonic() + self._retry_for
        attempt = 0
        while True:
            error = await self._send(config, event_type, event_id, body)
            if error is None:
                return "delivered"
            WEBHOOK_FAILURES.labels(event_type).inc()
            attempt += 1
            delay = retry_delay(attempt)
            if time.monotonic() + delay > give_up:
                log.warning("webhook %s: gave up on event %s: %s", _host(config), event_id, error)
                return "abandoned"
            log.info(
                "webhook %s: delivery of %s failed (%s); retrying in %.0f s",
                _host(config), event_id, error, delay,
            )  # fmt: skip
            await asyncio.sleep(delay)

    async def _send(
        self, config: WebhookConfig, event_type: str, event_id: str, body: bytes
    ) -> str | None:
        """One attempt: None when the receiver answered 2xx, else what went wrong."""
        assert self._session is not None
        headers = {
            "Content-Type": "application/json",
            "X-Mirror-Event": event_type,
            "X-Mirror-Delivery": event_id,
        }
        if config.secret:
            headers["X-Mirror-Signature-256"] = signature(config.secret, body)
        try:
            # No redirects: a POST body must not wander to wherever a Location points.
            async with self._session.post(
                config.url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                if 200 <= resp.status < 300:
                    return None
                return f"answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return type(exc).__name__


def _host(config: WebhookConfig) -> str:
    """A receiver as logs name it: its host only, since URLs often carry tokens."""
    return urlsplit(config.url).netloc.rsplit("@", 1)[-1]
