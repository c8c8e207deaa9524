"""HTTP client for one upstream registry: token auth, redirects, retries, timeouts.

Facts this encodes (see docs/protocol.md, "The upstream"):
- Docker Hub blob GETs answer 307 to a signed CDN URL; Authorization must never go there, and
  the URL is never cached: a resume asks the registry again for a fresh redirect.
- Bytes are hashed raw: ask for `Accept-Encoding: identity` and never decompress.
- A 401 is answered once with a fresh token; a second 401 is the upstream's verdict.
- Connect errors and 5xx are retried a bounded number of times; 429 is not retried (Hub's
  window is hours), its Retry-After goes back to the client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp

from mirror.config import RegistryConfig
from mirror.errors import RegistryError
from mirror.jsondoc import parse_json
from mirror.metrics import (
    CREDENTIALS_WITHHELD,
    RATELIMIT_LIMIT,
    RATELIMIT_REMAINING,
    TOKEN_REQUESTS,
    UPSTREAM_DURATION,
    UPSTREAM_REQUESTS,
    upstream_kind,
)
from mirror.singleflight import SingleFlight
from mirror.upstream.auth import (
    Challenge,
    Token,
    TokenCache,
    TokenKey,
    basic_authorization,
    parse_www_authenticate,
    realm_may_receive_credentials,
    token_from_response,
)
from mirror.webhooks import EventSink, ignore_event

log = logging.getLogger(__name__)

REDIRECTS = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 5
RETRY_DELAYS = (0.2, 0.8)  # bounded: three attempts in all for connect errors and 5xx
READ_TIMEOUT = 30.0  # seconds an upstream may go silent mid-response before it is resumed
READ_BUFFER = 1024 * 1024  # aiohttp pauses reading a response at twice this much buffered
TOKEN_TIMEOUT = aiohttp.ClientTimeout(total=15)

TRANSIENT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)


def make_session(read_timeout: float = READ_TIMEOUT) -> aiohttp.ClientSession:
    """One pool for all upstream traffic; raw bytes only (`auto_decompress=False`).

    No total timeout (a large layer takes what it takes), but a silent upstream is given up
    after `read_timeout` and the download resumed with Range from a fresh request."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(
            total=None, connect=10, sock_connect=10, sock_read=read_timeout
        ),
        auto_decompress=False,
        read_bufsize=READ_BUFFER,
        connector=aiohttp.TCPConnector(limit=256, limit_per_host=64, ttl_dns_cache=300),
        headers={"User-Agent": "mirror/0.1 (+pull-through cache)", "Accept-Encoding": "identity"},
    )


@dataclass(slots=True)
class RateLimit:
    """Docker Hub's `ratelimit-limit: 100;w=21600` and `ratelimit-remaining: 76;w=21600`."""

    limit: int | None = None
    remaining: int | None = None


def parse_ratelimit(value: str | None) -> int | None:
    if not value:
        return None
    head = value.split(";", 1)[0].strip()
    return int(head) if head.isdigit() else None


def status_error(
    status: int, headers: Mapping[str, str], what: str, reference: str, code: str | None = None
) -> RegistryError:
    """The client-facing error for an upstream status that is not a success.

    `code` is the upstream's own error code where it was read: a 404 NAME_UNKNOWN means the
    whole repository is missing, which the negative cache remembers more widely.
    """
    if status == 404:
        if code == "NAME_UNKNOWN":
            return RegistryError.name_unknown(reference)
        if what == "blob":
            return RegistryError.blob_unknown(reference)
        return RegistryError.manifest_unknown(reference)
    if status == 401:
        error = RegistryError.unauthorized("upstream refused access to this repository")
        error.about_repository = True
        return error
    if status == 403:
        return RegistryError.denied()
    if status == 429:
        return RegistryError.too_many_requests(headers.get("Retry-After"))
    return RegistryError.unavailable(f"upstream answered {status}")


async def upstream_error(resp: aiohttp.ClientResponse, what: str, reference: str) -> RegistryError:
    """Like status_error, reading the error code from a small 404 body."""
    code = None
    if resp.status == 404 and resp.method != "HEAD":
        try:
            body = parse_json(await resp.content.read(64 * 1024))
            code = body["errors"][0]["code"]
        except (ValueError, KeyError, IndexError, TypeError, *TRANSIENT_ERRORS):
            code = None
    return status_error(resp.status, resp.headers, what, reference, code)


def usable_challenge(resp: aiohttp.ClientResponse) -> Challenge | None:
    """The first Bearer or Basic challenge of a 401, whatever else the upstream offers."""
    for challenge in parse_www_authenticate(resp.headers.getall("WWW-Authenticate", [])):
        if challenge.scheme in ("bearer", "basic"):
            return challenge
    return None


def is_transient(error: RegistryError) -> bool:
    """Errors for which serving what we have cached (stale-if-error) is right."""
    return error.status == 429 or error.status >= 500


class RegistryClient:
    def __init__(
        self,
        registry: RegistryConfig,
        session: aiohttp.ClientSession,
        tokens: TokenCache,
        events: EventSink = ignore_event,
    ) -> None:
        self.registry = registry
        self._events = events
        self._session = session
        self._tokens = tokens
        self._host = urlsplit(registry.url).netloc.lower()
        self._challenge: Challenge | None = None
        self._token_flight: SingleFlight[TokenKey, Token] = SingleFlight()
        self._ping_flight: SingleFlight[None, None] = SingleFlight()
        self._pinged = False
        self.ratelimit = RateLimit()

    async def close(self) -> None:
        await self._token_flight.close()
        await self._ping_flight.close()

    async def _ping(self) -> None:
        """Learn the auth challenge from `GET /v2/` before the first real request.

        Without it the first manifest GET goes out anonymous, draws a 401 and is sent again:
        two GETs where one should do. A failed ping is not an error: the request that follows
        reports the upstream's state, and the challenge is then learnt from its 401.
        """
        try:
            async with self._session.get(f"{self.registry.url}/v2/", allow_redirects=False) as resp:
                if resp.status == 401:
                    self._challenge = usable_challenge(resp)
                self._pinged = resp.status in (200, 401)
        except TRANSIENT_ERRORS:
            pass

    def is_registry_host(self, url: str) -> bool:
        """Is `url` on the registry itself (host and port), rather than a CDN it redirected to?"""
        return urlsplit(url).netloc.lower() == self._host

    def url(self, repository: str, suffix: str) -> str:
        return f"{self.registry.url}/v2/{repository}/{suffix}"

    async def request(
        self,
        method: str,
        repository: str,
        suffix: str,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """Send a request for `repository`, authenticating as the upstream asks.

        Returns the final response (after redirects) unread; the caller releases it. Raises
        RegistryError(503) once retries for connection errors and 5xx are spent.
        """
        url = self.url(repository, suffix)
        scopes: tuple[str, ...] = (f"repository:{repository}:pull",)
        retried_auth = False
        attempt = 0
        if not self._pinged:
            await self._ping_flight.do(None, self._ping)
        kind = upstream_kind(suffix)
        name = self.registry.name
        while True:
            auth = await self._authorization(scopes) if self._challenge else None
            started = time.monotonic()
            try:
                resp = await self._send(method, url, dict(headers or {}), params, auth)
            except TRANSIENT_ERRORS as exc:
                UPSTREAM_REQUESTS.labels(name, kind, method, "error").inc()
                if attempt < len(RETRY_DELAYS):
                    await asyncio.sleep(RETRY_DELAYS[attempt])
                    attempt += 1
                    continue
                self._upstream_error(kind, "unreachable", type(exc).__name__)
                raise RegistryError.unavailable(
                    f"upstream unreachable: {type(exc).__name__}"
                ) from exc
            UPSTREAM_DURATION.labels(name, kind).observe(time.monotonic() - started)
            UPSTREAM_REQUESTS.labels(name, kind, method, str(resp.status)).inc()
            self._note_ratelimit(resp)
            if resp.status == 401 and not retried_auth:
                challenge = usable_challenge(resp)
                resp.release()
                if challenge is None:
                    raise RegistryError.unauthorized("upstream requires an unsupported auth scheme")
                self._challenge = challenge
                if self._challenge.scheme == "bearer":
                    scopes = self._challenge.scopes or scopes
                    self._tokens.drop(self._token_key(self._challenge, scopes))
                retried_auth = True
                continue
            if resp.status >= 500 and attempt < len(RETRY_DELAYS):
                resp.release()
                await asyncio.sleep(RETRY_DELAYS[attempt])
                attempt += 1
                continue
            if resp.status >= 500 or resp.status == 429:
                self._upstream_error(kind, str(resp.status), resp.reason or "")
            return resp

    def _upstream_error(self, kind: str, status: str, message: str) -> None:
        """An `upstream.error` event once retries are spent (webhooks.py throttles them)."""
        self._events(
            "upstream.error",
            {"registry": self.registry.name, "kind": kind, "status": status, "message": message},
        )

    async def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        params: Mapping[str, str] | None,
        auth: str | None,
    ) -> aiohttp.ClientResponse:
        """Follow redirects by hand so Authorization reaches the registry's own host only."""
        for _ in range(MAX_REDIRECTS + 1):
            sent = dict(headers)
            if auth and self.is_registry_host(url):
                sent["Authorization"] = auth
            resp = await self._session.request(
                method, url, headers=sent, params=params, allow_redirects=False
            )
            location = resp.headers.get("Location")
            if resp.status not in REDIRECTS or not location:
                return resp
            resp.release()
            url = urljoin(str(resp.url), location)
            params = None  # the Location carries its own query
            if resp.status == 303:
                method = "GET"
        raise RegistryError.unavailable("upstream redirected too many times")

    def _note_ratelimit(self, resp: aiohttp.ClientResponse) -> None:
        limit = parse_ratelimit(resp.headers.get("ratelimit-limit"))
        if limit is not None:
            self.ratelimit.limit = limit
            self.ratelimit.remaining = parse_ratelimit(resp.headers.get("ratelimit-remaining"))
            RATELIMIT_LIMIT.labels(self.registry.name).set(limit)
            if self.ratelimit.remaining is not None:
                RATELIMIT_REMAINING.labels(self.registry.name).set(self.ratelimit.remaining)

    def _credentials_allowed(self, challenge: Challenge) -> bool:
        if self.registry.credentials is None:
            return False
        return realm_may_receive_credentials(
            challenge.realm, self.registry.url, self.registry.token_realms
        )

    def _token_key(self, challenge: Challenge, scopes: tuple[str, ...]) -> TokenKey:
        return (challenge.realm, challenge.service, scopes, self._credentials_allowed(challenge))

    async def _authorization(self, scopes: tuple[str, ...]) -> str | None:
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self.registry.credentials
            return basic_authorization(*creds) if creds else None
        key = self._token_key(challenge, scopes)
        token = self._tokens.get(key)
        if token is None:
            token, _ = await self._token_flight.do(key, lambda: self._fetch_token(challenge, key))
        return f"Bearer {token.value}"

    async def _fetch_token(self, challenge: Challenge, key: TokenKey) -> Token:
        realm, service, scopes, with_credentials = key
        if not realm.startswith(("https://", "http://")):
            raise RegistryError.unavailable("upstream token realm is not an http(s) URL")
        params: list[tuple[str, str]] = []
        if service:
            params.append(("service", service))
        params.extend(("scope", s) for s in scopes)
        creds = self.registry.credentials if with_credentials else None
        if self.registry.credentials is not None and not with_credentials:
            CREDENTIALS_WITHHELD.labels(self.registry.name).inc()
            log.warning(
                "upstream %s names token realm %s, not one of its allowed hosts (add it to "
                "token_realms to trust it): requesting an anonymous token, credentials withheld",
                self.registry.name,
                urlsplit(realm).hostname,
            )
        headers = {"Authorization": basic_authorization(*creds)} if creds else {}
        try:
            async with self._session.get(
                realm, params=params, headers=headers, timeout=TOKEN_TIMEOUT, allow_redirects=False
            ) as resp:
                if resp.status != 200:
                    TOKEN_REQUESTS.labels(self.registry.name, f"{resp.status // 100}xx").inc()
                if resp.status in (401, 403):
                    raise RegistryError.unauthorized(
                        "upstream token service refused the credentials"
                    )
                if resp.status == 429:
                    raise RegistryError.too_many_requests(resp.headers.get("Retry-After"))
                if resp.status != 200:
                    self._upstream_error("token", str(resp.status), resp.reason or "")
                    raise RegistryError.unavailable(
                        f"upstream token service answered {resp.status}"
                    )
                body = await resp.json(content_type=None, loads=parse_json)
        except TRANSIENT_ERRORS as exc:
            TOKEN_REQUESTS.labels(self.registry.name, "error").inc()
            self._upstream_error("token", "unreachable", type(exc).__name__)
            raise RegistryError.unavailable("upstream token service unreachable") from exc
        except ValueError as exc:
            raise RegistryError.unavailable("upstream token service sent no JSON") from exc
        try:
            token = token_from_response(body, time.monotonic())
        except ValueError as exc:
            raise RegistryError.unavailable(f"upstream token service: {exc}") from exc
        TOKEN_REQUESTS.labels(self.registry.name, "ok").inc()
        self._tokens.put(key, token)
        return token
