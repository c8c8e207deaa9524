"""ObjectSource.segments (the bucket path): a whole read that fills the hot tier is verified
before its last chunk (hash on a pool thread), also when the copy's disk fails mid-stream
(`rehash()` -> fork); without a copy, whole and ranged reads are relayed as stored."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import random
from pathlib import Path
from typing import Any

import pytest

from mirror.store.blobs import BlobStore, BlobWriter, DigestMismatch
from mirror.store.blobs.bucket import BucketContent, ObjectSource

PIECE = 700_000  # over INLINE: queued for the pool thread


class _Stream:
    def __init__(self, data: bytes) -> None:
        self._pieces = [data[n : n + PIECE] for n in range(0, len(data), PIECE)]
        self.closed = False

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> bytes:
        await asyncio.sleep(0)
        if not self._pieces:
            raise StopAsyncIteration
        return self._pieces.pop(0)

    async def aclose(self) -> None:
        self.closed = True


class _Objects:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.streams: list[_Stream] = []

    async def read(self, digest: str, start: int, stop: int) -> _Stream:
        stream = _Stream(self.data[start:stop])
        self.streams.append(stream)
        return stream


class _FailingCopy(BlobWriter):
    """A hot copy whose disk fails (EIO, not ENOSPC) at the `fail_at`-th write."""

    fail_at = 5

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.writes = 0

    def write(self, chunk: bytes) -> bytes:
        self.writes += 1
        if self.writes == self.fail_at:
            raise OSError(errno.EIO, "I/O error")
        return super().write(chunk)


def _content(tmp_path: Path, stored: bytes, hot_cap: int) -> tuple[BucketContent, _Objects]:
    files = BlobStore(tmp_path)
    files.prepare()
    objects = _Objects(stored)
    return BucketContent(files, objects, hot_cap, redirect=False), objects  # type: ignore[arg-type]


async def _read_all(source: ObjectSource, size: int) -> tuple[bytes, BaseException | None]:
    got = bytearray()
    try:
        async for segment in source.segments(0, size):
            assert isinstance(segment, bytes)
            got += segment
    except DigestMismatch as exc:
        return bytes(got), exc
    return bytes(got), None


@pytest.mark.parametrize("corrupt", [False, True])
@pytest.mark.parametrize("failing_copy", [False, True])
async def test_a_whole_read_filling_the_hot_tier_is_verified_before_its_last_chunk(
    tmp_path: Path, corrupt: bool, failing_copy: bool
) -> None:
    data = random.Random(3).randbytes(9 * PIECE + 123)
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    stored = data[:-1] + b"\x00" if corrupt else data
    content, objects = _content(tmp_path, stored, 1 << 30)
    if failing_copy:
        content.hot_copy = lambda d: _FailingCopy(content.files, d)  # type: ignore[method-assign,assignment]
    source = ObjectSource(content, digest, len(data))
    got, error = await _read_all(source, len(data))
    if corrupt:
        assert isinstance(error, DigestMismatch)
        assert len(got) < len(data)  # the last chunk was held back
        assert not content.files.path(digest).exists()
    else:
        assert error is None and got == data
        kept = content.files.path(digest).exists()
        assert kept == (not failing_copy)
        if kept:
            assert content.files.path(digest).read_bytes() == data
    assert all(stream.closed for stream in objects.streams)
    assert [p.name for p in content.files.tmp.iterdir()] == []


async def test_a_reader_that_leaves_drops_the_hash_and_the_copy(tmp_path: Path) -> None:
    data = random.Random(4).randbytes(30 * PIECE)
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    content, objects = _content(tmp_path, data, 1 << 30)
    source = ObjectSource(content, digest, len(data))
    segments = source.segments(0, len(data))
    await segments.__anext__()
    await segments.__anext__()
    await segments.aclose()  # type: ignore[attr-defined]  # the client left
    assert objects.streams[0].closed
    assert [p.name for p in content.files.tmp.iterdir()] == []
    assert not content.files.path(digest).exists()


async def test_a_ranged_read_is_passed_through(tmp_path: Path) -> None:
    data = random.Random(6).randbytes(4 * PIECE)
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    content, _ = _content(tmp_path, data, 1 << 30)
    source = ObjectSource(content, digest, len(data))
    got = b"".join([s async for s in source.segments(10, 3 * PIECE)])  # type: ignore[misc]
    assert got == data[10 : 3 * PIECE]
    assert not content.files.path(digest).exists()


async def test_a_whole_read_without_a_copy_is_relayed_as_stored_and_not_hashed(
    tmp_path: Path,
) -> None:
    """Tier off: the object's bytes, every one, and no hash made (it was verified before its
    upload completed; the client checks the digest)."""
    data = random.Random(7).randbytes(5 * PIECE + 9)
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    stored = data[:-1] + b"\x00"
    content, objects = _content(tmp_path, stored, 0)

    def no_hash(algorithm: str) -> None:
        raise AssertionError("a relayed read was hashed")

    content.files.stream_hash = no_hash  # type: ignore[method-assign,assignment]
    source = ObjectSource(content, digest, len(data))
    got, error = await _read_all(source, len(data))
    assert error is None and got == stored
    assert all(stream.closed for stream in objects.streams)
    assert not content.files.path(digest).exists()
    assert [p.name for p in content.files.tmp.iterdir()] == []
