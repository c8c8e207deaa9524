"""The negative cache: what upstream recently said does not exist, for a short while.

Every pull of a missing tag would otherwise cost an upstream request (and, on Docker Hub, rate
limit). Remembered: a 404 (NAME_UNKNOWN covers every reference in the repository), and a 401
that the upstream client saw again after a fresh token, which is how Docker Hub answers for a
repository that does not exist or is private (see docs/protocol.md): it covers the repository.
A 403, 429 or 5xx says nothing lasting and is never remembered.
"""

from __future__ import annotations

import time

from cachetools import TTLCache

from mirror.errors import RegistryError
from mirror.metrics import NEGATIVE_CACHE_HITS

REPOSITORY = ""  # the reference under which a whole-repository 404 is remembered


class MissingCache:
    def __init__(self, ttl: float, maxsize: int = 65536) -> None:
        self._ttl = ttl
        self._cache: TTLCache[tuple[str, str, str], RegistryError] = TTLCache(
            maxsize=maxsize, ttl=max(ttl, 0.001), timer=time.monotonic
        )

    def check(self, registry: str, repository: str, kind: str, reference: str) -> None:
        """Raise the remembered 404 (or 401) for this reference or its repository, if any.

        `kind` ("manifest", "blob") keeps a digest that is no manifest apart from a blob of
        the same digest: the answers differ (MANIFEST_UNKNOWN, BLOB_UNKNOWN)."""
        scoped = f"{kind}:{reference}"
        for key in ((registry, repository, scoped), (registry, repository, REPOSITORY)):
            error = self._cache.get(key)
            if error is not None:
                NEGATIVE_CACHE_HITS.labels(registry).inc()
                raise error

    def remember(
        self, registry: str, repository: str, kind: str, reference: str, error: RegistryError
    ) -> None:
        if self._ttl <= 0 or not (error.status == 404 or error.about_repository):
            return  # a token service refusing the mirror's credentials is not about this name
        whole = error.code in ("NAME_UNKNOWN", "UNAUTHORIZED")
        scope = REPOSITORY if whole else f"{kind}:{reference}"
        self._cache[(registry, repository, scope)] = error
