"""A fake Docker Hub in its own process, for benchmarks: one image, plus a stats endpoint.

Prints one JSON line (URLs, image facts) on stdout when ready, then serves until killed.
`GET /stats` returns what the upstream served; `POST /reset` clears it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from aiohttp import web

from mirror.config import parse_size
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.images import big_image


async def serve(size: int, link: int | None) -> None:
    hub = await FakeHub().start()
    hub.link_rate = link
    image = big_image("bench", size, seed=42)
    hub.add("team/big", "v1", image)

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response(
            {
                "cdn_bytes": hub.cdn_bytes,
                "blob_gets": len(hub.blob_gets()),
                "manifest_gets": len(hub.manifest_gets()),
                "token_requests": len(hub.requests("token")),
            }
        )

    async def reset(_request: web.Request) -> web.Response:
        hub.reset_log()
        hub.cdn_bytes = 0
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    layers = image.layers()
    print(
        json.dumps(
            {
                "registry": hub.registry_url,
                "stats": f"http://127.0.0.1:{port}",
                "name": "team/big",
                "tag": "v1",
                "image_bytes": image.blob_bytes,
                "big_layer": max(layers, key=lambda b: len(b.data)).digest,
                "big_layer_bytes": max(len(b.data) for b in layers),
            }
        ),
        flush=True,
    )
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="256MiB")
    parser.add_argument("--link", help="CDN bandwidth shared by all downloads, e.g. 119MiB")
    args = parser.parse_args()
    try:
        asyncio.run(serve(parse_size(args.size), parse_size(args.link) if args.link else None))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
