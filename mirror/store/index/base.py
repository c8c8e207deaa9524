"""The index seam: what the cache asks of its metadata store, whatever the engine.

Two engines implement it (`sqlite.py`, the embedded default; `postgres.py`, shared by
replicas), and the same test suite runs against both (tests/integration/test_index_engines.py).
Content (blob files, objects) is the truth for bytes; the index records what is known *about*
them: sizes, media types, which repository a manifest came from, which digest a tag pointed at
when upstream last confirmed it, pins, access times and traffic.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Traffic:
    cache_bytes: int = 0
    upstream_bytes: int = 0
    hits: int = 0
    misses: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(
            self.cache_bytes + other.cache_bytes,
            self.upstream_bytes + other.upstream_bytes,
            self.hits + other.hits,
            self.misses + other.misses,
        )

    def __sub__(self, other: Traffic) -> Traffic:
        return self + Traffic(-other.cache_bytes, -other.upstream_bytes, -other.hits, -other.misses)


@dataclass(frozen=True, slots=True)
class ImageRow:
    """A cached tag as the web page lists it."""

    registry: str
    repository: str
    tag: str
    digest: str
    media_type: str
    last_access: float
    pinned: bool


@dataclass(frozen=True, slots=True)
class TagRow:
    digest: str
    confirmed: float  # wall-clock seconds when upstream last confirmed this mapping


class Index(Protocol):
    """Every query the cache makes; each engine answers them with the same meaning."""

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def get_blob(self, digest: str) -> int | None:
        """The size of an indexed blob, or None."""
        ...

    async def stored(self, digests: list[str]) -> set[str]:
        """Those of `digests` that have a blob row (a bucket sweep asks a listing page at a
        time: one query per thousand objects, not one per object)."""
        ...

    async def add_blob(self, digest: str, size: int, media_type: str | None) -> bool: ...

    async def get_manifest_type(
        self, registry: str, repository: str, digest: str
    ) -> str | None: ...

    async def add_manifest(
        self,
        registry: str,
        repository: str,
        digest: str,
        media_type: str,
        size: int,
        children: list[tuple[str, int]],
    ) -> bool: ...

    async def get_tag(self, registry: str, repository: str, tag: str) -> TagRow | None: ...

    async def set_tag(
        self, registry: str, repository: str, tag: str, digest: str, confirmed: float
    ) -> None: ...

    async def delete_tag(self, registry: str, repository: str, tag: str) -> None: ...

    async def claim_tag(
        self, registry: str, repository: str, tag: str, digest: str, confirmed: float
    ) -> str:
        """Set a tag only if it names nothing yet; the digest it names afterwards (another
        when it was taken: immutable tags, where two pushes may race for one)."""
        ...

    async def list_tags(self, registry: str, repository: str) -> list[str]: ...

    async def touch_many(self, accessed: dict[str, float]) -> None:
        """Record a batch of access times (never moving one backwards)."""
        ...

    async def usage(self) -> tuple[int, int, int]:
        """Bytes indexed, blob count (manifests included), distinct manifests."""
        ...

    async def eviction_candidates(
        self, fresh_since: float, limit: int, unused_before: float | None = None
    ) -> list[tuple[str, int]]:
        """Least recently used first; never pinned content or the manifest of a fresh tag."""
        ...

    async def forget_blobs(self, digests: list[str]) -> int:
        """Delete these blobs' rows and everything recorded about them (manifests, refs, tags,
        holders); the bytes of the blob rows this call deleted. A row already gone counts
        nothing: eviction and background recovery may both drop a row whose file is gone, and
        each subtracts from the usage account only what it returns.
        """
        ...

    async def blobs_in_range(self, low: str, high: str) -> dict[str, int]:
        """Indexed blobs whose digest is in [low, high), by plain byte order of the digest
        string (digest -> size): recovery compares one directory of files with its rows at a
        time. (PostgreSQL: compare with COLLATE "C", or a locale may order digits and letters
        differently.)
        """
        ...

    async def holds(self, registry: str, repository: str, digest: str) -> bool:
        """Is `digest` known to be in this repository: a cached manifest of it (the blob
        itself, or a manifest naming it), or a recorded fetch or upstream confirmation?
        """
        ...

    async def add_holder(self, registry: str, repository: str, digest: str) -> None: ...

    async def closure(self, digest: str) -> dict[str, int]:
        """Every digest a manifest names, recursively (index -> manifests -> config, layers)."""
        ...

    async def referenced_outside(self, digests: set[str]) -> set[str]:
        """Those of `digests` that some manifest outside the set also names."""
        ...

    async def tagged(self, digests: set[str]) -> set[str]:
        """Those of `digests` some cached tag (any repository) names."""
        ...

    async def pin(
        self, registry: str, repository: str, reference: str, digests: set[str]
    ) -> None: ...

    async def unpin(self, registry: str, repository: str, reference: str) -> int: ...

    async def pinned(self) -> set[str]: ...

    async def pinned_by(self, registry: str, digests: list[str]) -> set[str]:
        """Those of `digests` some pin of `registry` names."""
        ...

    async def pinned_bytes(self, registry: str) -> int:
        """Bytes of the distinct blobs pinned under `registry` (the hosted quota's account)."""
        ...

    async def collect_garbage(
        self, registry: str, unused_before: float, dry_run: bool = False
    ) -> list[tuple[str, int]]:
        """Hosted GC's mark, in one transaction: drop the pins of `registry`'s deleted
        manifests (a pin group with no manifest row), then the pins a push made of a blob by
        itself (reference: its digest) that no other pin of that repository names and that
        was not used since `unused_before` (a push touches what it uploads or mounts, so a
        push in progress keeps its blobs); return (digest, size) of those unpinned blobs
        nothing keeps any more: no pin, no manifest of it, none naming it, anywhere. The
        caller removes them. `dry_run`: the same answer, and the transaction rolled back.
        Each DELETE states its whole condition: a manifest put again meanwhile (its row back)
        keeps its pins, whatever was read before."""
        ...

    async def manifests_of(self, registry: str, repository: str) -> list[str]:
        """Digests of the manifests recorded in one repository."""
        ...

    async def delete_manifest(self, registry: str, repository: str, digest: str) -> list[str]:
        """Remove a manifest from one repository with its tags there; the tags removed. Its
        content and its blob row stay (another repository may hold it; hosted GC decides)."""
        ...

    def deleting_in_bulk(self) -> AbstractAsyncContextManager[None]:
        """Around the many `forget_blobs` of one eviction pass: an engine may put off work
        every commit would otherwise repeat (SQLite's WAL checkpoints) until the pass ends."""
        ...

    async def pinned_among(self, digests: list[str]) -> set[str]:
        """Those of `digests` some pin names: an eviction pass asks before each part it
        deletes (a pin may have come since it chose), without queueing behind the writer."""
        ...

    async def repositories(self) -> list[tuple[str, str]]:
        """(registry, repository) of every repository with a cached manifest."""
        ...

    async def images(self) -> list[dict[str, object]]:
        """Every cached tag: registry, repository, tag, digest, media type, last access, pinned."""
        ...

    async def search_images(self, text: str, offset: int, limit: int) -> tuple[int, list[ImageRow]]:
        """Cached tags whose `registry/repository:tag` contains `text` (case-insensitive), one
        page of them in name order, and how many match in all.

        A substring cannot use a B-tree index; the scan is over tags only (one row per tag,
        not per blob), which SQLite does at millions of rows a second.
        """
        ...

    async def blob_row(self, digest: str) -> tuple[int, str, float] | None:
        """Size, media type and last access of an indexed blob."""
        ...

    async def tags_of(self, registry: str, repository: str, digest: str) -> list[str]: ...

    async def is_pinned(self, digest: str) -> bool: ...

    async def tags_sharing(self, child: str, outside: set[str]) -> list[tuple[str, str, str]]:
        """Cached tags (registry, repository, tag) that name `child`, directly or through an
        index, other than tags of the digests `outside`, in name order.
        """
        ...

    async def add_traffic(self, hour: int, delta: Traffic) -> None: ...

    async def traffic_since(self, hour: int) -> dict[int, Traffic]: ...

    async def traffic_total(self) -> Traffic: ...

    async def all_blobs(self) -> dict[str, int]: ...

    async def integrity_ok(self) -> bool: ...
