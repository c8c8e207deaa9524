"""Who may use the mirror at all: an optional htpasswd file (bcrypt entries, as `htpasswd -B`
and distribution's own htpasswd auth write them) gating every `/v2/` request.

bcrypt is slow on purpose (tens of milliseconds a check), and a pull is dozens of requests, so
a verified Authorization header is remembered for `REMEMBER` seconds under its SHA-256 — the
header itself is never kept.
"""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt
from cachetools import TTLCache

from mirror.config import ConfigError
from mirror.errors import RegistryError
from mirror.visibility import CHALLENGE, basic_credentials

REMEMBER = 300.0
BCRYPT_THREADS = 2
BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")


def load_htpasswd(path: Path) -> dict[str, bytes]:
    """user -> bcrypt hash; any other hash scheme is refused at start, naming the line."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"auth_htpasswd: cannot read {path}: {exc.strerror}") from exc
    users: dict[str, bytes] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not hashed.startswith(BCRYPT_PREFIXES):
            raise ConfigError(
                f"auth_htpasswd: {path} line {number}: only bcrypt entries (htpasswd -B) are "
                "accepted"
            )
        users[user] = hashed.encode()
    if not users:
        raise ConfigError(f"auth_htpasswd: {path} has no users")
    return users


class ClientAuth:
    def __init__(self, users: dict[str, bytes] | None, anonymous_pull: bool) -> None:
        self._users = users
        self.anonymous_pull = anonymous_pull
        self._verified: TTLCache[str, str] = TTLCache(maxsize=10_000, ttl=REMEMBER)
        # bcrypt gets threads of its own: a flood of distinct logins (anyone can send them)
        # then queues here instead of in the default pool, where blob commits fsync.
        self._bcrypt = ThreadPoolExecutor(max_workers=BCRYPT_THREADS, thread_name_prefix="bcrypt")

    @property
    def anonymous_allowed(self) -> bool:
        """May a request without credentials go on (to public content)?"""
        return self._users is None or self.anonymous_pull

    @property
    def challenges(self) -> bool:
        """Should `/v2/` ask for credentials? Not when anonymous clients may pull anyway: the
        Docker daemon answers a mirror's challenge with the user's Docker Hub login (moby#42022),
        which no mirror user has, and on a refusal it skips the mirror for Docker Hub."""
        return self._users is not None and not self.anonymous_pull

    @property
    def users(self) -> frozenset[str]:
        return frozenset(self._users or ())

    async def check(self, authorization: str | None) -> None:
        """Raise 401 with a Basic challenge unless the request may proceed.

        With `anonymous_pull`, credentials that match no mirror user are those of an anonymous
        client (a Docker Hub login sent along, say), never a reason to refuse."""
        if self._users is None:
            return
        if authorization is None:
            if self.anonymous_pull:
                return
            raise RegistryError(401, "UNAUTHORIZED", "authentication required", headers=CHALLENGE)
        if await self.identify(authorization) is None and not self.anonymous_pull:
            raise RegistryError(
                401, "UNAUTHORIZED", "wrong username or password", headers=CHALLENGE
            )

    async def identify(self, authorization: str | None) -> str | None:
        """The mirror user these credentials prove, or None (none sent, or wrong)."""
        if self._users is None or authorization is None:
            return None
        key = hashlib.sha256(authorization.encode()).hexdigest()
        user = self._verified.get(key)
        if user is None:
            user = await asyncio.get_running_loop().run_in_executor(
                self._bcrypt, self._verify, authorization
            )
            self._verified[key] = user
        return user or None

    def _verify(self, authorization: str) -> str:
        """The user name if the password matches, else ""."""
        assert self._users is not None
        credentials = basic_credentials(authorization)
        if credentials is None:
            return ""
        hashed = self._users.get(credentials[0])
        if hashed is not None and bcrypt.checkpw(credentials[1].encode(), hashed):
            return credentials[0]
        return ""
