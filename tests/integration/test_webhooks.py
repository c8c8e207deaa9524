"""Webhooks: events reach a real HTTP receiver on loopback, late receivers get them after
retries, and nothing a receiver does slows a pull."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from pathlib import Path

import aiohttp
from prometheus_client import REGISTRY

from mirror.config import WebhookConfig
from tests.conftest import StartAdmin, StartMirror
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import small_image
from tests.fixtures.procs import mirror_process
from tests.fixtures.webhooks import Receiver
from tests.integration.test_pull_path import ALL_TYPES, mirror_url, pull


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_first_pull_sends_image_cached_once_and_signed(
    hub: FakeHub,
    start_mirror: StartMirror,
    receiver: Receiver,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    image = small_image("hooked")
    hub.add("team/app", "v1", image)
    hook = WebhookConfig(receiver.url, secret="hook-secret")
    server = await start_mirror(hub.registry_url, webhooks=(hook,))
    base = mirror_url(server)
    await pull(http, base, "team/app", "v1")
    await receiver.wait_for("image.cached")
    await pull(http, base, "team/app", "v1")  # a hit: nothing new is cached
    await asyncio.sleep(0.3)
    [event] = receiver.of_type("image.cached")
    assert event["data"] == {
        "registry": "docker.io", "repository": "team/app", "reference": "v1",
        "digest": image.digest, "media_type": image.top.media_type, "size": len(image.top.data),
    }  # fmt: skip
    assert event["id"] and event["time"].endswith("Z")
    headers = receiver.headers[0]
    assert headers["X-Mirror-Event"] == "image.cached"
    expected = hmac.new(b"hook-secret", receiver.bodies[0], hashlib.sha256).hexdigest()
    assert headers["X-Mirror-Signature-256"] == f"sha256={expected}"


async def test_tag_update_upstream_sends_one_tag_updated_after_revalidation(
    hub: FakeHub, start_mirror: StartMirror, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    old, new = small_image("tag-old"), small_image("tag-new")
    hub.add("team/app", "v1", old)
    ttl = 2.0  # long enough that eight hits on a loaded CI machine stay inside it
    server = await start_mirror(
        hub.registry_url, tag_ttl=ttl, webhooks=(WebhookConfig(receiver.url),)
    )
    base = mirror_url(server)
    asked = time.monotonic()
    await pull(http, base, "team/app", "v1")
    cached = time.monotonic()
    hub.add("team/app", "v1", new)  # the tag moves upstream
    await asyncio.gather(*(pull(http, base, "team/app", "v1") for _ in range(8)))  # still fresh
    assert time.monotonic() - asked < ttl  # else the pulls above proved nothing
    assert receiver.of_type("tag.updated") == []
    await asyncio.sleep(cached + ttl + 0.2 - time.monotonic())  # stale: the next pulls revalidate
    results = await asyncio.gather(*(pull(http, base, "team/app", "v1") for _ in range(8)))
    revalidated = time.monotonic()
    assert all(new.digest in blobs for blobs in results)
    await asyncio.sleep(revalidated + ttl + 0.2 - time.monotonic())
    await pull(http, base, "team/app", "v1")  # revalidated again: same digest, no event
    await receiver.wait_for("tag.updated")
    await asyncio.sleep(0.3)
    [event] = receiver.of_type("tag.updated")
    assert event["data"] == {
        "registry": "docker.io", "repository": "team/app", "tag": "v1",
        "previous_digest": old.digest, "digest": new.digest,
    }  # fmt: skip


async def test_receiver_down_for_a_while_gets_every_event_in_order(
    hub: FakeHub, start_mirror: StartMirror, http: aiohttp.ClientSession
) -> None:
    receiver = Receiver()  # not listening yet
    for n in range(3):
        hub.add(f"team/app{n}", "v1", small_image(f"late-{n}"))
    failures = _metric("mirror_webhook_delivery_failures_total", event="image.cached")
    server = await start_mirror(hub.registry_url, webhooks=(WebhookConfig(receiver.url),))
    base = mirror_url(server)
    started = time.monotonic()
    for n in range(3):
        await pull(http, base, f"team/app{n}", "v1")
    assert time.monotonic() - started < 5  # pulls never wait for a receiver
    await asyncio.sleep(2.5)  # a few failed attempts, backing off
    assert _metric("mirror_webhook_delivery_failures_total", event="image.cached") > failures
    await receiver.up()
    try:
        await receiver.wait_for("image.cached", 3, timeout=30)
        assert [e["data"]["repository"] for e in receiver.events] == [
            "team/app0", "team/app1", "team/app2",
        ]  # fmt: skip
    finally:
        await receiver.down()


async def test_a_hanging_receiver_does_not_slow_pulls(
    hub: FakeHub, start_mirror: StartMirror, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    receiver.delay = 30
    for n in range(4):
        hub.add(f"team/slow{n}", "v1", small_image(f"slow-{n}"))
    server = await start_mirror(hub.registry_url, webhooks=(WebhookConfig(receiver.url),))
    base = mirror_url(server)
    started = time.monotonic()
    for n in range(4):
        await pull(http, base, f"team/slow{n}", "v1")
    assert time.monotonic() - started < 3


async def test_purge_sends_blob_evicted_and_an_outage_one_upstream_error(
    hub: FakeHub,
    start_mirror: StartMirror,
    start_admin: StartAdmin,
    receiver: Receiver,
    http: aiohttp.ClientSession,
) -> None:
    image = small_image("evicted")
    hub.add("team/app", "v1", image)
    hooks = (WebhookConfig(receiver.url, frozenset({"blob.evicted", "upstream.error"})),)
    server = await start_mirror(hub.registry_url, webhooks=hooks)
    base = mirror_url(server)
    await pull(http, base, "team/app", "v1")
    admin = str((await start_admin(server)).make_url("")).rstrip("/")
    async with http.post(f"{admin}/admin/purge", json={"image": "team/app:v1"}) as resp:
        assert resp.status == 200
    await receiver.wait_for("blob.evicted", 1 + len(image.blobs))
    evicted = {e["data"]["digest"]: e["data"] for e in receiver.of_type("blob.evicted")}
    assert set(evicted) == {image.digest, *image.blobs}
    assert {e["reason"] for e in evicted.values()} == {"purge"}

    hub.down = True
    for n in range(3):
        async with http.get(f"{base}/v2/team/other/manifests/v{n}") as resp:
            assert resp.status == 503
    await receiver.wait_for("upstream.error")
    await asyncio.sleep(0.3)
    [event] = receiver.of_type("upstream.error")  # one per registry and status a minute
    assert event["data"]["registry"] == "docker.io" and event["data"]["status"] == "unreachable"
    hub.down, hub.token_down = False, True
    async with http.get(f"{base}/v2/team/third/manifests/v1") as resp:
        assert resp.status == 503
    await receiver.wait_for("upstream.error", 2)
    token = receiver.of_type("upstream.error")[1]["data"]
    assert (token["kind"], token["status"]) == ("token", "503")
    assert receiver.of_type("image.cached") == []  # not subscribed


async def test_one_tag_updated_across_workers(
    hub: FakeHub, receiver: Receiver, tmp_path: Path
) -> None:
    old, new = small_image("workers-old"), small_image("workers-new")
    hub.add("team/app", "v1", old)
    async with mirror_process(
        tmp_path / "data", hub.registry_url, "--workers", "2", "--tag-ttl", "1s",
        "--webhook", receiver.url,
    ) as mirror:  # fmt: skip
        url = f"{mirror.url}/v2/team/app/manifests/v1"

        async def digests() -> set[str]:
            async def one() -> str:  # each on its own connection: both workers answer
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(url, headers={"Accept": ALL_TYPES}) as resp,
                ):
                    return resp.headers["Docker-Content-Digest"]

            return set(await asyncio.gather(*(one() for _ in range(16))))

        assert await digests() == {old.digest}
        hub.add("team/app", "v1", new)
        await asyncio.sleep(1.2)
        assert await digests() == {new.digest}
        await asyncio.sleep(1.2)
        assert await digests() == {new.digest}  # revalidated again, unchanged
        await receiver.wait_for("tag.updated")
        await asyncio.sleep(0.5)
    assert [e["data"]["digest"] for e in receiver.of_type("tag.updated")] == [new.digest]
    assert len(receiver.of_type("image.cached")) == 2  # each manifest once, whichever worker
