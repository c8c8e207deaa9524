"""`_next_piece` (s3.py) on aiohttp's own StreamReader: pieces come out as fed, an HTTP chunk's
end (chunked encoding) is not taken for the end of the body, and the end is b""."""

from __future__ import annotations

import asyncio
from unittest import mock

import aiohttp

from mirror.store.blobs.s3 import _next_piece


async def pieces(reader: aiohttp.StreamReader) -> list[bytes]:
    got = []
    while piece := await _next_piece(reader):
        got.append(piece)
    return got


def reader() -> aiohttp.StreamReader:
    return aiohttp.StreamReader(
        mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop()
    )


async def test_chunk_ends_are_skipped_and_pieces_kept_whole() -> None:
    stream = reader()
    for data in (b"abc", b"", b"defg"):
        stream.begin_http_chunk_receiving()
        if data:
            stream.feed_data(data)
        stream.end_http_chunk_receiving()
    stream.feed_eof()
    assert await pieces(stream) == [b"abc", b"defg"]


async def test_pieces_arriving_later_are_waited_for() -> None:
    stream = reader()

    async def feed() -> None:
        for data in (b"one", b"two"):
            await asyncio.sleep(0.01)
            stream.begin_http_chunk_receiving()
            stream.feed_data(data)
            stream.end_http_chunk_receiving()
        stream.feed_eof()

    feeding = asyncio.create_task(feed())
    assert await pieces(stream) == [b"one", b"two"]
    await feeding


async def test_a_body_without_chunks_comes_as_fed() -> None:
    stream = reader()
    stream.feed_data(b"x" * 10)
    stream.feed_data(b"y" * 5)
    stream.feed_eof()
    assert await pieces(stream) == [b"x" * 10, b"y" * 5]
