"""The protocol-level hit path answers exactly like the full path, and hands over cleanly."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import aiohttp
from yarl import URL

from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import OCI_MANIFEST, Blob, Image, small_image
from tests.fixtures.procs import memory_mib, mirror_process
from tests.integration.test_pull_path import ALL_TYPES

SAME = ("Content-Type", "Content-Length", "Docker-Content-Digest", "ETag")


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines if line)
    body = await reader.readexactly(int(headers.get("Content-Length", "0")))
    return status.encode(), headers, body


async def test_hits_from_memory_match_the_full_path(hub: FakeHub, tmp_path: Path) -> None:
    image = small_image("hits")
    hub.add("team/app", "v1", image)
    layer = image.layers()[0]
    async with mirror_process(tmp_path / "data", hub.registry_url, "--workers", "1") as mirror:
        url = f"{mirror.url}/v2/team/app/manifests"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/v1", headers={"Accept": ALL_TYPES}) as first:
                assert first.headers["X-Mirror-Cache"] == "miss"
            async with http.get(f"{url}/{image.digest}", headers={"Accept": ALL_TYPES}) as hit:
                hit_body, hit_headers = await hit.read(), hit.headers
            # A conditional request takes the full path: a 304 there, and with another ETag a 200.
            full_headers = {"Accept": ALL_TYPES, "If-None-Match": '"sha256:other"'}
            async with http.get(f"{url}/{image.digest}", headers=full_headers) as full:
                full_body = await full.read()
                assert full.status == 200
                assert all(hit_headers[h] == full.headers[h] for h in SAME)
            async with http.get(
                f"{url}/{image.digest}", headers={"If-None-Match": f'"{image.digest}"'}
            ) as cond:
                assert cond.status == 304
            async with http.head(f"{url}/v1", headers={"Accept": ALL_TYPES}) as head:
                assert head.status == 200 and head.headers["X-Mirror-Cache"] == "hit"
                assert head.headers["Content-Length"] == str(len(image.top.data))
        assert hit_body == full_body == image.top.data
        assert hit_headers["X-Mirror-Cache"] == "hit"

        # Pipelined on one connection: two hits, then a blob (handed to aiohttp), in order.
        host, port = mirror.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        path = "/v2/team/app"
        writer.write(
            (f"GET {path}/manifests/v1 HTTP/1.1\r\nHost: m\r\nAccept: {ALL_TYPES}\r\n\r\n"
             f"GET {path}/manifests/{image.digest} HTTP/1.1\r\nHost: m\r\n"
             f"Accept: {ALL_TYPES}\r\n\r\n"
             f"GET {path}/blobs/{layer.digest} HTTP/1.1\r\nHost: m\r\n\r\n").encode()
        )  # fmt: skip
        answers = [await read_response(reader) for _ in range(3)]
        writer.close()
        assert [a[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 3
        assert answers[0][2] == answers[1][2] == image.top.data
        assert answers[2][2] == layer.data
        async with aiohttp.ClientSession() as http, http.get(f"{mirror.url}/metrics") as r:
            metrics = await r.text()
        hits = [line for line in metrics.splitlines() if 'result="hit"' in line]
        assert 'mirror_requests_total{kind="manifest",method="GET",result="hit"} 5.0' in hits, hits


async def test_unusual_requests_take_the_full_path(hub: FakeHub, tmp_path: Path) -> None:
    image = small_image("unusual")
    hub.add("team/app", "v1", image)
    async with mirror_process(tmp_path / "data", hub.registry_url, "--workers", "1") as mirror:
        url = f"{mirror.url}/v2/team/app/manifests/{image.digest}"
        async with aiohttp.ClientSession() as http:
            async with http.get(url, headers={"Accept": ALL_TYPES}) as warm:
                assert warm.status == 200
            # A client that takes no OCI manifest: negotiation still refuses it, via the full path.
            async with http.get(url, headers={"Accept": "application/json"}) as narrow:
                assert narrow.status == 404
            # Percent-encoding is left to aiohttp's router (the hit path never decodes): the
            # decoded name is the same repository.
            encoded_url = URL(url.replace("team/app", "team%2Fapp"), encoded=True)
            async with http.get(encoded_url, headers={"Accept": ALL_TYPES}) as encoded:
                assert encoded.status == 200
                assert encoded.headers["Docker-Content-Digest"] == image.digest
            async with http.put(url, data=b"x") as write:
                assert write.status == 405


async def test_a_manifest_media_type_cannot_inject_headers_on_either_path(
    hub: FakeHub, tmp_path: Path
) -> None:
    """An upstream that labels a manifest `application/json` makes the mirror read the type
    from the JSON; a CR/LF there must never reach a response head (memory hit or not)."""
    doc = {"schemaVersion": 2, "mediaType": "application/x\r\nX-Injected: yes", "layers": []}
    top = Blob("application/json", json.dumps(doc).encode())
    hub.add("team/inject", "v1", Image(top=top, manifests={top.digest: top}))
    async with mirror_process(tmp_path / "data", hub.registry_url, "--workers", "1") as mirror:
        url = f"{mirror.url}/v2/team/inject/manifests/{top.digest}"
        seen = []
        async with aiohttp.ClientSession() as http:
            for _ in range(3):  # a miss, then hits from memory
                async with http.get(url, headers={"Accept": ALL_TYPES}) as resp:
                    assert resp.status == 200 and await resp.read() == top.data
                    seen.append((resp.headers["X-Mirror-Cache"], resp.headers.copy()))
    assert [cache for cache, _ in seen] == ["miss", "hit", "hit"]
    for _, headers in seen:
        assert "X-Injected" not in headers
        assert headers["Content-Type"] == OCI_MANIFEST


async def test_pipelined_hits_a_client_does_not_read_cannot_fill_memory(
    hub: FakeHub, tmp_path: Path
) -> None:
    """1,000 pipelined GETs of a 1 MiB manifest held in memory, never read: a few request
    bytes must not each buy a whole manifest of the worker's memory."""
    base = small_image("pipelined")
    doc = json.loads(base.top.data)
    doc["annotations"] = {"pad": "x" * (1 << 20)}
    top = Blob(OCI_MANIFEST, json.dumps(doc).encode())
    hub.add("team/pipe", "v1", Image(top=top, manifests={top.digest: top}, blobs=base.blobs))
    async with mirror_process(tmp_path / "data", hub.registry_url, "--workers", "1") as mirror:
        path = f"/v2/team/pipe/manifests/{top.digest}"
        async with aiohttp.ClientSession() as http:
            for _ in range(2):  # the second is a memory hit
                async with http.get(mirror.url + path, headers={"Accept": ALL_TYPES}) as resp:
                    assert resp.status == 200 and await resp.read() == top.data
        before = memory_mib(mirror.proc.pid)
        host, port = mirror.url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: m\r\nAccept: {ALL_TYPES}\r\n\r\n".encode() * 1000
        )
        await asyncio.sleep(2)
        after = memory_mib(mirror.proc.pid)
        async with (
            aiohttp.ClientSession() as http,  # everyone else is still served
            http.get(mirror.url + path, headers={"Accept": ALL_TYPES}) as resp,
        ):
            assert resp.status == 200
        sock.close()
    assert after - before < 20, f"RSS grew {after - before:.0f} MiB for one unread connection"


async def test_private_content_held_in_memory_is_not_served(hub: FakeHub, tmp_path: Path) -> None:
    image = small_image("secret-hit")
    hub.add("acme/secret", "v1", image, private=True)
    password = tmp_path / "password"
    password.write_text(hub.password)
    creds = ("--upstream-username", hub.username, "--upstream-password-file", str(password))
    async with (
        mirror_process(tmp_path / "data", hub.registry_url, "--workers", "1", *creds) as m,
        aiohttp.ClientSession() as http,
    ):
        pin = await http.post(f"{m.admin}/admin/pin", json={"image": "acme/secret:v1"})
        assert pin.status == 200, await pin.text()  # manifests now in the worker's memory
        for ref in ("v1", image.digest, image.digest):
            async with http.get(
                f"{m.url}/v2/acme/secret/manifests/{ref}", headers={"Accept": ALL_TYPES}
            ) as resp:
                assert resp.status == 401, ref
                assert image.top.data not in await resp.read()


async def test_a_tls_hello_on_the_plain_port_is_refused_at_once(
    hub: FakeHub, tmp_path: Path
) -> None:
    """skopeo and podman try TLS first against an `insecure` registry; they must be told no
    at once (aiohttp's 400), not left waiting for a request head that never comes."""
    async with mirror_process(tmp_path / "data", hub.registry_url, "--workers", "1") as mirror:
        host, port = mirror.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32)
        answer = await asyncio.wait_for(reader.read(100), timeout=2)
        writer.close()
    assert answer.split(b" ", 2)[1] == b"400", answer
