"""`--auth-htpasswd`: only the mirror's own users pull; `--anonymous-pull` lets others in too."""

from __future__ import annotations

import base64
from pathlib import Path

import aiohttp
import bcrypt
import pytest

from mirror.clientauth import load_htpasswd
from mirror.config import ConfigError, load_config
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import small_image
from tests.fixtures.procs import mirror_process
from tests.integration.test_pull_path import ALL_TYPES


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def write_htpasswd(tmp_path: Path, **users: str) -> Path:
    path = tmp_path / "htpasswd"
    path.write_text(
        "".join(
            f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
            for u, p in users.items()
        )
    )
    return path


async def statuses(url: str, *authorizations: str | None) -> list[int]:
    found = []
    for authorization in authorizations:  # each on a fresh connection, as new clients would be
        headers = {
            "Accept": ALL_TYPES,
            **({"Authorization": authorization} if authorization else {}),
        }
        async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
            found.append(resp.status)
            if resp.status == 401:
                assert resp.headers["WWW-Authenticate"].startswith("Basic")
    return found


@pytest.mark.parametrize("anonymous", [False, True], ids=["users-only", "anonymous-pull"])
async def test_htpasswd_gates_every_request(hub: FakeHub, tmp_path: Path, anonymous: bool) -> None:
    image = small_image("gated")
    hub.add("library/alpine", "3.19", image)
    htpasswd = write_htpasswd(tmp_path, alice="wonderland")
    extra = ("--auth-htpasswd", str(htpasswd), *(["--anonymous-pull"] if anonymous else []))
    async with mirror_process(tmp_path / "data", hub.registry_url, "--workers", "1", *extra) as m:
        url = f"{m.url}/v2/library/alpine/manifests/{image.digest}"
        alice, wrong = basic("alice", "wonderland"), basic("alice", "queen")
        # Twice each: the second anonymous request would be a memory hit.
        hub_login = basic("hubuser", "a Docker Hub password")
        got = await statuses(url, alice, alice, None, None, wrong, hub_login)
        if anonymous:  # a login that matches no mirror user is an anonymous client's
            assert got == [200, 200, 200, 200, 200, 200]
            assert await statuses(f"{m.url}/v2/", None, alice, wrong) == [200, 200, 200]
        else:
            assert got == [200, 200, 401, 401, 401, 401]
            assert await statuses(f"{m.url}/v2/", None, alice, wrong) == [401, 200, 401]


def test_htpasswd_accepts_bcrypt_only_and_not_with_passthrough(tmp_path: Path) -> None:
    (tmp_path / "md5").write_text("bob:$apr1$abc$def\n")
    with pytest.raises(ConfigError, match="line 1: only bcrypt"):
        load_htpasswd(tmp_path / "md5")
    good = write_htpasswd(tmp_path, bob="pw")
    assert set(load_htpasswd(good)) == {"bob"}
    (tmp_path / "m.toml").write_text('[registries."docker.io"]\nprivate = "passthrough"\n')
    with pytest.raises(ConfigError, match="passthrough"):
        load_config({"auth_htpasswd": str(good)}, {}, str(tmp_path / "m.toml"))
    config = load_config({}, {"MIRROR_AUTH_HTPASSWD": str(good), "MIRROR_ANONYMOUS_PULL": "yes"})
    assert config.anonymous_pull and config.auth_htpasswd == good
    with pytest.raises(ConfigError, match="anonymous_pull"):
        load_config({}, {"MIRROR_ANONYMOUS_PULL": "maybe"})
