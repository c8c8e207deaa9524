"""The web page over HTTP: what it lists, who sees what, the admin buttons, the history."""

from __future__ import annotations

import re
from html import unescape
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import StartAdmin, StartMirror
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import make_image, multiarch_image, small_image
from tests.integration.test_client_auth import basic, write_htpasswd
from tests.integration.test_pull_path import mirror_url, pull

CREDS = {"username": "hubuser", "password": "hubpass"}

pytestmark = pytest.mark.backends("local", "s3")


async def page(http: aiohttp.ClientSession, url: str, status: int = 200) -> str:
    async with http.get(url) as resp:
        assert resp.status == status, await resp.text()
        assert resp.content_type == "text/html"
        assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
        return await resp.text()


def listed(html: str) -> list[str]:
    """`name:tag` of each image row, in order."""
    rows = re.findall(r'<tr class="image"><td>([^<]*)</td><td class="tag"><a [^>]*>([^<]*)<', html)
    return [f"{unescape(name)}:{unescape(tag)}" for name, tag in rows]


async def test_page_lists_pulled_images_with_platforms_sizes_and_search(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    hub.add("library/alpine", "3.19", small_image("alpine"))
    hub.add("team/app", "v1", multiarch_image("app"))
    for n in range(60):
        hub.add("team/many", f"t{n:02d}", small_image("many"))
    server = await start_mirror(hub.registry_url)
    base = mirror_url(server)
    assert listed(await page(http, f"{base}/")) == []
    await pull(http, base, "library/alpine", "3.19")
    await pull(http, base, "team/app", "v1")
    for n in range(60):
        async with http.get(f"{base}/v2/team/many/manifests/t{n:02d}") as resp:
            assert resp.status == 200

    front = await page(http, f"{base}/")
    assert '<p id="count">62 images</p>' in front
    assert listed(front)[:2] == ["library/alpine:3.19", "team/app:v1"]
    assert len(listed(front)) == 50 and 'rel="next"' in front
    second = await page(http, f"{base}/?page=2")
    assert listed(second) == [f"team/many:t{n:02d}" for n in range(48, 60)]
    app_row = next(r for r in front.split('<tr class="image">') if r.startswith("<td>team/app<"))
    assert "linux/amd64, linux/arm64" in app_row
    assert "/admin/" not in front  # no buttons on the registry listener

    found = await page(http, f"{base}/?q=MANY:t4")  # substring, any case
    assert listed(found) == [f"team/many:t{n}" for n in range(40, 50)]
    assert listed(await page(http, f"{base}/?q=app:v1")) == ["team/app:v1"]
    assert listed(await page(http, f"{base}/?q=%25")) == []  # LIKE wildcards are literal
    assert "No cached image matches" in await page(http, f"{base}/?q=nothing")
    await page(http, f"{base}/?page=x", status=400)


async def test_detail_page_shows_layers_and_what_they_share(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    shared = {"etc/base.txt": b"the same base layer\n" * 100}
    first = make_image([shared, {"app/one": b"one\n"}], label="one")
    second = make_image([shared, {"app/two": b"two\n"}], label="two")
    hub.add("team/one", "v1", first)
    hub.add("team/two", "v1", second)
    server = await start_mirror(hub.registry_url)
    base = mirror_url(server)
    await pull(http, base, "team/one", "v1")
    await pull(http, base, "team/two", "v1")
    front = await page(http, f"{base}/?q=team/one")
    [link] = re.findall(r'href="(/image/[^"]+)"', front)
    detail = await page(http, base + unescape(link))
    assert '<h2 id="image-name">team/one</h2>' in detail
    assert "<h3>linux/amd64</h3>" in detail
    layers = re.findall(r'<tr class="layer">(.*?)</tr>', detail)
    assert len(layers) == 2
    base_layer, own_layer = first.layers()
    assert base_layer.digest in layers[0] and "1: docker.io/team/two:v1" in layers[0]
    assert own_layer.digest in layers[1] and '<td class="shared">—</td>' in layers[1]
    await page(http, f"{base}/image/docker.io/team/one@sha256:{'0' * 64}", status=404)
    await page(http, f"{base}/image/nonsense", status=404)


async def test_the_public_page_never_names_a_private_repository_sharing_a_layer(
    hub: FakeHub, start_mirror: StartMirror, start_admin: StartAdmin, http: aiohttp.ClientSession
) -> None:
    shared = {"etc/base.txt": b"a base layer both use\n" * 100}
    public = make_image([shared, {"app/open": b"open\n"}], label="open")
    secret = make_image([shared, {"app/secret": b"secret\n"}], label="secret")
    hub.add("team/open", "v1", public)
    hub.add("acme/secret", "v1", secret, private=True)
    server = await start_mirror(hub.registry_url, **CREDS)
    base = mirror_url(server)
    await pull(http, base, "team/open", "v1")
    admin = str((await start_admin(server)).make_url("")).rstrip("/")
    async with http.post(f"{admin}/admin/pin", json={"image": "acme/secret:v1"}) as resp:
        assert resp.status == 200
    path = f"/image/docker.io/team/open@{public.digest}"
    shared_row = re.findall(r'<tr class="layer">(.*?)</tr>', await page(http, base + path))[0]
    assert public.layers()[0].digest in shared_row
    assert "acme/secret" not in shared_row and '<td class="shared">—</td>' in shared_row
    admin_row = re.findall(r'<tr class="layer">(.*?)</tr>', await page(http, admin + path))[0]
    assert "1: docker.io/acme/secret:v1" in admin_row


async def test_private_repositories_are_listed_only_on_the_admin_page(
    hub: FakeHub, start_mirror: StartMirror, start_admin: StartAdmin, http: aiohttp.ClientSession
) -> None:
    hub.add("team/open", "v1", small_image("open"))
    hub.add("acme/secret", "v1", small_image("secret"), private=True)
    server = await start_mirror(hub.registry_url, **CREDS)
    base = mirror_url(server)
    await pull(http, base, "team/open", "v1")
    admin = str((await start_admin(server)).make_url("")).rstrip("/")
    async with http.post(f"{admin}/admin/pin", json={"image": "acme/secret:v1"}) as resp:
        assert resp.status == 200
    front = await page(http, f"{base}/")
    assert listed(front) == ["team/open:v1"] and "1 image<" in front
    assert listed(await page(http, f"{base}/?q=secret")) == []
    digest = small_image("secret").digest
    await page(http, f"{base}/image/docker.io/acme/secret@{digest}", status=404)
    admin_page = await page(http, f"{admin}/")
    assert listed(admin_page) == ["acme/secret:v1", "team/open:v1"]


async def test_admin_buttons_pin_unpin_and_purge_and_refuse_other_sites(
    hub: FakeHub, start_mirror: StartMirror, start_admin: StartAdmin, http: aiohttp.ClientSession
) -> None:
    hub.add("team/app", "v1", small_image("buttons"))
    server = await start_mirror(hub.registry_url)
    base = mirror_url(server)
    await pull(http, base, "team/app", "v1")
    admin = str((await start_admin(server)).make_url("")).rstrip("/")
    front = await page(http, f"{admin}/")
    assert 'action="/admin/pin"' in front and 'class="pinned"' not in front
    form = {"image": "docker.io/team/app:v1", "back": "/?q=app"}
    origin = {"Origin": admin, "Sec-Fetch-Site": "same-origin"}
    async with http.post(
        f"{admin}/admin/pin", data=form, headers=origin, allow_redirects=False
    ) as resp:
        assert resp.status == 303 and resp.headers["Location"] == "/?q=app"
    assert '<td class="pinned">pinned</td>' in await page(http, f"{admin}/")
    for evil in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        async with http.post(f"{admin}/admin/unpin", data=form, headers=evil) as resp:
            assert resp.status == 403
    async with http.post(f"{admin}/admin/unpin", data=form, headers=origin) as resp:
        assert resp.status == 200  # redirected back to the page
    assert 'class="pinned"' not in await page(http, f"{admin}/")
    async with http.post(
        f"{admin}/admin/pin", data={**form, "back": "/\\evil.example/"}, headers=origin,
        allow_redirects=False,
    ) as resp:  # fmt: skip
        assert resp.status == 303 and resp.headers["Location"] == "/"
    async with http.post(f"{admin}/admin/unpin", data=form, headers=origin) as resp:
        assert resp.status == 200
    purge = {"image": "docker.io/team/app:v1", "back": "//evil.example/"}
    async with http.post(
        f"{admin}/admin/purge", data=purge, headers=origin, allow_redirects=False
    ) as resp:
        assert resp.status == 303 and resp.headers["Location"] == "/"
    assert listed(await page(http, f"{admin}/")) == []


async def test_admin_reads_refuse_a_foreign_host_name(
    hub: FakeHub, start_mirror: StartMirror, start_admin: StartAdmin, http: aiohttp.ClientSession
) -> None:
    """DNS rebinding: a page on evil.example re-resolved to 127.0.0.1 is same-origin to the
    browser, so it could read the admin page and stats unless GETs check Host too."""
    server = await start_mirror(hub.registry_url)
    admin = str((await start_admin(server)).make_url("")).rstrip("/")
    port = admin.rsplit(":", 1)[1]
    for path in ("/admin/stats", "/"):
        async with http.get(f"{admin}{path}", headers={"Host": f"evil.example:{port}"}) as resp:
            assert resp.status == 403, path
        async with http.get(f"{admin}{path}", headers={"Host": f"127.0.0.1:{port}"}) as resp:
            assert resp.status == 200, path


async def test_page_needs_the_mirror_login_like_v2(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    htpasswd = write_htpasswd(tmp_path, alice="wonderland")
    server = await start_mirror(hub.registry_url, auth_htpasswd=htpasswd)
    base = mirror_url(server)
    async with http.get(f"{base}/") as resp:
        assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Basic")
    async with http.get(
        f"{base}/", headers={"Authorization": basic("alice", "wonderland")}
    ) as resp:
        assert resp.status == 200


async def test_web_ui_admin_only_or_off(
    hub: FakeHub,
    start_mirror: StartMirror,
    start_admin: StartAdmin,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    server = await start_mirror(hub.registry_url, web_ui="admin")
    async with http.get(f"{mirror_url(server)}/") as resp:
        assert resp.status == 404
    admin = str((await start_admin(server)).make_url("")).rstrip("/")
    await page(http, f"{admin}/")
    server = await start_mirror(hub.registry_url, web_ui="off", data=tmp_path / "off")
    admin = str((await start_admin(server)).make_url("")).rstrip("/")
    async with http.get(f"{admin}/") as resp:
        assert resp.status == 404


async def test_header_and_chart_survive_a_restart(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    image = small_image("history")
    hub.add("team/app", "v1", image)
    data = tmp_path / "data"
    server = await start_mirror(hub.registry_url, data=data)
    base = mirror_url(server)
    await pull(http, base, "team/app", "v1")  # from upstream
    await pull(http, base, "team/app", "v1")  # from the cache
    before = await page(http, f"{base}/")
    await server.close()  # flushes the last figures
    server = await start_mirror(hub.registry_url, data=data)
    after = await page(http, f"{mirror_url(server)}/")
    blob_bytes = sum(len(b.data) for b in image.blobs.values())
    for html in (before, after):
        bars = re.findall(r'data-cache-bytes="(\d+)" data-upstream-bytes="(\d+)"', html)
        assert len(bars) == 48 + 30
        assert bars[47] == (str(blob_bytes), str(blob_bytes))  # this hour: one of each
        assert bars[-1] == (str(blob_bytes), str(blob_bytes))  # today
        assert re.search(r'id="hit-ratio">hit ratio <b>50.0%</b>', html)
