"""The peer endpoint: replicas stream a download in flight from the replica that claimed it.

A replica whose client asks for a blob another replica is downloading (claims.py) does not
wait for the whole download, and does not download it again: it GETs the blob from the
claimant's peer endpoint (its own listener, `peer_listen`, never exposed to clients), with a
Range from what it already has, exactly as it would from an upstream, and its own clients
follow its own temp file as usual. The claimant serves its growing file with the same rule as
for any client: the last byte only after verification, so a follower never completes a wrong
blob either (it verifies again anyway).

Every request carries the cluster's shared secret (`Authorization: Bearer ...`), compared in
constant time: the endpoint serves any blob by digest without repository checks (the follower
made those for its own client), so nothing but a replica may reach it.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from mirror.errors import RegistryError
from mirror.keys import STARTED
from mirror.reference import validate_digest
from mirror.responses import send_blob
from mirror.store.source import BlobSource

PEER_PATH = "/peer/blobs/{digest}"

Finder = Callable[[str], Awaitable[BlobSource | None]]


def peer_app(secret: str, find: Finder) -> web.Application:
    """The peer listener's application: one route, the shared secret on every request."""
    expected = f"Bearer {secret}".encode()

    async def blob(request: web.Request) -> web.StreamResponse:
        # Header values arrive surrogate-escaped: bytes that are not UTF-8 must not raise.
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            return RegistryError(401, "UNAUTHORIZED", "peer secret required").response()
        try:
            digest = validate_digest(request.match_info["digest"])
        except RegistryError as exc:
            return exc.response()
        source = await find(digest)
        if source is None:
            return RegistryError.blob_unknown(digest).response()
        with contextlib.closing(source):
            try:
                return await send_blob(request, source)
            except RegistryError as exc:
                if request.get(STARTED):
                    raise  # mid-body: the connection drops, the follower sees a short body
                return exc.response()

    app = web.Application()
    app.router.add_route("GET", PEER_PATH, blob)
    app.router.add_route("HEAD", PEER_PATH, blob)
    return app
