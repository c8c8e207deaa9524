"""The distribution-spec error codes and their JSON responses, in one place.

Handlers and the upstream client raise `RegistryError`; one middleware (see app.py) turns it
into `{"errors":[{"code","message","detail"}]}` with the right status. Clients such as
containerd decide what to do next (try the next host, give up) from the status alone, so the
status matters as much as the code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web


class RegistryError(Exception):
    # An upstream's verdict on the repository itself (its 401 after a fresh token: missing or
    # private), as opposed to one about the mirror's credentials or the upstream's state.
    about_repository = False

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return json.dumps({"errors": [entry]}).encode()

    def response(self) -> web.Response:
        """The JSON response; for HEAD, aiohttp keeps Content-Length and drops the body."""
        return web.Response(
            status=self.status,
            body=self.body(),
            headers=self.headers,
            content_type="application/json",
        )

    # Constructors name the situation, so call sites read like the protocol.
    @classmethod
    def name_invalid(cls, name: str) -> RegistryError:
        return cls(400, "NAME_INVALID", "invalid repository name", {"name": name[:300]})

    @classmethod
    def tag_invalid(cls, tag: str) -> RegistryError:
        return cls(400, "TAG_INVALID", "invalid tag", {"tag": tag[:300]})

    @classmethod
    def digest_invalid(cls, digest: str) -> RegistryError:
        return cls(
            400,
            "DIGEST_INVALID",
            "invalid or unsupported digest (sha256 or sha512, lowercase hex)",
            {"digest": digest[:300]},
        )

    @classmethod
    def not_found_route(cls, path: str) -> RegistryError:
        return cls(
            404, "NAME_UNKNOWN", "no such endpoint in the registry API", {"path": path[:300]}
        )

    @classmethod
    def registry_unknown(cls, registry: str) -> RegistryError:
        name = registry[:200]
        return cls(
            404,
            "NAME_UNKNOWN",
            f"registry {name!r} is not configured on this mirror: add a "
            f'[registries."{name}"] table with its url to the mirror\'s config',
            {"registry": name},
        )

    @classmethod
    def name_unknown(cls, name: str) -> RegistryError:
        return cls(404, "NAME_UNKNOWN", "repository name not known to registry", {"name": name})

    @classmethod
    def manifest_unknown(cls, reference: str, message: str = "manifest unknown") -> RegistryError:
        return cls(404, "MANIFEST_UNKNOWN", message, {"reference": reference})

    @classmethod
    def blob_unknown(cls, digest: str) -> RegistryError:
        return cls(404, "BLOB_UNKNOWN", "blob unknown to registry", {"digest": digest})

    @classmethod
    def unauthorized(cls, message: str = "authentication required") -> RegistryError:
        return cls(401, "UNAUTHORIZED", message)

    @classmethod
    def denied(cls, message: str = "requested access to the resource is denied") -> RegistryError:
        return cls(403, "DENIED", message)

    @classmethod
    def unsupported(cls, message: str = "this mirror is read-only") -> RegistryError:
        return cls(405, "UNSUPPORTED", message)

    @classmethod
    def too_many_requests(cls, retry_after: str | None) -> RegistryError:
        headers = {"Retry-After": retry_after} if retry_after else {}
        return cls(429, "TOOMANYREQUESTS", "upstream rate limit reached", headers=headers)

    @classmethod
    def range_invalid(cls, size: int) -> RegistryError:
        return cls(
            416,
            "RANGE_INVALID",
            "requested range not satisfiable",
            headers={"Content-Range": f"bytes */{size}"},
        )

    @classmethod
    def manifest_invalid(cls, message: str) -> RegistryError:
        return cls(502, "MANIFEST_INVALID", message)

    @classmethod
    def unavailable(cls, message: str = "upstream registry unavailable") -> RegistryError:
        return cls(503, "UNAVAILABLE", message)
