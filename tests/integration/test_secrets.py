"""No password, token or Authorization value ever leaves the mirror: not in its logs (debug,
JSON), not in /metrics or the admin API, not in any response body or header."""

from __future__ import annotations

import base64
from pathlib import Path

import aiohttp

from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import small_image
from tests.fixtures.procs import mirror_process
from tests.integration.test_pull_path import ALL_TYPES

CLIENT_PASSWORD = "client-s3cret-pw"


async def test_no_secret_appears_in_logs_metrics_or_answers(hub: FakeHub, tmp_path: Path) -> None:
    hub.add("library/alpine", "3.19", public := small_image("hygiene"))
    hub.add("acme/secret", "v1", private := small_image("hygiene-private"), private=True)
    (tmp_path / "password").write_text(hub.password + "\n")
    (tmp_path / "mirror.toml").write_text('[registries."docker.io"]\nprivate = "passthrough"\n')
    right = "Basic " + base64.b64encode(f"{hub.username}:{hub.password}".encode()).decode()
    wrong = "Basic " + base64.b64encode(f"{hub.username}:{CLIENT_PASSWORD}".encode()).decode()
    seen: list[str] = []
    args = ("--upstream-username", hub.username, "--upstream-password-file",
            str(tmp_path / "password"), "--config", str(tmp_path / "mirror.toml"),
            "--log-level", "debug", "--log-format", "json")  # fmt: skip
    async with (
        mirror_process(tmp_path / "data", hub.registry_url, *args) as mirror,
        aiohttp.ClientSession() as http,
    ):

        async def fetch(path: str, **headers: str) -> None:
            async with http.get(f"{mirror.url}{path}", headers=headers) as resp:
                seen.append(f"{resp.status} {dict(resp.headers)} {await resp.text('latin-1')}")

        await fetch("/v2/")
        await fetch("/v2/library/alpine/manifests/3.19", Accept=ALL_TYPES)
        await fetch(f"/v2/library/alpine/blobs/{public.layers()[0].digest}")
        for auth in (right, wrong):
            await fetch("/v2/acme/secret/manifests/v1", Accept=ALL_TYPES, Authorization=auth)
            await fetch(f"/v2/acme/secret/manifests/{private.digest}", Authorization=auth)
        await fetch("/v2/acme/secret/tags/list", Authorization=wrong)
        await fetch("/v2/nope/manifests/none", Accept=ALL_TYPES, Authorization=wrong)
        await fetch("/metrics")
        async with http.get(f"{mirror.admin}/admin/stats") as resp:
            seen.append(await resp.text())
        async with http.get(f"{mirror.admin}/metrics") as resp:
            seen.append(await resp.text())
    seen.append(mirror.logs())
    assert hub.tokens, "the upstream issued no token: the run exercised nothing"
    secrets = {
        hub.password, CLIENT_PASSWORD, right.split()[1], wrong.split()[1], *hub.tokens,
        base64.b64encode(f"{hub.username}:{hub.password}".encode()).decode(),
    }  # fmt: skip
    everything = "\n".join(seen)
    assert '"status": 200' in mirror.logs() or " 200 " in mirror.logs()
    for secret in secrets:
        assert secret not in everything, f"a secret leaked ({secret[:4]}...)"
    assert "Authorization" not in mirror.logs()
