"""Manifest hits answered below aiohttp: the requests a CI fleet repeats most.

A pull starts with manifest requests (by tag, then by digest). When the answer is in a
worker's memory, building aiohttp's request and response objects, routing and the middleware
chain cost several times the work of the answer itself, and a hit is one small write. So each
connection starts in front of aiohttp's protocol: a complete request head that is a plain
GET or HEAD of a manifest this worker holds in memory is answered right here, with the same
bytes, headers, metrics and access line as the full path. Anything else — a miss, a
conditional or ranged request, a body, `Connection: close`, HTTP/1.0, percent-encoding, a
query other than `ns`, or a client that stops reading its answers (the transport paused
writing) — hands the connection, with every byte received so far, to aiohttp for good;
aiohttp never knows the difference.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from cachetools import LRUCache

from mirror.errors import RegistryError
from mirror.keys import ACCESS, CLIENT_AUTH, CONFIG, RESOLVER, VISIBILITY
from mirror.logs import ACCESS_LOG
from mirror.manifests import Manifest
from mirror.mediatypes import parse_accept
from mirror.metrics import observers
from mirror.reference import HOSTED, Endpoint, parse_v2_path
from mirror.responses import manifest_headers

MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 30.0  # seconds a client may take to send one request head (slowloris)
# Headers whose presence means the request needs the full HTTP machinery.
_DELEGATE = frozenset(
    (b"if-none-match", b"if-match", b"range", b"content-length", b"transfer-encoding",
     b"expect", b"upgrade", b"authorization")
)  # fmt: skip

_ACCESS = logging.getLogger("aiohttp.access")  # the logger aiohttp's own access lines use

# Pure and small: a hit path sees the same few thousand paths over and over.
_route = functools.lru_cache(maxsize=8192)(parse_v2_path)


class HitAnswers:
    """Builds the response to a request head, or None when the full path must answer it."""

    def __init__(self, app: web.Application) -> None:
        self._resolver = app[RESOLVER]
        self._visibility = app[VISIBILITY]
        # Requests without credentials may be answered here only if they may proceed at all.
        self._open = app[CLIENT_AUTH].anonymous_allowed
        self._access = app[ACCESS]
        self._names = app[CONFIG].registry_names
        self._hosted = app[CONFIG].hosted_names
        self._second = -1
        self._date = b""
        self._blocks: LRUCache[tuple[str, str], bytes] = LRUCache(16_384)

    def _http_date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._date = email.utils.formatdate(now, usegmt=True).encode()
        return self._date

    def _header_block(self, manifest: Manifest) -> bytes:
        """The status line and `manifest_headers` as bytes, built once per manifest (the
        digest fixes the bytes, so digest and type are the whole key; no body is kept)."""
        key = (manifest.digest, manifest.media_type)
        block = self._blocks.get(key)
        if block is None:
            pairs = manifest_headers(manifest).items()
            text = "HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in pairs)
            block = self._blocks[key] = text.encode("latin-1")
        return block

    def answer(self, head: bytes, remote: str) -> bytes | None:
        if not self._open:
            return None
        started = time.perf_counter()
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD") or parts[2] != b"HTTP/1.1":
            return None
        method, target = parts[0].decode(), parts[1]
        if not target.startswith(b"/v2/") or b"/manifests/" not in target or b"%" in target:
            return None
        path, _, query = target.decode("ascii", "replace").partition("?")
        ns = None
        if query:
            key, _, ns = query.partition("=")
            if key != "ns" or "&" in ns or not ns:
                return None
        accept: list[str] = []
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(b":")
            if not sep:
                return None
            name = name.strip().lower()
            if name in _DELEGATE:
                return None
            if name == b"connection" and b"close" in value.lower():
                return None
            if name == b"accept":
                accept.append(value.strip().decode("latin-1"))
        try:
            route = _route(path[4:], ns, self._names, self._hosted)
        except RegistryError:
            return None
        # Hosted repositories have pull rules of their own (hosted/access.py): the full path.
        if (
            route.registry == HOSTED
            or route.endpoint is not Endpoint.MANIFEST
            or not self._visibility.known_public(route.registry, route.repository)
        ):
            return None
        manifest = self._resolver.served_from_memory(route, parse_accept(tuple(accept)))
        if manifest is None:
            return None
        self._access.touch(manifest.digest)
        response = b"".join((
            self._header_block(manifest), b"X-Mirror-Cache: hit\r\nDate: ",
            self._http_date(), b"\r\n\r\n", manifest.data if method == "GET" else b"",
        ))  # fmt: skip
        elapsed = time.perf_counter() - started
        counter, duration = observers("manifest", method, "hit")
        counter.inc()
        duration.observe(elapsed)
        ACCESS_LOG.request(_ACCESS, remote, method, path, 200, len(response), elapsed, "hit")
        return response


def _may_be_read(buffer: bytes) -> bool:
    """Could this be the start of a GET or HEAD request line?"""
    head = buffer[:5]
    return b"GET ".startswith(head[:4]) or b"HEAD ".startswith(head)


class HitPathProtocol(asyncio.Protocol):
    """Answers memory hits itself until the first request it cannot; then aiohttp has it all."""

    def __init__(self, inner: RequestHandler, answers: HitAnswers) -> None:
        self._inner = inner
        self._answers = answers
        self._buffer = b""
        self._delegated = False
        self._transport: asyncio.Transport | None = None
        self._remote = "-"
        self._head_timer: asyncio.TimerHandle | None = None
        self._writing_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self._remote = str(peer[0]) if isinstance(peer, tuple) else "-"
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._delegated:
            self._inner.data_received(data)
            return
        buffer = self._buffer + data
        while buffer:
            if not _may_be_read(buffer):
                break  # not a GET/HEAD (or not HTTP at all, e.g. a TLS hello): aiohttp answers
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    break
                self._buffer = buffer
                if self._head_timer is None:  # a head has begun: it must end in time
                    self._head_timer = asyncio.get_running_loop().call_later(
                        HEAD_TIMEOUT, self._too_slow
                    )
                return
            self._cancel_head_timer()
            if self._writing_paused:
                # The client is not reading what it asked for: answers would pile up in memory
                # (a few request bytes each buy a whole manifest). aiohttp answers the rest,
                # one at a time, waiting for the client to drain each.
                break
            response = self._answers.answer(buffer[:end], self._remote)
            if response is None:
                break
            assert self._transport is not None
            self._transport.write(response)
            buffer = buffer[end + 4 :]
            self._keep_alive()
        else:
            self._buffer = b""
            return
        self._delegated = True
        self._cancel_head_timer()
        self._buffer = b""
        self._inner.data_received(buffer)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_slow(self) -> None:
        """A client that dribbles a request head holds a connection and memory for nothing."""
        self._head_timer = None
        if self._transport is not None and not self._delegated:
            self._transport.close()

    def _keep_alive(self) -> None:
        """aiohttp closes a connection that sent it nothing for its keep-alive timeout; these
        requests count as traffic."""
        inner: Any = self._inner
        timeout = getattr(inner, "_keepalive_timeout", 0)
        if timeout and hasattr(inner, "_next_keepalive_close_time"):
            inner._next_keepalive_close_time = asyncio.get_running_loop().time() + timeout

    def eof_received(self) -> bool | None:
        self._inner.eof_received()
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._inner.resume_writing()


def hit_path_factory(app: web.Application, server: web.Server) -> Callable[[], asyncio.Protocol]:
    answers = HitAnswers(app)
    return lambda: HitPathProtocol(server(), answers)
