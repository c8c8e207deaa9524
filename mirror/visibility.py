"""Upstream credentials raise rate limits; they never widen who can read what.

A mirror given an account's credentials could otherwise hand that account's private
repositories to anyone on the LAN (the incumbent does). So for a registry configured with
credentials, a repository's content is served only if an anonymous client could pull it from
the upstream itself: the mirror asks, anonymously, with a request that costs nothing against
rate limits (a HEAD of the manifest or blob asked for, or the first tag), and remembers the
answer per repository for `TTL`. Everything else gets the 401 an anonymous client gets from
the upstream. That holds for content already cached, and on the hit path too, which serves a
repository only once it is known public.

With `private = "members"` such content is served to the mirror's own users (`auth_htpasswd`),
fetched with the mirror's credentials, as Harbor's proxy-cache projects serve their members:
the org's private repositories to its people, never to an anonymous client on the LAN; a
`members` table narrows which users get which repositories. Anonymous clients and wrong
passwords get 401 with the Basic challenge; a user without the right gets 403 DENIED.

With `private = "passthrough"` such content is served to a client whose own credentials the
upstream accepts for that repository: the mirror challenges with Basic auth, then asks the
upstream with the client's credentials (its token service, or the registry itself), and
remembers the verdict for `CLIENT_TTL` under a hash of the Authorization header — never the
credentials themselves. Blobs stay shared by digest in the cache.

A registry without credentials needs none of this: all it ever fetched, anonymous clients
could fetch too.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from cachetools import LRUCache

from mirror.errors import RegistryError
from mirror.singleflight import SingleFlight
from mirror.upstream.client import RegistryClient, is_transient

TTL = 600.0  # seconds an answer is trusted; a repository made private stops being served by then
CLIENT_TTL = 60.0  # seconds a client's credentials stay accepted (or refused) for a repository
CHALLENGE = {"WWW-Authenticate": 'Basic realm="mirror"'}

Key = tuple[str, str]  # registry, repository
Members = tuple[tuple[str, tuple[str, ...]], ...]  # RegistryConfig.members


@dataclass(frozen=True, slots=True)
class Grant:
    """How a request was let in to a repository: it is public upstream (or the registry has no
    credentials, so all it holds is), or, with passthrough, the client's own upstream
    `credentials` may pull it. Anything asked upstream on the request's behalf is asked so."""

    credentials: tuple[str, str] | None = field(default=None, repr=False)


PUBLIC = Grant()
ClientKey = tuple[str, str, str]  # registry, repository, sha256 of the Authorization header


class Visibility:
    def __init__(
        self,
        anonymous: Mapping[str, RegistryClient],
        as_client: Callable[[str, str, str], RegistryClient] | None = None,
        clock: Callable[[], float] = time.monotonic,
        identify: Callable[[str | None], Awaitable[str | None]] | None = None,
    ) -> None:
        """`anonymous`: for each registry that has credentials, a client without them;
        `as_client(registry, username, password)`: a client with a mirror client's credentials;
        `identify(authorization)`: the mirror user it proves, or None (private = "members")."""
        self._identify = identify
        self._anonymous = anonymous
        self._as_client = as_client
        self._clock = clock
        # Bounded: every name a client asks for can become an entry (least recently used out).
        self._known: LRUCache[Key, tuple[bool, float]] = LRUCache(100_000)
        self._probes: SingleFlight[Key, bool] = SingleFlight()
        self._clients: LRUCache[ClientKey, tuple[bool, float]] = LRUCache(10_000)
        self._client_probes: SingleFlight[ClientKey, bool] = SingleFlight()

    @property
    def challenges(self) -> bool:
        """Whether `/v2/` should invite credentials (clients such as Docker learn it there)."""
        return any(c.registry.private != "deny" for c in self._anonymous.values())

    @property
    def gated(self) -> bool:
        """Whether some registry's repositories must be known public before they are shown."""
        return bool(self._anonymous)

    async def close(self) -> None:
        await self._probes.close()
        await self._client_probes.close()

    def known_public(self, registry: str, repository: str) -> bool:
        """Without I/O: may this repository be served right now? (The hit path asks.)"""
        if registry not in self._anonymous:
            return True
        known = self._known.get((registry, repository))
        return known is not None and known[0] and self._clock() < known[1]

    async def check(
        self, registry: str, repository: str, probe: str, authorization: str | None = None
    ) -> Grant:
        """Raise the anonymous client's 401 unless the repository is public upstream, or, with
        passthrough, the client's own credentials may pull it there; say which it was.

        `probe`: the request suffix to ask upstream (`manifests/<ref>`, `blobs/<digest>`,
        `tags/list`), the very thing the client asked for.
        """
        if self.known_public(registry, repository):
            return PUBLIC
        key = (registry, repository)
        known = self._known.get(key)
        if known is not None and self._clock() < known[1]:
            public = known[0]
        else:
            public, _ = await self._probes.do(key, lambda: self._probe(key, probe, known))
        if public:
            return PUBLIC
        config = self._anonymous[registry].registry
        if config.private == "members":
            await self._member_may_pull(config.members, repository, authorization)
            return PUBLIC  # fetched and confirmed with the mirror's own credentials
        if config.private != "passthrough":
            raise RegistryError.unauthorized(
                "authentication required: this repository is not public upstream"
            )
        credentials = basic_credentials(authorization)
        if credentials is None or not await self._client_may_pull(
            registry, repository, probe, authorization or "", credentials
        ):
            raise RegistryError(
                401, "UNAUTHORIZED", "authentication required: the upstream's credentials for "
                "this repository", headers=CHALLENGE,
            )  # fmt: skip
        return Grant(credentials)

    async def _member_may_pull(
        self, members: Members, repository: str, authorization: str | None
    ) -> None:
        user = None if self._identify is None else await self._identify(authorization)
        if user is None:
            message = "wrong username or password" if authorization else "authentication required"
            raise RegistryError(
                401, "UNAUTHORIZED", f"{message}: this repository is for the mirror's users",
                headers=CHALLENGE,
            )  # fmt: skip
        if not members_allow(members, repository, user):
            raise RegistryError.denied(f"{user} may not pull {repository}")

    async def status_as(
        self, grant: Grant, default: RegistryClient, repository: str, probe: str
    ) -> int:
        """The upstream's status for `probe`, asked the way the request was let in: with the
        client's own credentials where passthrough let it in, else with `default`."""
        if grant.credentials is None or self._as_client is None:
            return await _status(default, repository, probe)
        client = self._as_client(default.registry.name, *grant.credentials)
        try:
            return await _status(client, repository, probe)
        finally:
            await client.close()

    async def _client_may_pull(
        self, registry: str, repository: str, probe: str, authorization: str,
        credentials: tuple[str, str],
    ) -> bool:  # fmt: skip
        digest = hashlib.sha256(authorization.encode()).hexdigest()
        key = (registry, repository, digest)
        known = self._clients.get(key)
        if known is not None and self._clock() < known[1]:
            return known[0]
        if self._as_client is None:
            return False

        async def ask() -> bool:
            client = self._as_client(registry, *credentials)  # type: ignore[misc]
            try:
                status = await _status(client, repository, probe)
            finally:
                await client.close()
            allowed = _may_pull(status)
            if allowed is None:
                raise RegistryError.unavailable("cannot check these credentials upstream now")
            self._clients[key] = (allowed, self._clock() + CLIENT_TTL)
            return allowed

        allowed, _ = await self._client_probes.do(key, ask)
        return allowed

    async def _probe(self, key: Key, probe: str, known: tuple[bool, float] | None) -> bool:
        registry, repository = key
        try:
            status = await _status(self._anonymous[registry], repository, probe)
        except RegistryError as exc:
            if is_transient(exc) and known is not None:
                return known[0]  # upstream down: the last answer stands (stale-if-error)
            raise
        public = _may_pull(status)
        if public is None:
            if known is not None:
                return known[0]
            raise RegistryError.unavailable("cannot tell whether this repository is public")
        self._known[key] = (public, self._clock() + TTL)
        return public


def members_allow(members: Members, repository: str, user: str) -> bool:
    """May this mirror user pull this private repository? The first rule whose repository
    pattern matches decides (its user patterns); a repository no rule matches is every
    user's. Case-sensitive (fnmatchcase): names are lowercase, user names are as written."""
    for pattern, users in members:
        if fnmatch.fnmatchcase(repository, pattern):
            return any(fnmatch.fnmatchcase(user, allowed) for allowed in users)
    return True


def _may_pull(status: int) -> bool | None:
    """The upstream's answer to a probe: 2xx, or a 404 the asker was allowed to see, means it
    may pull; 401/403 mean not; 5xx and 429 tell nothing (None)."""
    if status >= 500 or status == 429:
        return None
    return status < 300 or status == 404


async def _status(client: RegistryClient, repository: str, probe: str) -> int:
    """The upstream's status for `probe` as `client` (HEAD; a one-entry GET for tag lists)."""
    method = "GET" if probe.startswith("tags/") else "HEAD"
    params = {"n": "1"} if method == "GET" else None
    try:
        resp = await client.request(method, repository, probe, params=params)
    except RegistryError as exc:
        if exc.status in (401, 403):  # e.g. the token service refused the credentials
            return exc.status
        raise
    async with resp:
        return resp.status


def basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """(user, password) from `Basic <base64>`, or None."""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return (user, password) if sep and user else None
