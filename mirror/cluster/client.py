"""Requests to other replicas' peer endpoints (peers.py), with the cluster's shared secret."""

from __future__ import annotations

import aiohttp

CONNECT_TIMEOUT = 2.0  # a replica that does not accept within this is treated as gone
# Silence on a peer stream after which the follower retries or takes over: a little more than
# a claim's staleness (claims.STALE), so a frozen claimant is replaced, not awaited long; more
# than a slow upstream's usual silences, which the claimant relays as they come.
READ_TIMEOUT = 15.0


class PeerClient:
    """Requests to other replicas' peer endpoints, with the shared secret."""

    def __init__(self, secret: str) -> None:
        self._auth = f"Bearer {secret}"
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT
                ),
            )
        return self._session

    async def get(self, peer: str, digest: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
        url = f"{peer.rstrip('/')}/peer/blobs/{digest}"
        return await self._client().get(url, headers={**headers, "Authorization": self._auth})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
