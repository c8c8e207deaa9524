"""`mirror prefetch`: pull images through a running mirror so later pulls are local.

It is an ordinary client of the mirror's registry API: the mirror does the fetching, the
coalescing and the caching. The mirror's `X-Mirror-Cache` header tells which bytes were
already cached and which crossed the internet now.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

import aiohttp

from mirror.errors import RegistryError
from mirror.mediatypes import INDEX_TYPES, MANIFEST_TYPES, references
from mirror.reference import parse_image

ACCEPT = ", ".join(MANIFEST_TYPES)


@dataclass
class PrefetchResult:
    image: str
    digest: str = ""
    blobs: int = 0
    total_bytes: int = 0
    fetched_bytes: int = 0  # crossed the internet for this prefetch
    cached_bytes: int = 0  # was already in the mirror
    platforms: list[str] = field(default_factory=list)
    error: str = ""


class Progress:
    """One line per image, redrawn in place on a terminal, printed at the end otherwise."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._tty = out.isatty()
        self._last = 0.0

    def update(self, label: str, done: int, total: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and (not self._tty or now - self._last < 0.1):
            return
        self._last = now
        width = 30
        filled = int(width * done / total) if total else width
        bar = "#" * filled + "." * (width - filled)
        line = f"{label} [{bar}] {human_bytes(done)}/{human_bytes(total)}"
        if self._tty:
            self._out.write("\r" + line + ("\n" if final else ""))
        elif final:
            self._out.write(line + "\n")
        self._out.flush()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


async def _manifest(
    session: aiohttp.ClientSession, base: str, name: str, ref: str, ns: str
) -> tuple[str, bytes, str]:
    params = {"ns": ns}
    async with session.get(
        f"{base}/v2/{name}/manifests/{ref}", headers={"Accept": ACCEPT}, params=params
    ) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise RuntimeError(_error_text(resp.status, body))
        return (
            resp.headers.get("Content-Type", ""),
            body,
            resp.headers.get("Docker-Content-Digest", ""),
        )


def _error_text(status: int, body: bytes) -> str:
    try:
        error = json.loads(body)["errors"][0]
        return f"{status} {error['code']}: {error['message']}"
    except (ValueError, KeyError, IndexError, TypeError):
        return f"HTTP {status}"


async def prefetch_image(
    session: aiohttp.ClientSession,
    base: str,
    image: str,
    platform: str | None,
    progress: Callable[[int, int], None],
) -> PrefetchResult:
    """Pull one image (every platform, or one) through the mirror, discarding the bytes."""
    result = PrefetchResult(image)
    ns, name, ref = parse_image(image, None)
    media_type, body, result.digest = await _manifest(session, base, name, ref, ns)
    manifests = [(media_type, body)]
    if media_type in INDEX_TYPES:
        manifests = []
        for entry in json.loads(body).get("manifests", []):
            plat = entry.get("platform") or {}
            label = "/".join(
                p for p in (plat.get("os"), plat.get("architecture"), plat.get("variant")) if p
            )
            if platform and not (label == platform or label.startswith(platform + "/")):
                continue
            child_type, child, _ = await _manifest(session, base, name, entry["digest"], ns)
            manifests.append((child_type, child))
            result.platforms.append(label)
        if platform and not manifests:
            raise RuntimeError(f"no {platform} image in this index")
    blobs: dict[str, int] = {}
    for _, data in manifests:
        blobs.update(references(data))
    total = sum(blobs.values())
    done = 0
    params = {"ns": ns}
    for digest in blobs:
        async with session.get(f"{base}/v2/{name}/blobs/{digest}", params=params) as resp:
            if resp.status != 200:
                raise RuntimeError(f"blob {digest}: {_error_text(resp.status, await resp.read())}")
            cached = resp.headers.get("X-Mirror-Cache") == "hit"
            size = 0
            async for chunk in resp.content.iter_chunked(1 << 20):
                size += len(chunk)
                done += len(chunk)
                progress(done, total)
        result.blobs += 1
        result.total_bytes += size
        if cached:
            result.cached_bytes += size
        else:
            result.fetched_bytes += size
    return result


async def prefetch(
    server: str, images: list[str], platform: str | None, out: TextIO = sys.stderr
) -> list[PrefetchResult]:
    bar = Progress(out)
    results: list[PrefetchResult] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        for image in images:
            last = [0, 0]

            def report(done: int, total: int, image: str = image, last: list[int] = last) -> None:
                last[:] = [done, total]
                bar.update(image, done, total)

            try:
                result = await prefetch_image(session, server.rstrip("/"), image, platform, report)
            except (RuntimeError, RegistryError, aiohttp.ClientError, ValueError, KeyError) as exc:
                result = PrefetchResult(image, error=str(exc) or type(exc).__name__)
            bar.update(
                image, last[0] or result.total_bytes, last[1] or result.total_bytes, final=True
            )
            results.append(result)
    return results
