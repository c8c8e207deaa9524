"""The distribution-spec push API, and reads, for hosted repositories: thin handlers over
access.py (who), uploads.py (sessions) and repository.py (content).

https://github.com/opencontainers/distribution-spec/blob/main/spec.md, "Push",
"Content Discovery" and "Content Management". Every request is checked again: an upload's
id is bound to its repository and user, never a pass by itself.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from mirror.config import Config
from mirror.errors import RegistryError
from mirror.hosted.access import HostedAccess
from mirror.hosted.repository import HostedContent
from mirror.hosted.uploads import Upload, UploadSessions, upload_range
from mirror.mediatypes import MAX_MANIFEST_BYTES, OCI_INDEX
from mirror.membership import BlobMembership
from mirror.reference import (
    HOSTED,
    Endpoint,
    Route,
    parse_v2_path,
    validate_digest,
    validate_name,
    validate_tag,
)
from mirror.referrers import referrers_index
from mirror.responses import manifest_response, send_blob
from mirror.shared import FileLock
from mirror.tags import tags_page
from mirror.visibility import Visibility

_UPLOAD_PATH = re.compile(r"^(?P<name>.+)/blobs/uploads/(?P<id>[^/]*)$")
_CONTENT_RANGE = re.compile(r"^(\d{1,19})-(\d{1,19})$")  # int() of a longer one: a 500
BODY_CHUNK = 256 * 1024


@dataclass(frozen=True)
class HostedRegistry:
    """What the hosted handlers need, built once per worker (app.py)."""

    config: Config
    access: HostedAccess
    uploads: UploadSessions
    content: HostedContent
    visibility: Visibility
    membership: BlobMembership
    gc_lock: FileLock  # hosted GC against pushes (gc.py)

    def route(self, path: str, ns: str | None) -> Route:
        return parse_v2_path(path, ns, self.config.registry_names, self.config.hosted_names)

    async def dispatch(self, request: web.Request, path: str) -> web.StreamResponse | None:
        """The answer for a hosted repository or an upload path, or None for any other."""
        ns = request.query.get("ns")
        upload = _UPLOAD_PATH.fullmatch(path)
        if upload is not None:
            route = self.route(f"{upload['name']}/tags/list", ns)
            if route.registry != HOSTED:
                raise RegistryError.unsupported("pushes go to hosted namespaces only")
            return await self._upload(request, route.repository, upload["id"])
        try:
            route = self.route(path, ns)
        except RegistryError as exc:
            # A read of a malformed tag is "not there"; a push of one is TAG_INVALID.
            name, marker, tag = path.rpartition("/manifests/")
            if exc.code != "MANIFEST_UNKNOWN" or request.method != "PUT" or not marker:
                raise
            named = self.route(f"{name}/tags/list", ns)
            if named.registry != HOSTED:
                return None
            # Who asks first, as for any push: an anonymous client learns nothing more.
            await self.access.push(named.repository, request.headers.get("Authorization"))
            raise RegistryError.tag_invalid(tag) from None
        if route.registry != HOSTED:
            return None
        authorization = request.headers.get("Authorization")
        if request.method in ("GET", "HEAD"):
            await self.access.pull(route.repository, authorization)
            return await self._read(request, route)
        if request.method == "PUT" and route.endpoint is Endpoint.MANIFEST:
            user = await self.access.push(route.repository, authorization)
            return await self._put_manifest(request, route, user)
        if request.method == "DELETE" and route.endpoint is Endpoint.MANIFEST:
            user = await self.access.push(route.repository, authorization)
            immutable = self.access.rules(route.repository).immutable_tags
            await self.content.delete_manifest(route.repository, route.reference, user, immutable)
            return web.Response(status=202)
        raise RegistryError.unsupported(f"{request.method} is not supported here")

    async def _read(self, request: web.Request, route: Route) -> web.StreamResponse:
        if route.endpoint is Endpoint.MANIFEST:
            return manifest_response(
                request, await self.content.manifest(route.repository, route.reference)
            )
        if route.endpoint is Endpoint.BLOB:
            source = await self.content.blob(
                route.repository, route.reference, redirectable=request.method == "GET"
            )
            with contextlib.closing(source):
                return await send_blob(request, source)
        if route.endpoint is Endpoint.TAGS:
            found = await self.content.tags(route.repository)
            body, link = tags_page(route.repository, found, request.query, request.path)
            return web.Response(
                body=body, content_type="application/json", headers={"Link": link} if link else {}
            )
        body, filtered = referrers_index(
            await self.content.referrers(route.repository, route.reference),
            request.query.getall("artifactType", ()),
        )
        headers = {"OCI-Filters-Applied": "artifactType"} if filtered else {}
        return web.Response(body=body, content_type=OCI_INDEX, headers=headers)

    async def _put_manifest(self, request: web.Request, route: Route, user: str) -> web.Response:
        if not route.is_digest:
            validate_tag(route.reference)
        data = await _read_capped(request)
        immutable = self.access.rules(route.repository).immutable_tags
        if not route.is_digest and immutable:
            await self.content.refuse_moving(route.repository, route.reference, data)
        digest, subject = await self.content.put_manifest(
            route.repository, route.reference, data, request.headers.get("Content-Type"), user,
            immutable,
        )  # fmt: skip
        headers = {
            "Location": f"/v2/{route.repository}/manifests/{digest}",
            "Docker-Content-Digest": digest,
        }
        if subject is not None:
            headers["OCI-Subject"] = subject
        return web.Response(status=201, headers=headers)

    async def _upload(self, request: web.Request, repository: str, upload_id: str) -> web.Response:
        user = await self.access.push(repository, request.headers.get("Authorization"))
        if not upload_id:
            if request.method != "POST":
                raise RegistryError.unsupported(f"{request.method} of an upload needs its id")
            return await self._begin(request, repository, user)
        upload = self.uploads.find(upload_id, repository, user)
        if request.method == "GET":
            return _upload_answer(204, upload, upload.size)
        if request.method == "PATCH":
            start = _content_range_start(request.headers.get("Content-Range"))
            size = await self.uploads.append(upload, _body(request), start, await self._room())
            return _upload_answer(202, upload, size)
        if request.method == "PUT":
            digest = validate_digest(request.query.get("digest", ""))
            await self.uploads.append(upload, _body(request), None, await self._room())
            await self._commit(upload, digest)
            return _blob_created(repository, digest)
        if request.method == "DELETE":
            self.uploads.remove(upload.id)
            return web.Response(status=204)
        raise RegistryError.unsupported(f"{request.method} of an upload")

    async def _begin(self, request: web.Request, repository: str, user: str) -> web.Response:
        """POST: a mount, a whole blob in one request (`?digest=`), or a new session."""
        query = request.query
        mount, source = query.get("mount"), query.get("from")
        if mount is not None and await self._mount(request, repository, mount, source):
            return _blob_created(repository, mount)
        upload = self.uploads.start(repository, user)
        digest = query.get("digest")
        if digest is None:
            return _upload_answer(202, upload, 0)
        try:
            validate_digest(digest)
            await self.uploads.append(upload, _body(request), None, await self._room())
        except BaseException:
            self.uploads.remove(upload.id)
            raise
        await self._commit(upload, digest)
        return _blob_created(repository, digest)

    async def _commit(self, upload: Upload, digest: str) -> None:
        """The session's bytes become the blob `digest` (verified), and the session ends."""
        taken = self.uploads.take(upload)
        try:
            await self.content.commit_upload(upload.repository, taken, digest)
        finally:
            taken.unlink(missing_ok=True)

    async def _room(self) -> int:
        """What the quota leaves upload sessions (uploads.py takes the other sessions' bytes
        off it as they grow)."""
        return await self.content.quota.room()

    async def _mount(
        self, request: web.Request, repository: str, digest: str, source: str | None
    ) -> bool:
        """Mount `digest` from `source` if the client may pull it there and it is stored.
        Anything else (no `from`, a name it may not read, a blob not held there or not
        cached) is answered as the spec allows, with a new upload session: a refusal would
        tell who may not read it whether the blob is there."""
        validate_digest(digest)
        if source is None:
            return False
        authorization = request.headers.get("Authorization")
        try:
            route = self.route(f"{validate_name(source)}/blobs/{digest}", request.query.get("ns"))
            if route.registry == HOSTED:
                await self.access.pull(route.repository, authorization)
                if not await self.content.holds(route.repository, digest):
                    return False
            else:
                grant = await self.visibility.check(
                    route.registry, route.repository, f"blobs/{digest}", authorization
                )
                await self.membership.check(route.registry, route.repository, digest, grant)
        except RegistryError:
            return False
        return await self.content.mount(repository, digest) is not None


def _upload_answer(status: int, upload: Upload, size: int) -> web.Response:
    return web.Response(
        status=status,
        headers={
            "Location": f"/v2/{upload.repository}/blobs/uploads/{upload.id}",
            "Docker-Upload-UUID": upload.id,
            "Range": upload_range(size),
        },
    )


def _blob_created(repository: str, digest: str) -> web.Response:
    return web.Response(
        status=201,
        headers={"Location": f"/v2/{repository}/blobs/{digest}", "Docker-Content-Digest": digest},
    )


def _content_range_start(value: str | None) -> int | None:
    """The first offset of a PATCH's `Content-Range: <start>-<end>`, or None without one."""
    if value is None:
        return None
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None or int(match[2]) < int(match[1]):
        raise RegistryError(
            416, "BLOB_UPLOAD_INVALID", "Content-Range must be <start>-<end>",
            {"range": value[:100]},
        )  # fmt: skip
    return int(match[1])


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(BODY_CHUNK):
        yield chunk


async def _read_capped(request: web.Request) -> bytes:
    """A manifest body, at most one read past the limit (put_manifest refuses it then)."""
    data = bytearray()
    async for chunk in request.content.iter_chunked(BODY_CHUNK):
        data += chunk
        if len(data) > MAX_MANIFEST_BYTES:
            break
    return bytes(data)
