"""What a blob response reads from, wherever the bytes are: the serving seam.

A served blob is one of: a verified local file (sent with sendfile), an object in the bucket (a
ranged stream, or a redirect to a presigned URL), or a download in flight (a growing file whose
last byte waits for verification). responses.py sends them all the same way and never asks
which it has: it asks for the size (the headers), whether to redirect, then for the segments of
a byte range, each a slice of an open file (zero copy) or bytes in memory.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import BinaryIO, Literal, Protocol

# Where served bytes came from, for the byte counters: "cache" saved an upstream transfer,
# "upstream" is the download this very request started, "peer" went to another replica of a
# cluster (cluster/peers.py): traffic inside the cluster, neither saved nor fetched.
Origin = Literal["cache", "upstream", "peer"]


@dataclass(frozen=True, slots=True)
class FileSlice:
    """`count` bytes of an open file from `offset`: sent with sendfile where the framing
    allows (a known Content-Length), else read and written in chunks."""

    file: BinaryIO
    offset: int
    count: int


Segment = FileSlice | bytes


class BlobSource(Protocol):
    digest: str
    origin: Origin

    async def size(self) -> int | None:
        """Wait until the headers can go; the blob's size, None if not known yet (a download
        whose upstream sent no length). Raises RegistryError if the blob cannot be served."""
        ...

    async def location(self) -> str | None:
        """A URL the client should fetch the bytes from instead (a presigned bucket URL), or
        None to have them sent on this connection."""
        ...

    def segments(self, start: int, end: int | None) -> AsyncIterator[Segment]:
        """The bytes of [start, end) (end None: to the end, length unknown) in order. The last
        byte of the blob comes only once the blob was verified; an error raised here after the
        headers makes the connection drop (the client sees a short body, never a clean end)."""
        ...

    def close(self) -> None:
        """Release what the source holds open (a file descriptor, a bucket stream)."""
        ...


class FileSource:
    """A verified blob on local disk, opened by the caller before any check it must pass, so
    eviction unlinking the name meanwhile cannot take the bytes away."""

    def __init__(self, digest: str, file: BinaryIO, origin: Origin = "cache") -> None:
        self.digest = digest
        self.origin = origin
        self._file = file
        self._size = os.fstat(file.fileno()).st_size

    async def size(self) -> int:
        return self._size

    async def location(self) -> None:
        return None

    async def segments(self, start: int, end: int | None) -> AsyncIterator[Segment]:
        stop = self._size if end is None else end
        if stop > start:
            yield FileSlice(self._file, start, stop - start)

    def close(self) -> None:
        self._file.close()
