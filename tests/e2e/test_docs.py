"""The client configuration in docs/clients.md, used verbatim (address filled in) by real clients.

The Docker daemon.json and docker.io hosts.toml snippets are exercised in test_clients.py.
k3s, kind and CRI-O are not run (Debian 12 packages none of them): their tests below say
exactly what stands in for each.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml
from aiohttp.test_utils import TestServer

from mirror.config import RegistryConfig
from tests.conftest import StartMirror
from tests.fixtures.docs import CLIENTS_DOC, snippet, snippets
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import Image, make_image, small_image
from tests.fixtures.podman import podman
from tests.fixtures.procs import (
    containerd,
    ctr_pull,
    hosts_dir,
    make_tls_files,
    mirror_process,
    need,
    run,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def hub_images(hub: FakeHub) -> dict[str, Image]:
    found = {
        "docker.io/library/alpine:3.19": small_image("alpine"),
        "ghcr.io/owner/app:v1": make_image([{"app": b"ghcr app"}], label="ghcr"),
    }
    for ref, image in found.items():
        name, tag = ref.split("/", 1)[1].split(":")
        hub.add(name, tag, image)
    return found


async def start_with_ghcr(hub: FakeHub, start_mirror: StartMirror) -> TestServer:
    """A mirror serving docker.io and a "ghcr.io" (both the fake hub, which holds both names)."""
    ghcr = RegistryConfig("ghcr.io", hub.registry_url, tag_ttl=300)
    return await start_mirror(hub.registry_url, registries=(ghcr,))


async def pull_with_ctr(hosts: Path, *refs_and_images: tuple[str, Image]) -> None:
    async with containerd() as ctd:
        for ref, image in refs_and_images:
            assert image.digest in await ctr_pull(ctd, hosts, ref), ref


def test_every_snippet_in_the_doc_is_tested() -> None:
    tested = {
        "docker-daemon-json", "containerd-hosts-docker-io", "containerd-hosts-ghcr-io",
        "containerd-hosts-tls", "podman-registries-conf", "k3s-registries-yaml",
        "kind-cluster-yaml",
    }  # fmt: skip
    assert set(snippets()) == tested, f"snippets in {CLIENTS_DOC} without a test, or gone"
    # The README's short versions are the doc's, verbatim.
    readme = (CLIENTS_DOC.parents[1] / "README.md").read_text()
    for name in ("docker-daemon-json", "containerd-hosts-docker-io"):
        assert snippets()[name] in readme, f"README's {name} differs from {CLIENTS_DOC.name}"


async def test_containerd_hosts_toml_for_another_registry(
    hub: FakeHub, hub_images: dict[str, Image], start_mirror: StartMirror, tmp_path: Path
) -> None:
    mirror = await start_with_ghcr(hub, start_mirror)
    text = snippet("containerd-hosts-ghcr-io", f"127.0.0.1:{mirror.port}")
    hosts = hosts_dir(tmp_path / "certs.d", "ghcr.io", text)
    await pull_with_ctr(hosts, ("ghcr.io/owner/app:v1", hub_images["ghcr.io/owner/app:v1"]))
    assert any(r.query.get("scope", "").startswith("repository:owner/app") for r in hub.log)


async def test_containerd_hosts_toml_with_tls_and_a_private_ca(
    hub: FakeHub, hub_images: dict[str, Image], tmp_path: Path
) -> None:
    tls = await make_tls_files(tmp_path / "tls")
    args = ("--tls-cert", str(tls.cert), "--tls-key", str(tls.key))
    async with mirror_process(tmp_path / "data", hub.registry_url, *args) as mirror:
        assert mirror.url.startswith("https://")
        text = snippet("containerd-hosts-tls", mirror.url.removeprefix("https://"))
        documented_ca = "/etc/containerd/certs.d/docker.io/mirror-ca.crt"
        assert documented_ca in text
        hosts = hosts_dir(
            tmp_path / "certs.d", "docker.io", text.replace(documented_ca, str(tls.ca))
        )
        await pull_with_ctr(
            hosts, ("docker.io/library/alpine:3.19", hub_images["docker.io/library/alpine:3.19"])
        )
        # Without the CA the same host entry is refused: the pull really went over verified TLS.
        untrusted = hosts_dir(tmp_path / "untrusted", "docker.io",
                                text.replace(f'  ca = "{documented_ca}"\n', ""))  # fmt: skip
        with pytest.raises(AssertionError, match="certificate"):
            await pull_with_ctr(
                untrusted,
                ("docker.io/library/alpine:3.19", hub_images["docker.io/library/alpine:3.19"]),
            )


async def test_podman_registries_conf(
    hub: FakeHub, hub_images: dict[str, Image], start_mirror: StartMirror
) -> None:
    """podman reads the snippet; CRI-O reads the same file through the same library
    (containers/image), but CRI-O itself is not run here (Debian 12 has no package)."""
    mirror = await start_mirror(hub.registry_url)
    conf = snippet("podman-registries-conf", f"127.0.0.1:{mirror.port}")
    image = hub_images["docker.io/library/alpine:3.19"]
    async with podman(conf) as pdm:
        await pdm("pull", "--signature-policy", pdm.policy, "docker.io/library/alpine:3.19")
        digests = await pdm("images", "--digests", "--format", "{{.Digest}}")
    assert image.digest in digests
    assert hub.manifest_gets(), "podman did not pull through the mirror"


@pytest.mark.parametrize("override_path", [False, True], ids=["plain", "override-path"])
async def test_k3s_registries_yaml(
    hub: FakeHub,
    hub_images: dict[str, Image],
    start_mirror: StartMirror,
    tmp_path: Path,
    override_path: bool,
) -> None:
    """k3s is not run (Debian 12 has no package): the YAML is parsed, and containerd pulls
    with the hosts.toml k3s writes from it. k3s's normalizeEndpointAddress
    (pkg/agent/containerd/config.go) turns an endpoint without a path into `<endpoint>/v2`;
    a release that also writes `override_path = true` is covered by the second case."""
    mirror = await start_with_ghcr(hub, start_mirror)
    config = yaml.safe_load(snippet("k3s-registries-yaml", f"127.0.0.1:{mirror.port}"))
    hosts = tmp_path / "certs.d"
    for registry, entry in config["mirrors"].items():
        lines = ['server = "http://127.0.0.1:9"\n']  # not k3s's: a fallback that cannot work
        for endpoint in entry["endpoint"]:
            lines.append(f'[host."{endpoint}/v2"]\n  capabilities = ["pull", "resolve"]\n'
                         + ("  override_path = true\n" if override_path else ""))  # fmt: skip
        hosts_dir(hosts, registry, "".join(lines))
    await pull_with_ctr(hosts, *hub_images.items())


async def test_kind_cluster_yaml(
    hub: FakeHub, hub_images: dict[str, Image], start_mirror: StartMirror, tmp_path: Path
) -> None:
    """kind is not run (Debian 12 has no package): the patch is given to this machine's
    containerd (1.6), which must read config_path from it; the mount's containerPath must be
    that path; containerd pulls with the hosts.toml in the mount's hostPath. That kind applies
    the patch and the mount to its nodes is not tested."""
    mirror = await start_mirror(hub.registry_url)
    cluster = yaml.safe_load(snippets()["kind-cluster-yaml"])  # names no address itself
    (patch,) = cluster["containerdConfigPatches"]
    config_path = tomllib.loads(patch)["plugins"]["io.containerd.grpc.v1.cri"]["registry"][
        "config_path"
    ]
    (mount,) = cluster["nodes"][0]["extraMounts"]
    assert mount["containerPath"] == config_path
    # containerd itself accepts the patch and reads config_path from it.
    need("containerd")
    config = tmp_path / "config.toml"
    config.write_text("version = 2\n" + patch + "\n")
    dump = await run("containerd", "--config", str(config), "config", "dump")
    assert f'config_path = "{config_path}"' in dump
    # The mounted directory holds the documented docker.io hosts.toml; containerd pulls with it.
    host_dir = tmp_path / mount["hostPath"]
    text = snippet("containerd-hosts-docker-io", f"127.0.0.1:{mirror.port}")
    hosts_dir(host_dir, "docker.io", text)
    await pull_with_ctr(
        host_dir, ("docker.io/library/alpine:3.19", hub_images["docker.io/library/alpine:3.19"])
    )
