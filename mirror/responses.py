"""Registry responses: manifest bytes, and blob bodies from any source (store/source.py).

aiohttp's FileResponse is not used for blobs: it answers 416 to multi-range requests (podman
accepts a full 200 there) and sets an mtime ETag, where a registry's ETag is the digest.
Bodies go out with `os.sendfile` (zero copy) driven by the event loop in both cases (see
`_sendfile`); the headers were already handed to the transport by `StreamResponse.prepare`, and
leave its buffer before the file bytes follow them on the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import BinaryIO, cast

from aiohttp import web

from mirror.errors import RegistryError
from mirror.httprange import ByteRange, Unsatisfiable, parse_range
from mirror.keys import STARTED
from mirror.manifests import Manifest
from mirror.mediatypes import content_type_of, is_media_type
from mirror.metrics import SAVED_BYTES, SERVED_BYTES
from mirror.store.source import BlobSource, FileSlice

BLOB_CONTENT_TYPE = "application/octet-stream"
FALLBACK_CHUNK = 64 * 1024


def _etag_matches(request: web.BaseRequest, digest: str) -> bool:
    header = request.headers.get("If-None-Match")
    if not header:
        return False
    candidates = {c.strip().removeprefix("W/").strip('"') for c in header.split(",")}
    return digest in candidates or "*" in candidates


def manifest_headers(manifest: Manifest) -> dict[str, str]:
    """The registry headers of a manifest answer, for the full path and the hit path alike
    (hitpath.py writes these very pairs), so a header rule lives in one place.

    The media type was checked against the `type/subtype` grammar when it was stored; it is
    checked again here because it goes into a response head, where a CR/LF would inject.
    """
    media_type = manifest.media_type
    if not is_media_type(media_type):
        media_type = content_type_of(manifest.data, None)
    return {
        "Content-Type": media_type,
        "Content-Length": str(len(manifest.data)),
        "Docker-Content-Digest": manifest.digest,
        "ETag": f'"{manifest.digest}"',
    }


def manifest_response(request: web.BaseRequest, manifest: Manifest) -> web.Response:
    """Exact bytes; Content-Type is the stored media type; HEAD carries the same headers."""
    headers = manifest_headers(manifest)
    if _etag_matches(request, manifest.digest):
        del headers["Content-Length"]
        return web.Response(status=304, headers=headers)
    return web.Response(body=manifest.data, headers=headers)


async def begin_body(request: web.Request, resp: web.StreamResponse) -> None:
    """Send the headers; from here on an error can only drop the connection."""
    request[STARTED] = True
    await resp.prepare(request)


def _plan(request: web.Request, size: int | None) -> ByteRange | None:
    if size is None:
        return None  # length unknown yet: ranges cannot be honoured, a full 200 can
    try:
        return parse_range(request.headers.get("Range"), size)
    except Unsatisfiable:
        raise RegistryError.range_invalid(size) from None


def _blob_response(digest: str, size: int | None, rng: ByteRange | None) -> web.StreamResponse:
    resp = web.StreamResponse(status=206 if rng else 200)
    resp.headers["Content-Type"] = BLOB_CONTENT_TYPE
    resp.headers["Docker-Content-Digest"] = digest
    resp.headers["ETag"] = f'"{digest}"'
    resp.headers["Accept-Ranges"] = "bytes"
    if rng is not None and size is not None:
        resp.headers["Content-Range"] = rng.content_range(size)
        resp.content_length = rng.length
    elif size is not None:
        resp.content_length = size
    return resp


def _count(source: str, sent: int) -> None:
    SERVED_BYTES.labels(source).inc(sent)
    if source == "cache":
        SAVED_BYTES.inc(sent)


async def _send(
    request: web.Request,
    resp: web.StreamResponse,
    f: BinaryIO,
    offset: int,
    count: int,
    raw: bool,
    source: str,
) -> None:
    """Send `count` bytes of `f` from `offset`: sendfile when the framing allows (known length).

    `source` says where the bytes came from for the byte counters: "cache" for disk and for
    another client's download, "upstream" for the download this request started.
    """
    if raw:
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("client went away")
        try:
            await _sendfile(transport, f, offset, count, source)
            return
        except NotImplementedError:
            pass  # TLS: the bytes must go through the transport
    transport = request.transport
    if transport is not None:
        # uvloop's TLS transport buffers up to 512 KiB of a client that does not read before
        # it pushes back, on top of the socket's; a stalled reader then holds over 1 MiB.
        cast(asyncio.WriteTransport, transport).set_write_buffer_limits(high=FALLBACK_CHUNK)
    fd = f.fileno()
    while count > 0:
        chunk = os.pread(fd, min(FALLBACK_CHUNK, count), offset)
        if not chunk:
            raise ConnectionResetError("file shorter than expected")
        await _write(resp, chunk)
        _count(source, len(chunk))
        offset += len(chunk)
        count -= len(chunk)


SENDFILE_SLICE = 1024 * 1024  # per call, so one fast client cannot hold the loop for long
READAHEAD = 2 * SENDFILE_SLICE  # asked of the disk ahead of the slice being sent
SLOW_CLIENT = 120.0  # seconds a client may go without accepting a byte before it is dropped
WAKE = 1.0  # seconds between looks at whether the loop closed the connection meanwhile


async def _write(resp: web.StreamResponse, data: bytes) -> None:
    """`resp.write`, but a client that stops reading is dropped after SLOW_CLIENT seconds
    instead of holding its coroutine, buffers and descriptors forever."""
    async with asyncio.timeout(SLOW_CLIENT):
        await resp.write(data)


async def _sendfile(
    transport: asyncio.BaseTransport, f: BinaryIO, offset: int, count: int, source: str
) -> None:
    """Zero-copy, driven by the event loop: `os.sendfile` on a non-blocking socket, the loop
    telling when the client can take more. (uvloop has no `loop.sendfile`; asyncio's has no
    bound on a client that stops reading. One path for both.)

    On our own `dup()` of the socket, never on the transport's descriptor number: the loop
    closes that number the moment the client resets or half-closes, and the kernel hands it to
    the next accepted connection; a send through the stale number would put this client's
    blob on someone else's connection. The dup names this client's socket until we close it,
    whatever the loop does meanwhile. No thread either: a stalled reader would park a pool
    thread (the pool also runs fsync and bcrypt) for as long as it stalls.
    """
    sock = transport.get_extra_info("socket")
    if sock is None or transport.get_extra_info("sslcontext") is not None:
        raise NotImplementedError
    if transport.is_closing():
        raise ConnectionResetError("client went away")
    loop = asyncio.get_running_loop()
    # Taken on the loop's thread while the transport is open: the number is still this client's.
    out = os.dup(sock.fileno())
    try:
        writer = cast(asyncio.WriteTransport, transport)  # uvloop's does not subclass it
        # StreamResponse.prepare wrote the headers to the transport; they must leave its
        # buffer before any body byte goes around it.
        while writer.get_write_buffer_size():
            await _writable(loop, out, transport)
            await asyncio.sleep(0)  # the transport flushes on the same wake-up
        src = f.fileno()
        advised = offset  # the page cache is being filled up to here
        while count > 0:
            if offset + SENDFILE_SLICE > advised:
                advised = _read_ahead(src, offset, count)
            try:
                sent = os.sendfile(out, src, offset, min(count, SENDFILE_SLICE))
            except BlockingIOError:
                await _writable(loop, out, transport)
                continue
            if sent == 0:
                raise ConnectionResetError("file shorter than expected")
            _count(source, sent)
            offset += sent
            count -= sent
            if count:
                await asyncio.sleep(0)  # let other connections have the loop between slices
            if transport.is_closing():
                raise ConnectionResetError("client went away")
    finally:
        os.close(out)


def _read_ahead(src: int, offset: int, count: int) -> int:
    """Ask the kernel to read the next READAHEAD bytes into the page cache, asynchronously;
    return where that ends. sendfile on the loop's thread then copies from memory: a blob not
    in the page cache would otherwise stall every connection of the worker for each disk read
    (the socket is non-blocking, the file is not)."""
    end = offset + min(count, READAHEAD)
    with contextlib.suppress(OSError):
        os.posix_fadvise(src, offset, end - offset, os.POSIX_FADV_WILLNEED)
    return end


async def _writable(
    loop: asyncio.AbstractEventLoop, fd: int, transport: asyncio.BaseTransport
) -> None:
    """Wait until `fd` can take bytes; raise if the client stops reading for SLOW_CLIENT
    seconds or the loop closes its connection meanwhile (checked every WAKE seconds)."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        deadline = loop.time() + SLOW_CLIENT
        while not ready.done():
            if transport.is_closing():
                raise ConnectionResetError("client went away")
            left = deadline - loop.time()
            if left <= 0:
                raise ConnectionResetError("client stopped reading")
            await asyncio.wait((ready,), timeout=min(WAKE, left))
    finally:
        loop.remove_writer(fd)


async def send_uncached_blob(
    request: web.Request, digest: str, size: int | None, chunks: AsyncIterator[bytes]
) -> web.StreamResponse:
    """A blob relayed from upstream without caching (disk full): whole, 200, last byte only
    after verification (a mismatch drops the connection, as for any fill)."""
    resp = _blob_response(digest, size, None)
    await begin_body(request, resp)
    if request.method != "HEAD":
        async for chunk in chunks:
            await _write(resp, chunk)
            _count("upstream", len(chunk))
    await resp.write_eof()
    return resp


async def send_blob_head(request: web.Request, digest: str, size: int) -> web.StreamResponse:
    resp = _blob_response(digest, size, None)
    await begin_body(request, resp)
    await resp.write_eof()
    return resp


async def send_blob(request: web.Request, source: BlobSource) -> web.StreamResponse:
    """Serve a blob from any source (store/source.py), whole or ranged, or redirect to it.

    Headers go out as soon as the source knows the size (for a download: as soon as the
    upstream's did; containerd gives up after 30 s without them). If the source fails after
    that, the exception makes aiohttp drop the connection: the client sees a short body, never
    a clean end of wrong bytes. The ETag is the digest, so an If-None-Match naming it is
    answered 304 whatever the source (content by digest never changes).
    """
    size = await source.size()
    digest = source.digest
    location = await source.location() if request.method == "GET" else None
    if location is not None:
        headers = {"Location": location, "Docker-Content-Digest": digest}
        return web.Response(status=307, headers=headers)
    rng = _plan(request, size)
    if _etag_matches(request, digest) and rng is None:
        return web.Response(
            status=304, headers={"ETag": f'"{digest}"', "Docker-Content-Digest": digest}
        )
    resp = _blob_response(digest, size, rng)
    await begin_body(request, resp)
    if request.method != "HEAD":
        start, end = (rng.start, rng.end) if rng else (0, size)
        async for segment in source.segments(start, end):
            if isinstance(segment, FileSlice):
                await _send(
                    request, resp, segment.file, segment.offset, segment.count,
                    size is not None, source.origin,
                )  # fmt: skip
            else:
                await _write(resp, segment)
                _count(source.origin, len(segment))
    await resp.write_eof()
    return resp
