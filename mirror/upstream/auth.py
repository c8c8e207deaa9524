"""Registry token auth: `WWW-Authenticate` parsing, where credentials may go, token caching.

Docker Hub answers 401 with `Bearer realm="https://auth.docker.io/token",service=...,scope=...`.
A busy mirror must ask the token service about once per scope per token lifetime, not once
per request, and never hand the configured password to a realm the upstream merely names
(distribution's proxy did, see CVE-2026-33540).
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from cachetools import TLRUCache

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lowercased: "bearer" or "basic"
    params: dict[str, str] = field(hash=False)

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str:
        return self.params.get("service", "")

    @property
    def scopes(self) -> tuple[str, ...]:
        """A scope value may hold several space-separated scopes; each goes as its own `scope=`."""
        return tuple(self.params.get("scope", "").split())


def _skip_spaces(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t":
        i += 1
    return i


def _read_token(text: str, i: int) -> tuple[str, int]:
    start = i
    while i < len(text) and text[i] not in ' \t,="':
        i += 1
    return text[start:i], i


def _read_quoted(text: str, i: int) -> tuple[str, int]:
    """Read a quoted-string starting after the opening quote; backslash escapes one character."""
    out: list[str] = []
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if ch == '"':
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    return "".join(out), i


def parse_www_authenticate(headers: Iterable[str]) -> list[Challenge]:
    """Parse every challenge in every `WWW-Authenticate` header (RFC 9110 section 11.6.1).

    Quoted values may hold commas and spaces, and one header may hold several challenges, so
    a naive split on `,` is wrong. Unparseable input yields what could be read, never raises.
    """
    challenges: list[Challenge] = []
    for text in headers:
        i = 0
        current: Challenge | None = None
        while i < len(text):
            i = _skip_spaces(text, i)
            if i < len(text) and text[i] == ",":
                i += 1
                continue
            token, j = _read_token(text, i)
            if not token:
                i = j + 1  # stray character: skip it
                continue
            k = _skip_spaces(text, j)
            if k < len(text) and text[k] == "=" and current is not None:
                k = _skip_spaces(text, k + 1)
                if k < len(text) and text[k] == '"':
                    value, i = _read_quoted(text, k + 1)
                else:
                    value, i = _read_token(text, k)
                current.params[token.lower()] = value
            else:
                current = Challenge(token.lower(), {})
                challenges.append(current)
                i = j
    return challenges


def basic_authorization(username: str, password: str) -> str:
    """An `Authorization: Basic` value (aiohttp's BasicAuth helper is deprecated)."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def _registrable_domain(host: str) -> str:
    """The last two labels of a DNS name; an IP address or single label stands for itself.

    Not a public-suffix lookup: good enough to pair `registry-1.docker.io` with
    `auth.docker.io` and `ghcr.io` with itself; anything else is listed in `token_realms`.
    """
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host.lower().rstrip(".").split(".")
    return ".".join(labels[-2:])


def realm_may_receive_credentials(
    realm: str, registry_url: str, extra_hosts: Iterable[str] = ()
) -> bool:
    """May the configured upstream credentials be sent to this token realm?

    Yes only for the registry's own host, a host under its registrable domain, or a host the
    operator listed; and only over https unless the registry itself is configured with http.
    """
    realm_parts = urlsplit(realm)
    registry_parts = urlsplit(registry_url)
    realm_host = (realm_parts.hostname or "").lower()
    registry_host = (registry_parts.hostname or "").lower()
    if not realm_host:
        return False
    if realm_parts.scheme != "https" and not (
        realm_parts.scheme == "http" and registry_parts.scheme == "http"
    ):
        return False
    if realm_host in {h.lower() for h in extra_hosts}:
        return True
    return realm_host == registry_host or _registrable_domain(realm_host) == _registrable_domain(
        registry_host
    )


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires_at: float  # time.monotonic() clock


def token_from_response(body: object, received_at: float) -> Token:
    """Build a Token from a token-service JSON body.

    `issued_at` is ignored: the upstream clock may differ from ours, so the lifetime counts
    from when we received the token, less a margin so it is never used right at its end.
    """
    if not isinstance(body, dict):
        raise ValueError("token response is not a JSON object")
    value = body.get("token") or body.get("access_token")
    if not isinstance(value, str) or not value:
        raise ValueError("token response has no token")
    expires_in = body.get("expires_in", 60)
    if not isinstance(expires_in, int | float) or expires_in <= 0:
        expires_in = 60
    margin = min(30.0, float(expires_in) / 5)
    return Token(value, received_at + float(expires_in) - margin)


TokenKey = tuple[str, str, tuple[str, ...], bool]  # realm, service, scopes, with credentials


class TokenCache:
    """Tokens per (realm, service, scopes, credentialed), each kept until shortly before expiry."""

    def __init__(self, maxsize: int = 4096) -> None:
        self._cache: TLRUCache[TokenKey, Token] = TLRUCache(
            maxsize=maxsize, ttu=lambda _k, v, _now: v.expires_at, timer=time.monotonic
        )

    def get(self, key: TokenKey) -> Token | None:
        return self._cache.get(key)

    def put(self, key: TokenKey, token: Token) -> None:
        self._cache[key] = token

    def drop(self, key: TokenKey) -> None:
        self._cache.pop(key, None)
