"""HTTP `Range` request parsing (RFC 9110 section 14), pure.

Registry clients use ranges to resume: Docker sends `bytes=N-` and requires 206, containerd
sends many `bytes=N-`, zstd:chunked podman sends several ranges at once and accepts a full 200.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ByteRange:
    """An inclusive-exclusive byte span [start, end) of a body of known size."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end - 1}/{size}"


class Unsatisfiable(Exception):
    """Every range lies outside the body: the answer is 416 with `Content-Range: bytes */size`."""


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """Return the single range to serve, or None to serve the whole body with 200.

    None is also the answer for forms we ignore (another unit, syntax errors, several ranges):
    RFC 9110 lets a server ignore Range, and a full 200 is what podman accepts for multi-range.
    """
    if not header:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 1:
        return None
    first, dash, last = parts[0].partition("-")
    if not dash:
        return None
    first, last = first.strip(), last.strip()
    if not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable
        return ByteRange(max(0, size - suffix), size)
    start = int(first)
    if start >= size:
        raise Unsatisfiable
    end = size if last == "" else min(int(last) + 1, size)
    if end <= start:
        return None  # last < first: syntactically invalid, ignored
    return ByteRange(start, end)
