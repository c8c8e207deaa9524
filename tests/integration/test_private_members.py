"""`private = "members"`: what only the mirror's own upstream credentials can read goes to the
mirror's logged-in users (as a `members` table allows), never to anonymous clients."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from mirror.config import ConfigError, load_config
from mirror.visibility import members_allow
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import small_image
from tests.fixtures.procs import mirror_process, skopeo_pull_and_verify
from tests.integration.test_client_auth import basic, write_htpasswd
from tests.integration.test_pull_path import ALL_TYPES


def test_members_rules_first_matching_repository_pattern_decides() -> None:
    rules = (("acme/secret-*", ("alice",)), ("acme/*", ("alice", "team-*")))
    assert members_allow(rules, "acme/secret-plans", "alice")
    assert not members_allow(rules, "acme/secret-plans", "team-ci")
    assert members_allow(rules, "acme/app", "team-ci")
    assert not members_allow(rules, "acme/app", "bob")
    assert members_allow(rules, "other/thing", "bob")  # no rule: every mirror user
    assert not members_allow((("acme/*", ("Alice",)),), "acme/app", "alice")


def test_members_needs_users_and_upstream_credentials(tmp_path: Path) -> None:
    htpasswd = write_htpasswd(tmp_path, alice="wonderland")
    secret = tmp_path / "password"
    secret.write_text("hubpass")
    config = tmp_path / "m.toml"
    config.write_text(
        '[registries."docker.io"]\nprivate = "members"\n'
        '[registries."docker.io".members]\n"acme/*" = ["alice", "team-*"]\n'
    )
    creds = {"upstream_username": "hubuser", "upstream_password_file": str(secret)}
    loaded = load_config({**creds, "auth_htpasswd": str(htpasswd)}, {}, str(config))
    hub = loaded.registries["docker.io"]
    assert hub.private == "members" and hub.members == (("acme/*", ("alice", "team-*")),)
    with pytest.raises(ConfigError, match="set auth_htpasswd"):
        load_config(creds, {}, str(config))
    with pytest.raises(ConfigError, match="needs the registry's credentials"):
        load_config({"auth_htpasswd": str(htpasswd)}, {}, str(config))
    config.write_text('[registries."docker.io"]\nmembers = {"acme/*" = ["alice"]}\n')
    with pytest.raises(ConfigError, match='only with private = "members"'):
        load_config({**creds, "auth_htpasswd": str(htpasswd)}, {}, str(config))


async def test_private_upstream_images_go_to_listed_mirror_users_only(
    hub: FakeHub, tmp_path: Path
) -> None:
    secret = small_image("org-private")
    public = small_image("org-public")
    hub.add("acme/secret", "v1", secret, private=True)
    hub.add("library/alpine", "3.19", public)
    htpasswd = write_htpasswd(tmp_path, alice="wonderland", bob="builder", **{"team-ci": "ci"})
    config = tmp_path / "mirror.toml"
    config.write_text(
        f'auth_htpasswd = "{htpasswd}"\nanonymous_pull = true\n'
        '[registries."docker.io"]\nprivate = "members"\n'
        '[registries."docker.io".members]\n"acme/*" = ["alice", "team-*"]\n'
    )
    password = tmp_path / "password"
    password.write_text(hub.password)
    async with mirror_process(
        tmp_path / "data", hub.registry_url, "--config", str(config), "--upstream-username",
        hub.username, "--upstream-password-file", str(password),
    ) as m:  # fmt: skip
        host = m.url.removeprefix("http://")
        await skopeo_pull_and_verify(
            f"{host}/acme/secret:v1", tmp_path / "alice", secret, creds="alice:wonderland"
        )
        await skopeo_pull_and_verify(f"{host}/library/alpine:3.19", tmp_path / "anyone", public)
        layer = secret.layers()[0].digest
        urls = [
            f"{m.url}/v2/acme/secret/manifests/v1",
            f"{m.url}/v2/acme/secret/manifests/{secret.digest}",
            f"{m.url}/v2/acme/secret/blobs/{layer}",
        ]
        for authorization, status in (
            (None, 401),
            (basic("alice", "queen"), 401),
            (basic("bob", "builder"), 403),
            (basic("team-ci", "ci"), 200),
            (basic("alice", "wonderland"), 200),
        ):
            headers = {"Accept": ALL_TYPES}
            if authorization:
                headers["Authorization"] = authorization
            for url in urls:
                async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
                    assert resp.status == status, (url, authorization, await resp.text())
                    if status == 401:
                        assert resp.headers["WWW-Authenticate"].startswith("Basic")
                    if status == 403:
                        assert (await resp.json())["errors"][0]["code"] == "DENIED"
        # By digest under a public name, the private layer stays unknown to everyone.
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{m.url}/v2/library/alpine/blobs/{layer}") as resp,
        ):
            assert resp.status == 404
