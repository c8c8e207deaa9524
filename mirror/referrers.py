"""Referrers: which signatures, SBOMs and attestations name a manifest as their `subject`.

`GET /v2/<name>/referrers/<digest>` is answered 200 with an OCI index, always (distribution-spec
"Listing Referrers": a registry with the API never answers 404). Where the list comes from:

1. the upstream's referrers API, asked unfiltered so one entry serves every `artifactType`
   filter (filtered here), its Link pages followed (bounded);
2. an upstream that answers 404 has no such API (spec "Unavailable Referrers API"): then the
   index pushed under the referrers tag schema (`sha256-<hex>`) by clients such as cosign and
   notation, resolved like any tag by the ManifestResolver (a HEAD revalidates it, the index is
   fetched by digest once and cached on disk);
3. neither: an empty index.

The answer is kept in memory per (registry, repository, digest), fresh for the registry's
`tag_ttl` like a tag, served stale while the upstream fails, and concurrent clients share one
upstream exchange.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache

from mirror.errors import RegistryError
from mirror.jsondoc import parse_json
from mirror.manifests import ManifestResolver, Result
from mirror.mediatypes import MAX_MANIFEST_BYTES, OCI_INDEX
from mirror.singleflight import SingleFlight
from mirror.upstream.client import RegistryClient, is_transient
from mirror.upstream.pages import read_pages

log = logging.getLogger(__name__)

MAX_PAGES = 50
MAX_BYTES = MAX_MANIFEST_BYTES  # of upstream referrers pages for one subject, all pages
MEMORY_BYTES = 32 * 1024 * 1024  # referrer lists kept in memory per worker
# A registry without the API: 404 per the spec; some route the path elsewhere and answer 405.
NO_API_STATUSES = (404, 405)
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")

Key = tuple[str, str, str]  # registry, repository, subject digest
Descriptor = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Referrers:
    descriptors: tuple[Descriptor, ...]
    fetched: float
    size: int


def referrers_tag(digest: str) -> str:
    """The referrers tag schema's tag for `digest`: `<alg>-<hex>`, the algorithm cut to 32
    characters and the hex to 64, anything a tag cannot hold replaced by `-`."""
    algorithm, _, encoded = digest.partition(":")
    return _TAG_UNSAFE.sub("-", f"{algorithm[:32]}-{encoded[:64]}")


def descriptors_of(data: bytes) -> list[Descriptor] | None:
    """The `manifests` of an image index, or None if `data` is not one."""
    try:
        doc = parse_json(data)
    except ValueError:
        return None
    entries = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        return None
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("digest"), str)]


def merge_pages(bodies: list[bytes]) -> list[Descriptor]:
    """The descriptors of every page, once each (by digest). ValueError if a page is not an
    index."""
    merged: dict[str, Descriptor] = {}
    for body in bodies:
        page = descriptors_of(body)
        if page is None:
            raise ValueError("not an image index")
        for entry in page:
            merged.setdefault(entry["digest"], entry)
    return list(merged.values())


def referrers_index(
    descriptors: Collection[Descriptor], artifact_types: Collection[str]
) -> tuple[bytes, bool]:
    """The index to answer with, and whether an `artifactType` filter was applied (the
    client is then told with `OCI-Filters-Applied: artifactType`).

    A `+` sent unencoded in the query (`?artifactType=application/spdx+json`) arrives as a
    space; a media type never holds one, so it is read back as the `+` it was."""
    wanted = {t.replace(" ", "+") for t in artifact_types if t}
    if wanted:
        descriptors = [d for d in descriptors if d.get("artifactType") in wanted]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(descriptors)}
    return json.dumps(index).encode(), bool(wanted)


class ReferrerLists:
    def __init__(
        self,
        clients: Mapping[str, RegistryClient],
        resolver: ManifestResolver,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clients = clients
        self._resolver = resolver
        self._clock = clock
        self._memory: LRUCache[Key, Referrers] = LRUCache(MEMORY_BYTES, lambda r: r.size + 256)
        self._flight: SingleFlight[Key, tuple[Referrers, Result]] = SingleFlight()

    async def close(self) -> None:
        await self._flight.close()

    async def of(
        self, registry: str, repository: str, digest: str
    ) -> tuple[tuple[Descriptor, ...], Result]:
        """Every referrer of `digest` in the repository, and where the answer came from."""
        key = (registry, repository, digest)
        kept = self._memory.get(key)
        ttl = self._clients[registry].registry.tag_ttl
        if kept is not None and self._clock() - kept.fetched < ttl:
            return kept.descriptors, "hit"
        (found, result), shared = await self._flight.do(key, lambda: self._discover(key))
        return found.descriptors, "coalesced" if shared else result

    async def _discover(self, key: Key) -> tuple[Referrers, Result]:
        registry, repository, digest = key
        try:
            descriptors = await self._from_api(registry, repository, digest)
            result: Result = "miss"
        except RegistryError as exc:
            if exc.status not in NO_API_STATUSES:
                return await self._failed(key, exc)
            try:
                descriptors, result = await self._from_tag_schema(registry, repository, digest)
            except RegistryError as tag_exc:
                return await self._failed(key, tag_exc)
        found = Referrers(tuple(descriptors), self._clock(), len(json.dumps(descriptors)))
        self._memory[key] = found
        return found, result

    async def _failed(self, key: Key, error: RegistryError) -> tuple[Referrers, Result]:
        """Stale-if-error: the answer kept in memory, else the tag schema's index if the index
        holds it (it survives restarts; another worker may have read it); else the error."""
        if not is_transient(error):
            raise error
        kept = self._memory.get(key)
        if kept is not None:
            return kept, "stale"
        registry, repository, digest = key
        try:
            manifest, _ = await self._resolver.resolve(
                registry, repository, referrers_tag(digest), frozenset({OCI_INDEX})
            )
        except RegistryError:
            raise error from None
        descriptors = descriptors_of(manifest.data)
        if descriptors is None:
            raise error
        # Not kept in memory: the next request asks the upstream's API again.
        return Referrers(tuple(descriptors), self._clock(), len(manifest.data)), "stale"

    async def _from_api(self, registry: str, repository: str, digest: str) -> list[Descriptor]:
        pages = await read_pages(
            self._clients[registry], repository, f"referrers/{digest}", accept=OCI_INDEX,
            what="referrers", max_pages=MAX_PAGES, max_bytes=MAX_BYTES,
        )  # fmt: skip
        try:
            descriptors = merge_pages(pages.bodies)
        except ValueError as exc:
            raise RegistryError.unavailable("upstream referrers answer is not an index") from exc
        if not pages.complete:
            log.warning(
                "referrers of %s in %s/%s cut at %d upstream pages or %d bytes",
                digest, registry, repository, MAX_PAGES, MAX_BYTES,
            )  # fmt: skip
        return descriptors

    async def _from_tag_schema(
        self, registry: str, repository: str, digest: str
    ) -> tuple[list[Descriptor], Result]:
        """The index tagged `sha256-<hex>`, resolved like any tag (and so cached on disk,
        revalidated with a HEAD); no such tag, or not an index: no referrers."""
        try:
            manifest, result = await self._resolver.resolve(
                registry, repository, referrers_tag(digest), frozenset({OCI_INDEX})
            )
        except RegistryError as exc:
            if exc.status == 404:
                return [], "miss"
            raise
        return descriptors_of(manifest.data) or [], result
