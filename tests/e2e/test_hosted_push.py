"""Real clients push to a hosted namespace: docker and podman build an image FROM a Docker Hub
image the mirror cached and push it (the base layers are mounted from the cache, only the
team's own layer and config travel); skopeo copies OCI and Docker schema2 images and lists as
they are, and converts OCI ones to Docker schema2 on the way. Each pulls back from a fresh
client store.

Run inside a private network namespace (see README): nothing here may reach a real registry.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    Image,
    make_image,
    multiarch_image,
    random_bytes,
    sha256,
    small_image,
    write_oci_layout,
)
from tests.fixtures.podman import Podman, podman
from tests.fixtures.procs import (
    Service,
    dockerd,
    mirror_process,
    need,
    run,
    skopeo_pull_and_verify,
)
from tests.integration.test_client_auth import basic, write_htpasswd
from tests.integration.test_hosted import hosted_config
from tests.integration.test_observability import Metrics, sample, scrape
from tests.integration.test_pull_path import ALL_TYPES

pytestmark = pytest.mark.e2e

ALICE = ("alice", "wonderland")
MiB = 1 << 20
RECEIVED, MOUNTS, PUSHES = (
    "mirror_hosted_received_bytes_total",
    "mirror_hosted_mounts_total",
    "mirror_hosted_pushes_total",
)


def python_base() -> Image:
    """Docker Hub's `python:3.12` stand-in: two layers of incompressible MiBs and a small one,
    so a base layer uploaded instead of mounted would stand out in the received bytes."""
    return make_image(
        [
            {"usr/lib/libpython3.12.so": random_bytes(MiB, 31)},
            {"usr/lib/python3.12/lib-dynload.so": random_bytes(MiB, 32)},
            {"etc/os-release": b'PRETTY_NAME="Debian GNU/Linux 12"\n'},
        ],
        docker=True,
        label="python",
    )


@asynccontextmanager
async def hosted_mirror(hub: FakeHub, tmp_path: Path) -> AsyncIterator[Service]:
    """A mirror with the hosted namespace `acme` (alice may push) over the fake hub."""
    htpasswd = write_htpasswd(tmp_path, alice=ALICE[1], bob="builder")
    config = hosted_config(tmp_path, htpasswd)
    async with mirror_process(tmp_path / "data", hub.registry_url, "--config", str(config)) as m:
        yield m


def build_context(root: Path, base: str) -> Path:
    """A Dockerfile that adds one layer of the team's own files to `base`; COPY runs no
    container, so it builds without a network."""
    (root / "app").mkdir(parents=True)
    (root / "app" / "main.py").write_text("print('acme app')\n" * 20)
    (root / "Dockerfile").write_text(f"FROM {base}\nCOPY app /app\n")
    return root


async def hosted_manifest(mirror: Service, name: str, ref: str) -> tuple[str, bytes]:
    """The digest and bytes the mirror serves for `name:ref`."""
    headers = {"Authorization": basic(*ALICE), "Accept": ALL_TYPES}
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.get(f"{mirror.url}/v2/{name}/manifests/{ref}") as resp,
    ):
        assert resp.status == 200, await resp.text()
        return resp.headers["Docker-Content-Digest"], await resp.read()


def grown(before: Metrics, after: Metrics, name: str) -> float:
    return sample(after, name) - sample(before, name)


def assert_only_own_layer_uploaded(
    base: Image, manifest: bytes, before: Metrics, after: Metrics
) -> None:
    """The pushed manifest names the base's compressed layers unchanged (mounted, one count
    each) and one layer of the team's; the mirror received exactly that layer and the config."""
    doc = json.loads(manifest)
    layers = [layer["digest"] for layer in doc["layers"]]
    assert layers[: len(base.layers())] == [layer.digest for layer in base.layers()], doc
    assert len(layers) == len(base.layers()) + 1, doc
    own = doc["layers"][-1]["size"] + doc["config"]["size"]
    assert grown(before, after, MOUNTS) == len(base.layers())
    assert grown(before, after, RECEIVED) == own
    assert own < sum(len(layer.data) for layer in base.layers()) / 50
    assert grown(before, after, PUSHES) == 1


@dataclass(frozen=True)
class DockerCli:
    daemon: str
    env: dict[str, str]

    async def __call__(self, *args: str) -> str:
        return await run("docker", "-H", self.daemon, *args, env=self.env)

    async def login(self, host: str) -> None:
        """`docker login HOST -u alice --password-stdin`, the way CI scripts log in."""
        proc = await asyncio.create_subprocess_exec(
            "docker", "-H", self.daemon, "login", host, "-u", ALICE[0], "--password-stdin",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=self.env,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(ALICE[1].encode()), 60)
        assert proc.returncode == 0, out.decode(errors="replace")

    async def inspect(self, ref: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = json.loads(await self("image", "inspect", ref))
        return found[0]


@asynccontextmanager
async def docker_for(mirror: Service, workdir: Path) -> AsyncIterator[DockerCli]:
    """A Docker daemon of its own (data root, logins) that trusts the mirror over plain http,
    logged in to it as alice."""
    host = mirror.url.removeprefix("http://")
    config = workdir / "docker-config"  # no logins from the machine's own config
    config.mkdir(parents=True)
    env = {**os.environ, "DOCKER_CONFIG": str(config), "DOCKER_BUILDKIT": "0"}
    async with dockerd(json.dumps({"insecure-registries": [host]})) as daemon:
        docker = DockerCli(daemon.address, env)
        await docker.login(host)
        yield docker


async def test_docker_push_mounts_the_cached_base_and_uploads_only_the_teams_layer(
    hub: FakeHub, tmp_path: Path
) -> None:
    """dockerd remembers where it pulled each layer from: for a base layer it asks the target
    repository (HEAD, 404), then mounts it `from=library/python` (201) and names the same
    compressed digest in its manifest. Its own layer (gzip'd by dockerd) and the config it
    uploads once each (POST, PATCH, PUT): the received bytes are exactly those two blobs."""
    base = python_base()
    hub.add("library/python", "3.12", base)
    async with hosted_mirror(hub, tmp_path) as mirror:
        host = mirror.url.removeprefix("http://")
        app = f"{host}/acme/app:1"
        async with docker_for(mirror, tmp_path / "builder") as docker:
            await docker("pull", f"{host}/library/python:3.12")
            context = build_context(tmp_path / "context", f"{host}/library/python:3.12")
            await docker("build", "--tag", app, str(context))
            before = await scrape(mirror.url)
            await docker("push", app)
            after = await scrape(mirror.url)
            built = await docker.inspect(app)
        digest, manifest = await hosted_manifest(mirror, "acme/app", "1")
        assert json.loads(manifest)["mediaType"] == DOCKER_MANIFEST
        assert_only_own_layer_uploaded(base, manifest, before, after)
        assert json.loads(manifest)["config"]["digest"] == built["Id"]

        async with docker_for(mirror, tmp_path / "puller") as docker:
            await docker("pull", app)
            pulled = await docker.inspect(app)
    assert pulled["Id"] == built["Id"]
    assert pulled["RootFS"] == built["RootFS"]
    assert f"{host}/acme/app@{digest}" in pulled["RepoDigests"]
    assert not [r for r in hub.log if "acme" in r.path], "a hosted name reached upstream"


async def podman_answer(pdm: Podman, *args: str) -> str:
    """podman's answer, without the warnings it may print first (no systemd here)."""
    return (await pdm(*args)).strip().splitlines()[-1]


async def test_podman_push_mounts_the_cached_base_and_uploads_only_the_teams_layer(
    hub: FakeHub, tmp_path: Path
) -> None:
    """podman's build names the base layers by their uncompressed digests; on push, its blob
    info cache knows their compressed digests were pulled from `library/python` on this
    registry, and it mounts those (201) instead of compressing and uploading the layers."""
    base = python_base()
    hub.add("library/python", "3.12", base)
    creds = ("--tls-verify=false", "--creds", ":".join(ALICE))
    inspect = ("image", "inspect", "--format", "{{.Id}} {{json .RootFS.Layers}}")
    async with hosted_mirror(hub, tmp_path) as mirror:
        host = mirror.url.removeprefix("http://")
        app = f"{host}/acme/app:1"
        digest_file = tmp_path / "pushed-digest"
        async with podman() as pdm:
            await pdm("pull", *creds, f"{host}/library/python:3.12")
            context = build_context(tmp_path / "context", f"{host}/library/python:3.12")
            await pdm("build", "--pull=never", "--network=none", "--tag", app, str(context))
            before = await scrape(mirror.url)
            await pdm("push", *creds, "--digestfile", str(digest_file), app)
            after = await scrape(mirror.url)
            built = await podman_answer(pdm, *inspect, app)
        digest, manifest = await hosted_manifest(mirror, "acme/app", "1")
        assert digest_file.read_text().strip() == digest == sha256(manifest)
        assert_only_own_layer_uploaded(base, manifest, before, after)
        assert f"sha256:{built.split()[0]}" == json.loads(manifest)["config"]["digest"]

        async with podman() as pdm:
            await pdm("pull", *creds, app)
            pulled = await podman_answer(pdm, *inspect, app)
            pulled_digest = await podman_answer(pdm, "image", "inspect", "--format",
                                                "{{.Digest}}", app)  # fmt: skip
    assert pulled == built
    assert pulled_digest == digest
    assert not [r for r in hub.log if "acme" in r.path], "a hosted name reached upstream"


def write_dir_layout(path: Path, image: Image) -> Path:
    """`image` as skopeo's `dir:` transport keeps it: the top manifest, each child manifest as
    `<hex>.manifest.json`, each blob by its hex digest. skopeo 1.9 reads only OCI media types
    from an OCI layout; from `dir:` it copies Docker manifests and lists byte for byte."""
    path.mkdir(parents=True)
    (path / "version").write_text("Directory Transport Version: 1.1\n")
    (path / "manifest.json").write_bytes(image.top.data)
    for digest, manifest in image.manifests.items():
        if digest != image.digest:
            (path / f"{digest[7:]}.manifest.json").write_bytes(manifest.data)
    for digest, blob in image.blobs.items():
        (path / digest[7:]).write_bytes(blob.data)
    return path


@pytest.mark.parametrize("kind", ["oci-index", "docker-manifest", "docker-list"])
async def test_skopeo_copies_images_to_the_mirror_and_back_byte_for_byte(
    hub: FakeHub, tmp_path: Path, kind: str
) -> None:
    """`skopeo copy --all --preserve-digests`: every manifest is pushed as it is, every blob is
    uploaded (nothing to mount), and all of it pulls back unchanged."""
    need("skopeo")
    if kind == "oci-index":
        image = multiarch_image("acme-tools")
        source = f"oci:{write_oci_layout(tmp_path / 'layout', image, '1')}:1"
    else:
        image = (
            small_image("acme-tools", docker=True, layers=3)
            if kind == "docker-manifest"
            else multiarch_image("acme-tools", docker=True)
        )
        source = f"dir:{write_dir_layout(tmp_path / 'layout', image)}"
    async with hosted_mirror(hub, tmp_path) as mirror:
        host = mirror.url.removeprefix("http://")
        before = await scrape(mirror.url)
        await run(
            "skopeo", "--insecure-policy", "copy", "--all", "--preserve-digests",
            "--dest-tls-verify=false", "--dest-creds", ":".join(ALICE),
            source, f"docker://{host}/acme/tools:1",
        )  # fmt: skip
        after = await scrape(mirror.url)
        await skopeo_pull_and_verify(f"{host}/acme/tools:1", tmp_path / "pulled", image)
        digest, _ = await hosted_manifest(mirror, "acme/tools", "1")
    assert digest == image.digest
    assert grown(before, after, RECEIVED) == image.blob_bytes
    assert grown(before, after, MOUNTS) == 0
    assert grown(before, after, PUSHES) == len(image.manifests)  # a list and its images: each
    assert not [r for r in hub.log if "acme" in r.path], "a hosted name reached upstream"


@pytest.mark.parametrize("kind", ["image", "index"])
async def test_skopeo_converts_an_oci_image_to_docker_schema2_on_its_push(
    hub: FakeHub, tmp_path: Path, kind: str
) -> None:
    """`--format v2s2` rewrites the manifests (Docker media types, so new digests) and keeps
    every config and layer as they are (uploaded, not recompressed): the mirror takes the
    converted manifests and serves them back."""
    need("skopeo")
    image = small_image("acme-v2s2") if kind == "image" else multiarch_image("acme-v2s2")
    layout = write_oci_layout(tmp_path / "layout", image, "1")
    digest_file = tmp_path / "pushed-digest"
    async with hosted_mirror(hub, tmp_path) as mirror:
        host = mirror.url.removeprefix("http://")
        before = await scrape(mirror.url)
        await run(
            "skopeo", "--insecure-policy", "copy", "--all", "--format", "v2s2",
            "--dest-tls-verify=false", "--dest-creds", ":".join(ALICE),
            "--digestfile", str(digest_file), f"oci:{layout}:1", f"docker://{host}/acme/v2s2:1",
        )  # fmt: skip
        after = await scrape(mirror.url)
        digest, top = await hosted_manifest(mirror, "acme/v2s2", "1")
        out = tmp_path / "pulled"
        await run(
            "skopeo", "--insecure-policy", "copy", "--all", "--preserve-digests",
            "--src-tls-verify=false", f"docker://{host}/acme/v2s2:1", f"dir:{out}",
        )  # fmt: skip
    assert digest_file.read_text().strip() == digest == sha256(top)
    assert (out / "manifest.json").read_bytes() == top
    assert grown(before, after, RECEIVED) == image.blob_bytes
    assert grown(before, after, PUSHES) == len(image.manifests)
    doc = json.loads(top)
    converted = {"amd64": doc}
    if kind == "index":
        assert doc["mediaType"] == DOCKER_LIST
        converted = {}
        for entry in doc["manifests"]:
            child = (out / f"{entry['digest'][7:]}.manifest.json").read_bytes()
            assert sha256(child) == entry["digest"]
            converted[entry["platform"]["architecture"]] = json.loads(child)
        assert list(converted) == ["amd64", "arm64"]
    for arch, manifest in converted.items():
        original = json.loads(image.platform_manifest(arch).data)
        assert manifest["mediaType"] == DOCKER_MANIFEST
        assert manifest["config"]["digest"] == original["config"]["digest"]
        assert [layer["digest"] for layer in manifest["layers"]] == [
            layer["digest"] for layer in original["layers"]
        ]
    for blob in image.blobs.values():
        assert (out / blob.digest[7:]).read_bytes() == blob.data
