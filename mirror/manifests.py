"""Manifests: tag -> digest resolution, freshness, revalidation with HEAD, stale-if-error.

Rate-limit arithmetic drives the design: on Docker Hub a manifest GET counts against the pull
limit and a HEAD does not. So a tag within `tag_ttl` costs nothing upstream, an expired tag
costs one HEAD (and one GET by digest only if it moved), a manifest by digest is immutable and
never asked again, and N simultaneous clients share one upstream exchange, in one worker
(single-flight) and across workers (a lock file per manifest, then a second look at the index).

Hits never touch SQLite: manifest bytes by digest and fresh tag -> digest mappings are kept in
bounded memory caches (per repository, like the index). Manifests by digest are immutable, so
the only thing that can make an entry wrong is deletion (eviction, purge): any worker that
deletes moves the shared generation, and every worker drops its caches when it sees that.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import aiohttp
from cachetools import LRUCache

from mirror.cluster.claims import Claims
from mirror.errors import RegistryError
from mirror.evict import Evictor
from mirror.mediatypes import (
    MAX_MANIFEST_BYTES,
    Negotiation,
    content_type_of,
    negotiate,
    platform_child,
    references,
    upstream_accept,
)
from mirror.metrics import COALESCED, DIGEST_MISMATCHES, UPSTREAM_BYTES
from mirror.missing import MissingCache
from mirror.reference import Route, validate_digest
from mirror.shared import SharedState, keyed_lock
from mirror.singleflight import SingleFlight
from mirror.store.blobs import digest_of
from mirror.store.blobs.base import ContentStore
from mirror.store.index import Index, TagRow
from mirror.upstream.client import (
    TRANSIENT_ERRORS,
    RegistryClient,
    is_transient,
    status_error,
    upstream_error,
)
from mirror.webhooks import EventSink, ignore_event

Result = Literal["hit", "miss", "stale", "coalesced"]


@dataclass(frozen=True, slots=True)
class Manifest:
    digest: str
    media_type: str
    data: bytes


FlightKey = tuple[str, str, str]  # registry, repository, tag or digest
MEMORY_BYTES = 64 * 1024 * 1024  # manifest bytes kept in memory per worker
MEMORY_TAGS = 100_000


def _manifest_size(manifest: Manifest) -> int:
    return len(manifest.data) + 256


class ManifestResolver:
    def __init__(
        self,
        index: Index,
        content: ContentStore,
        clients: Mapping[str, RegistryClient],
        missing: MissingCache,
        evictor: Evictor,
        shared: SharedState,
        clock: Callable[[], float] = time.time,
        events: EventSink = ignore_event,
        claims: Claims | None = None,
    ) -> None:
        self._claims = claims
        self._index = index
        self._events = events
        self._shared = shared
        self._generation = shared.generation
        self._memory: LRUCache[FlightKey, Manifest] = LRUCache(MEMORY_BYTES, _manifest_size)
        self._fresh: LRUCache[FlightKey, tuple[str, float]] = LRUCache(MEMORY_TAGS)
        self._evictor = evictor
        self._missing = missing
        self._content = content
        self._store = content.files
        self._clients = clients
        self._clock = clock
        self._tags: SingleFlight[FlightKey, tuple[Manifest, Result]] = SingleFlight()
        self._digests: SingleFlight[FlightKey, Manifest] = SingleFlight()

    async def close(self) -> None:
        await self._tags.close()
        await self._digests.close()

    async def for_client(
        self, route: Route, client_types: frozenset[str]
    ) -> tuple[Manifest, Result]:
        """The manifest to serve for a request, negotiated against the client's Accept list."""
        manifest, result = await self.resolve(
            route.registry, route.repository, route.reference, client_types
        )
        decision = negotiate(manifest.media_type, client_types, by_tag=not route.is_digest)
        if decision is Negotiation.DEFAULT_PLATFORM:
            child = platform_child(manifest.data)
            if child is None:
                raise RegistryError.manifest_unknown(
                    route.reference, "manifest list has no linux/amd64 image for this client"
                )
            manifest, _ = await self.resolve(route.registry, route.repository, child, client_types)
            decision = negotiate(manifest.media_type, client_types, by_tag=False)
        if decision is not Negotiation.SERVE:
            raise RegistryError.manifest_unknown(
                route.reference,
                f"{manifest.media_type} found, but the Accept header does not allow it",
            )
        return manifest, result

    async def resolve(
        self, registry: str, repository: str, reference: str, client_types: frozenset[str]
    ) -> tuple[Manifest, Result]:
        accept = upstream_accept(client_types)
        found = self.from_memory(registry, repository, reference)
        if found is not None:
            return found, "hit"
        if ":" in reference:
            cached = await self._cached(registry, repository, reference)
        else:
            cached = await self._fresh_tag(registry, repository, reference)
        if cached is not None:
            return cached, "hit"
        self._missing.check(registry, repository, "manifest", reference)
        result: Result = "miss"
        try:
            if ":" in reference:
                manifest, shared = await self._by_digest(registry, repository, reference, accept)
            else:
                (manifest, result), shared = await self._tags.do(
                    (registry, repository, reference),
                    lambda: self._locked_refresh(registry, repository, reference, accept),
                )
        except RegistryError as exc:
            self._missing.remember(registry, repository, "manifest", reference, exc)
            raise
        if shared:
            COALESCED.inc()
            result = "coalesced"
        return manifest, result

    def from_memory(self, registry: str, repository: str, reference: str) -> Manifest | None:
        """A manifest by digest, or by a fresh tag, without any I/O: the hit path."""
        if self._shared.generation != self._generation:
            self._generation = self._shared.generation
            self._memory.clear()
            self._fresh.clear()
        if ":" not in reference:
            known = self._fresh.get((registry, repository, reference))
            ttl = self._clients[registry].registry.tag_ttl
            if known is None or self._clock() - known[1] >= ttl:
                return None
            reference = known[0]
        return self._memory.get((registry, repository, reference))

    def served_from_memory(self, route: Route, client_types: frozenset[str]) -> Manifest | None:
        """What `for_client` would answer, if it is in memory and needs no platform pick."""
        manifest = self.from_memory(route.registry, route.repository, route.reference)
        if manifest is None:
            return None
        decision = negotiate(manifest.media_type, client_types, by_tag=not route.is_digest)
        return manifest if decision is Negotiation.SERVE else None

    async def _cached(self, registry: str, repository: str, digest: str) -> Manifest | None:
        media_type = await self._index.get_manifest_type(registry, repository, digest)
        if media_type is None:
            return None
        data = await self._content.read(digest)
        if data is None:
            return None
        manifest = Manifest(digest, media_type, data)
        self._memory[(registry, repository, digest)] = manifest
        return manifest

    async def _fresh_tag(self, registry: str, repository: str, tag: str) -> Manifest | None:
        """The tag's manifest if the index says it is fresh (another worker may have done it)."""
        row = await self._index.get_tag(registry, repository, tag)
        if row is None or self._clock() - row.confirmed >= self._clients[registry].registry.tag_ttl:
            return None
        cached = await self._cached(registry, repository, row.digest)
        if cached is not None:
            self._fresh[(registry, repository, tag)] = (row.digest, row.confirmed)
        return cached

    async def _set_tag(
        self, registry: str, repository: str, tag: str, digest: str, previous: TagRow | None
    ) -> None:
        """Record what upstream just confirmed; a changed digest is a `tag.updated` event
        (once: revalidation holds the tag's cross-worker lock)."""
        now = self._clock()
        await self._index.set_tag(registry, repository, tag, digest, now)
        self._fresh[(registry, repository, tag)] = (digest, now)
        if previous is not None and previous.digest != digest:
            # Other workers and replicas may hold the old mapping in memory until its TTL:
            # they drop their memory caches now (and this worker: the line above stays).
            self._shared.content_removed()
            self._generation = self._shared.generation
            self._fresh[(registry, repository, tag)] = (digest, now)
            self._events(
                "tag.updated",
                {"registry": registry, "repository": repository, "tag": tag,
                 "previous_digest": previous.digest, "digest": digest},
            )  # fmt: skip

    async def _delete_tag(self, registry: str, repository: str, tag: str) -> None:
        self._fresh.pop((registry, repository, tag), None)
        await self._index.delete_tag(registry, repository, tag)

    async def _by_digest(
        self, registry: str, repository: str, digest: str, accept: str, asked: str | None = None
    ) -> tuple[Manifest, bool]:
        """Fetch by digest once for concurrent callers; `asked`: the tag a client named, for the
        `image.cached` event (the digest itself by default)."""
        return await self._digests.do(
            (registry, repository, digest),
            lambda: self._locked_fetch(registry, repository, digest, accept, asked),
        )

    @contextlib.asynccontextmanager
    async def _lock(self, registry: str, repository: str, reference: str) -> AsyncIterator[None]:
        """The lock for one upstream manifest exchange: across this machine's workers (a
        file), and in a cluster across replicas (a claim): whoever waited then finds what the
        holder stored, so upstream sees one request for a tag or digest however many replicas
        were asked at once."""
        name = f"{registry}/{repository}:{reference}"
        key = hashlib.sha256(name.encode()).hexdigest()[:40]
        async with keyed_lock(self._store.tmp, f"manifest-{key}"):
            if self._claims is None:
                yield
                return
            async with self._claims.exclusive(f"manifest:{name}"):
                yield

    async def _locked_fetch(
        self, registry: str, repository: str, digest: str, accept: str, asked: str | None
    ) -> Manifest:
        async with self._lock(registry, repository, digest):
            cached = await self._cached(registry, repository, digest)
            return cached or await self._fetch(registry, repository, digest, accept, asked)

    async def _locked_refresh(
        self, registry: str, repository: str, tag: str, accept: str
    ) -> tuple[Manifest, Result]:
        async with self._lock(registry, repository, tag):
            cached = await self._fresh_tag(registry, repository, tag)
            if cached is not None:
                return cached, "hit"  # another worker refreshed it while this one waited
            row = await self._index.get_tag(registry, repository, tag)
            return await self._refresh_tag(registry, repository, tag, row, accept)

    async def _refresh_tag(
        self, registry: str, repository: str, tag: str, row: TagRow | None, accept: str
    ) -> tuple[Manifest, Result]:
        """Ask upstream which digest the tag names now, with a HEAD (free on Docker Hub), new
        tag or known one alike: a GET by digest only for a digest this repository does not
        have cached (alias tags such as `3.19`, `3`, `latest` share one), a GET by tag only if
        the HEAD names no usable digest. Upstream trouble serves the cached tag (stale)."""
        client = self._clients[registry]
        cached = await self._cached(registry, repository, row.digest) if row else None
        try:
            resp = await client.request(
                "HEAD", repository, f"manifests/{tag}", headers={"Accept": accept}
            )
        except RegistryError as exc:
            if cached is not None and is_transient(exc):
                return cached, "stale"
            raise
        async with resp:
            status, headers = resp.status, resp.headers.copy()
        digest = _usable_digest(headers.get("Docker-Content-Digest"))
        if status == 200 and digest is not None:
            result: Result = "hit"
            manifest = cached if cached is not None and cached.digest == digest else None
            if manifest is None:
                manifest = await self._cached(registry, repository, digest)
            if manifest is None:
                manifest, _ = await self._by_digest(registry, repository, digest, accept, tag)
                result = "miss"
            await self._set_tag(registry, repository, tag, manifest.digest, row)
            return manifest, result
        if status != 200:
            if status == 404 and row is not None:
                await self._delete_tag(registry, repository, tag)
            error = status_error(status, headers, "manifest", tag)
            if cached is not None and is_transient(error):
                return cached, "stale"
            raise error
        # A 200 HEAD without a digest: some registries omit it; only a GET can tell.
        try:
            manifest = await self._fetch(registry, repository, tag, accept)
        except RegistryError as exc:
            if cached is not None and is_transient(exc):
                return cached, "stale"
            if exc.status == 404 and row is not None:
                await self._delete_tag(registry, repository, tag)
            raise
        await self._set_tag(registry, repository, tag, manifest.digest, row)
        return manifest, "miss"

    async def _fetch(
        self, registry: str, repository: str, reference: str, accept: str, asked: str | None = None
    ) -> Manifest:
        """GET a manifest upstream, verify it, store it byte-for-byte, index it. `asked`: what
        the client named, if not `reference` (a tag resolved to this digest)."""
        client = self._clients[registry]
        try:
            resp = await client.request(
                "GET", repository, f"manifests/{reference}", headers={"Accept": accept}
            )
            async with resp:
                if resp.status != 200:
                    raise await upstream_error(resp, "manifest", reference)
                if (resp.content_length or 0) > MAX_MANIFEST_BYTES:
                    raise RegistryError.manifest_invalid("upstream manifest exceeds 4 MiB")
                data = await _read_capped(resp, MAX_MANIFEST_BYTES)
                header_type = resp.headers.get("Content-Type")
                header_digest = resp.headers.get("Docker-Content-Digest")
        except TRANSIENT_ERRORS as exc:
            raise RegistryError.unavailable(
                "upstream connection failed while reading a manifest"
            ) from exc

        by_digest = ":" in reference
        digest = digest_of(data, reference.split(":", 1)[0] if by_digest else "sha256")
        expected = reference if by_digest else header_digest
        if expected and expected.startswith(digest.split(":", 1)[0] + ":") and expected != digest:
            DIGEST_MISMATCHES.inc()
            raise RegistryError.manifest_invalid(
                f"upstream manifest does not match its digest {expected}"
            )
        media_type = content_type_of(data, header_type)
        # Reserve room only for bytes that are not on disk yet (the same manifest may already
        # be cached through another repository).
        reserved = 0 if await self._index.get_blob(digest) is not None else len(data)
        async with self._evictor.reserving(reserved) as room:
            try:
                await self._content.put(digest, data)
            except BaseException as exc:
                if self._store.note_if_full(exc):
                    return Manifest(digest, media_type, data)  # served, not cached: disk full
                raise
            new = await self._index.add_manifest(
                registry, repository, digest, media_type, len(data), references(data)
            )
            room.settle(new)
        if new:
            self._events(
                "image.cached",
                {"registry": registry, "repository": repository, "reference": asked or reference,
                 "digest": digest, "media_type": media_type, "size": len(data)},
            )  # fmt: skip
        manifest = Manifest(digest, media_type, data)
        self._memory[(registry, repository, digest)] = manifest
        return manifest


def _usable_digest(value: str | None) -> str | None:
    """The upstream's Docker-Content-Digest if it is one we can verify, else None."""
    if not value:
        return None
    try:
        return validate_digest(value)
    except RegistryError:
        return None


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        total += len(chunk)
        if total > cap:
            raise RegistryError.manifest_invalid("upstream manifest exceeds 4 MiB")
        chunks.append(chunk)
        UPSTREAM_BYTES.inc(len(chunk))
    return b"".join(chunks)
