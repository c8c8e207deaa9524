"""Who may push to and pull from a hosted namespace, checked on every request.

Pushing always needs a mirror user (`auth_htpasswd`) named in the namespace's `push` list
(or any user when the list is not given); pulling needs what the namespace's `pull` says.
No or wrong credentials get 401 with the Basic challenge, so a client that did not send any
logs in and retries; a known user without the right gets 403 DENIED, which no retry fixes.
"""

from __future__ import annotations

from collections.abc import Mapping

from mirror.clientauth import ClientAuth
from mirror.config import ANYONE, ConfigError, HostedConfig
from mirror.errors import RegistryError
from mirror.visibility import CHALLENGE


def check_hosted_users(namespaces: Mapping[str, HostedConfig], users: frozenset[str]) -> None:
    """Refuse a `push` or `pull` list naming someone auth_htpasswd does not know: a typo
    would silently lock the right person out (or in, once someone of that name is added)."""
    for name, rules in namespaces.items():
        for setting, listed in (("push", rules.push), ("pull", rules.pull)):
            if isinstance(listed, frozenset) and (unknown := sorted(listed - users)):
                raise ConfigError(
                    f'hosted."{name}".{setting}: {", ".join(unknown)} not in auth_htpasswd'
                )


def namespace_of(repository: str) -> str:
    return repository.split("/", 1)[0]


class HostedAccess:
    def __init__(self, namespaces: Mapping[str, HostedConfig], auth: ClientAuth) -> None:
        self._namespaces = namespaces
        self._auth = auth

    @property
    def restricted(self) -> bool:
        """Does some namespace limit who may pull?"""
        return any(rules.pull != ANYONE for rules in self._namespaces.values())

    def rules(self, repository: str) -> HostedConfig:
        return self._namespaces[namespace_of(repository)]

    def listed_to_anyone(self, repository: str) -> bool:
        """For pages that know no user: may anyone pull it? (False for a namespace no longer
        configured: its rows stay in the index, unreachable.)"""
        rules = self._namespaces.get(namespace_of(repository))
        return rules is not None and rules.pull == ANYONE

    async def may_pull(self, repository: str, authorization: str | None) -> bool:
        """For listings (the catalog): would a pull be let in? Never raises."""
        rules = self._namespaces.get(namespace_of(repository))
        return rules is not None and rules.may_pull(await self._auth.identify(authorization))

    async def pull(self, repository: str, authorization: str | None) -> None:
        rules = self.rules(repository)
        user = await self._auth.identify(authorization)
        if rules.may_pull(user):
            return
        if user is None:
            raise _login_needed(authorization)
        raise RegistryError.denied(f"{user} may not pull from {rules.name}")

    async def push(self, repository: str, authorization: str | None) -> str:
        """The user pushing; raises unless that user may push to the repository."""
        rules = self.rules(repository)
        user = await self._auth.identify(authorization)
        if user is None:
            raise _login_needed(authorization)
        if not rules.may_push(user):
            raise RegistryError.denied(f"{user} may not push to {rules.name}")
        return user


def _login_needed(authorization: str | None) -> RegistryError:
    message = "authentication required" if authorization is None else "wrong username or password"
    return RegistryError(401, "UNAUTHORIZED", message, headers=CHALLENGE)
