"""Which repository may be served which cached blob.

Blobs are stored once by digest, but upstream access is per repository: a layer of alice's
private `acme/secret` must not come back to an anonymous client who asks for the same digest
under `library/alpine`. So a cached blob (or a download in flight) is served under a repository
only when that repository is known to hold it (distribution's proxy checks its per-repository
blob links the same way; see docs/protocol.md, "Serving"):

- a cached manifest of that repository names it (the common case: clients fetch the manifest
  first), or it is that manifest;
- it was downloaded under that repository (recorded when the download committed);
- the upstream, asked with a HEAD as that repository (free on Docker Hub), confirms it, with
  the client's own credentials where passthrough let the client in (recorded then).

A shared layer is still downloaded and stored once; only the question "may this repository
have it" is asked per repository. Positive answers are kept in a bounded memory per worker and
dropped whenever content is deleted anywhere (the shared generation moves).
"""

from __future__ import annotations

from collections.abc import Mapping

from cachetools import LRUCache

from mirror.errors import RegistryError
from mirror.shared import SharedState
from mirror.singleflight import SingleFlight
from mirror.store.health import BackendUnavailable
from mirror.store.index import Index
from mirror.upstream.client import RegistryClient, status_error
from mirror.visibility import Grant, Visibility

Key = tuple[str, str, str]  # registry, repository, digest
MEMORY = 200_000


class BlobMembership:
    def __init__(
        self,
        index: Index,
        clients: Mapping[str, RegistryClient],
        visibility: Visibility,
        shared: SharedState,
    ) -> None:
        self._index = index
        self._clients = clients
        self._visibility = visibility
        self._shared = shared
        self._generation = shared.generation
        self._known: LRUCache[Key, bool] = LRUCache(MEMORY)
        self._confirming: SingleFlight[tuple[Key, Grant], bool] = SingleFlight()

    async def close(self) -> None:
        await self._confirming.close()

    def known(self, registry: str, repository: str, digest: str) -> bool:
        """Without I/O: already established for this repository in this worker?"""
        if self._shared.generation != self._generation:
            self._generation = self._shared.generation
            self._known.clear()
        return (registry, repository, digest) in self._known

    async def check(self, registry: str, repository: str, digest: str, grant: Grant) -> None:
        """Raise BLOB_UNKNOWN unless this repository is known, or now confirmed, to hold it."""
        if self.known(registry, repository, digest):
            return
        key = (registry, repository, digest)
        held, _ = await self._confirming.do((key, grant), lambda: self._confirm(key, grant))
        if not held:
            raise RegistryError.blob_unknown(digest)

    async def _confirm(self, key: Key, grant: Grant) -> bool:
        registry, repository, digest = key
        try:
            held = await self._index.holds(registry, repository, digest)
        except BackendUnavailable:
            held = False  # the database is down: the upstream can still say (a HEAD is free)
            indexed = False
        else:
            indexed = True
        if held:
            self._known[key] = True
            return True
        status = await self._visibility.status_as(
            grant, self._clients[registry], repository, f"blobs/{digest}"
        )
        if status == 200:
            if indexed:
                await self._index.add_holder(registry, repository, digest)
            self._known[key] = True
            return True
        if status in (401, 403, 404):
            return False  # not in this repository, or not for this client: unknown here
        raise status_error(status, {}, "blob", digest)  # 429, 5xx: no answer either way
