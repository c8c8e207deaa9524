"""Hosted content: blobs and manifests pushed to the team's repositories, kept through the
same content and index seams as the cache (any engine), under the index's registry key
HOSTED.

Never evicted: everything hosted is pinned in the index before its row exists (a blob under
its own digest, a manifest under its digest with everything it names), so no eviction pass
ever sees it unpinned. The quota (`hosted_max_size`) is the bytes of the distinct digests
pinned so.

A repository holds a blob only once it was uploaded or mounted there (or a manifest there
names it): a manifest may name nothing else. Otherwise a push could name any digest the
cache holds (another repository's private layer, say) and then pull it under its own name.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

from mirror.errors import RegistryError
from mirror.evict import Evictor
from mirror.fetch import BlobFetcher
from mirror.hosted.quota import HostedQuota
from mirror.jsondoc import parse_json
from mirror.manifests import Manifest
from mirror.mediatypes import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    is_descriptor_size,
    is_media_type,
    references,
)
from mirror.metrics import (
    HOSTED_DELETES,
    HOSTED_MOUNTS,
    HOSTED_PUSHES,
)
from mirror.reference import HOSTED, is_digest
from mirror.shared import FileLock
from mirror.store.blobs.base import ContentStore
from mirror.store.index import Index
from mirror.store.source import BlobSource
from mirror.webhooks import EventSink, ignore_event

CHUNK = 1024 * 1024  # bytes read at a time from an upload's file into the content store


def manifest_invalid(message: str) -> RegistryError:
    return RegistryError(400, "MANIFEST_INVALID", message)


def blob_unknown_to_manifest(digest: str) -> RegistryError:
    return RegistryError(
        400, "MANIFEST_BLOB_UNKNOWN", "manifest references a blob unknown to this repository",
        {"digest": digest},
    )  # fmt: skip


def _file_digest(path: Path, algorithm: str) -> str:
    with path.open("rb") as f:
        return f"{algorithm}:{hashlib.file_digest(f, algorithm).hexdigest()}"


def parse_pushed_manifest(data: bytes, content_type: str | None) -> tuple[str, dict[str, Any]]:
    """The media type of a pushed manifest and its document; MANIFEST_INVALID unless it is one
    of the manifest types the mirror serves, well-formed, and its `mediaType` (when it has
    one) is the Content-Type it was pushed with."""
    try:
        doc = parse_json(data)
    except ValueError as exc:
        raise manifest_invalid("the manifest is not JSON") from exc
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise manifest_invalid("schemaVersion 2 manifests only")
    header = (content_type or "").split(";", 1)[0].strip()
    declared = doc.get("mediaType")
    media_type = header if header in MANIFEST_TYPES else declared
    if media_type not in MANIFEST_TYPES:
        raise manifest_invalid(f"unsupported manifest media type {str(header or declared)[:100]!r}")
    if declared is not None and declared != media_type:
        raise manifest_invalid(f"mediaType {str(declared)[:100]!r} is not {media_type}")
    assert isinstance(media_type, str)
    if media_type in INDEX_TYPES:
        if not isinstance(doc.get("manifests"), list):
            raise manifest_invalid("an index needs a manifests list")
        descriptors = list(doc["manifests"])
    elif not isinstance(doc.get("config"), dict) or not isinstance(doc.get("layers"), list):
        raise manifest_invalid("an image manifest needs a config and a layers list")
    else:
        descriptors = [doc["config"], *doc["layers"]]
    if "subject" in doc:
        descriptors.append(doc["subject"])
    for descriptor in descriptors:
        _check_descriptor(descriptor)
    return media_type, doc


def _check_descriptor(descriptor: object) -> None:
    """A descriptor the index and the answers can hold: a valid digest (it goes into the
    OCI-Subject header, and into rows), a size within int64, a media type if any."""
    if not isinstance(descriptor, dict):
        raise manifest_invalid("a descriptor must be an object")
    digest, size = descriptor.get("digest"), descriptor.get("size")
    if not isinstance(digest, str) or not is_digest(digest):
        raise manifest_invalid(f"invalid digest {str(digest)[:100]!r}")
    if not is_descriptor_size(size):
        raise manifest_invalid(f"invalid size {str(size)[:30]!r} of {digest}")
    if "mediaType" in descriptor and not is_media_type(descriptor["mediaType"]):
        raise manifest_invalid(f"invalid mediaType of {digest}")


def subject_of(doc: dict[str, Any]) -> str | None:
    """The digest of a pushed manifest's `subject` (checked by parse_pushed_manifest)."""
    subject = doc.get("subject")
    if isinstance(subject, dict) and isinstance(subject.get("digest"), str):
        digest = str(subject["digest"])
        return digest if is_digest(digest) else None
    return None


class HostedContent:
    def __init__(
        self,
        index: Index,
        content: ContentStore,
        fetcher: BlobFetcher,
        evictor: Evictor,
        quota: HostedQuota,
        gc_lock: FileLock,
        tag_lock: FileLock,
        events: EventSink = ignore_event,
    ) -> None:
        self._events = events
        self._gc_lock = gc_lock
        # Immutable tags: a tag's claim (put_manifest) against a delete of what it names.
        self._tag_lock = tag_lock
        self._index = index
        self._content = content
        self._fetcher = fetcher
        self._evictor = evictor
        self.quota = quota

    async def _stored_size(self, digest: str) -> int | None:
        """The size of a blob stored for good (indexed, and its content where the engine
        keeps it); None for anything else, a download in flight included."""
        size = await self._index.get_blob(digest)
        if size is None:
            return None
        source = await self._fetcher.open_stored(digest)
        if source is None:
            return None
        source.close()
        return size

    async def commit_upload(self, repository: str, path: Path, digest: str) -> int:
        """Verify the bytes of an ended upload session (`path`, the caller's alone) against
        `digest` and keep them as a blob of `repository`; its size. A mismatch is
        DIGEST_INVALID and nothing is stored."""
        algorithm = digest.split(":", 1)[0]
        size = path.stat().st_size
        actual = await asyncio.to_thread(_file_digest, path, algorithm)
        if actual != digest:
            raise RegistryError(
                400, "DIGEST_INVALID", "the uploaded bytes do not match the digest",
                {"digest": digest, "actual": actual},
            )  # fmt: skip
        async with self._gc_lock.share():
            await self._touch([digest])
            async with self.quota.reserved({digest: size}):
                if not await self._pin_stored(repository, digest, {digest}):
                    await self._store_file(path, digest, size)
            await self._index.add_holder(HOSTED, repository, digest)
        return size

    async def _pin_stored(self, repository: str, root: str, digests: set[str]) -> bool:
        """Pin `digests` under `root` for the repository; whether `root` is stored for good.
        Both under the evictor's pinning lock: an eviction part looks at the pins and deletes
        what is unpinned in one step against it, so a blob seen stored here (a cached layer,
        a cached manifest of these bytes) is not deleted a moment later under the new pin."""
        async with self._evictor.pinning():
            await self._index.pin(HOSTED, repository, root, digests)
            return await self._stored_size(root) is not None

    async def _touch(self, digests: list[str]) -> None:
        """Used now, in the index at once (not batched like a pull's): hosted GC spares what
        was used within its grace period, and a push in progress uses what it names."""
        now = time.time()
        await self._index.touch_many(dict.fromkeys(digests, now))

    async def _store_file(self, path: Path, digest: str, size: int) -> None:
        writer = self._content.writer(digest)
        try:
            writer.begin_upload()
            with path.open("rb") as f:
                while chunk := await asyncio.to_thread(f.read, CHUNK):
                    writer.write(chunk)
                    if writer.behind:
                        await writer.caught_up()
            await writer.verify()  # the file may have changed since it was hashed
        except BaseException:
            writer.discard()
            raise
        async with self._evictor.reserving(size) as room:
            try:
                await writer.commit()
                await writer.sync_directory()
            except BaseException:
                writer.discard()
                raise
            room.settle(await self._index.add_blob(digest, size, None))

    async def mount(self, repository: str, digest: str) -> int | None:
        """Make a stored blob this repository's too (the caller checked the client may pull
        it where it is); its size, or None when it is not stored here after all."""
        async with self._gc_lock.share():
            await self._touch([digest])
            size = await self._stored_size(digest)
            if size is None:
                return None
            async with self.quota.reserved({digest: size}):
                if not await self._pin_stored(repository, digest, {digest}):
                    # Evicted since: the client uploads it instead (a new session).
                    await self._index.unpin(HOSTED, repository, digest)
                    return None
            await self._index.add_holder(HOSTED, repository, digest)
        HOSTED_MOUNTS.inc()
        return size

    async def holds(self, repository: str, digest: str) -> bool:
        return await self._index.holds(HOSTED, repository, digest)

    async def put_manifest(
        self,
        repository: str,
        reference: str,
        data: bytes,
        content_type: str | None,
        user: str,
        immutable: bool = False,
    ) -> tuple[str, str | None]:
        """Check and keep a pushed manifest, tagging it when `reference` is a tag; its digest
        and the digest of its `subject`, if it has one. `user`: who pushed, for the event.
        `immutable`: a tag naming another manifest is not moved (DENIED), decided by the
        index in one statement, so two pushes racing for a new tag cannot both win."""
        if len(data) > MAX_MANIFEST_BYTES:
            # The spec's answer to a manifest over a registry's limit (distribution's is 400).
            raise RegistryError(
                413, "MANIFEST_INVALID", f"manifests are limited to {MAX_MANIFEST_BYTES} bytes"
            )
        algorithm = reference.split(":", 1)[0] if is_digest(reference) else "sha256"
        digest = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
        if is_digest(reference) and reference != digest:
            raise RegistryError(
                400, "DIGEST_INVALID", "the manifest does not match the digest it was put by",
                {"digest": reference, "actual": digest},
            )  # fmt: skip
        media_type, doc = parse_pushed_manifest(data, content_type)
        children = references(data)
        async with self._gc_lock.share():
            await self._touch([child for child, _ in children])
            pinned = await self._check_children(repository, media_type, children)
            sizes = {**{child: size for child, size in children}, digest: len(data)}
            async with self.quota.reserved({d: sizes.get(d, 0) for d in pinned | {digest}}):
                known = await self._pin_stored(repository, digest, pinned | {digest})
                async with self._evictor.reserving(0 if known else len(data)) as room:
                    if not known:
                        await self._content.put(digest, data)
                    room.settle(
                        await self._index.add_manifest(
                            HOSTED, repository, digest, media_type, len(data), children
                        )
                    )
            # Again, now that the manifest row is there: GC drops the pins of a manifest
            # without a row, and this one may have been deleted a moment ago.
            await self._index.pin(HOSTED, repository, digest, pinned | {digest})
            # The blobs' own pins (their push in progress) are this manifest's now: once
            # it is deleted, GC frees them at once, not after the grace period.
            # (A manifest's pins are its own: an index's children, or a manifest an image
            # names as a blob.)
            if media_type not in INDEX_TYPES:
                for child, _ in children:
                    if await self._index.get_manifest_type(HOSTED, repository, child) is None:
                        await self._index.unpin(HOSTED, repository, child)
        tag = None if is_digest(reference) else reference
        if tag is not None and immutable:
            async with self._tag_lock.hold():
                if await self._index.get_manifest_type(HOSTED, repository, digest) is None:
                    raise RegistryError.denied(f"{digest} was deleted while it was pushed")
                claimed = await self._index.claim_tag(HOSTED, repository, tag, digest, time.time())
            if claimed != digest:
                raise RegistryError.denied(f"tag {tag} is immutable in {repository}")
        elif tag is not None:
            await self._index.set_tag(HOSTED, repository, tag, digest, time.time())
        HOSTED_PUSHES.inc()
        # The image's size: the manifest and everything it names, once each.
        named = await self._index.closure(digest)
        size = sum({**named, digest: len(data)}.values())
        self._events(
            "image.pushed",
            {"repository": repository, "tag": tag, "digest": digest, "user": user,
             "media_type": media_type, "size": size},
        )  # fmt: skip
        return digest, subject_of(doc)

    async def _check_children(
        self, repository: str, media_type: str, children: list[tuple[str, int]]
    ) -> set[str]:
        """What a manifest's pin covers: its children, each present in this repository (an
        index: as a manifest of it, with everything that one names; an image: as a blob it
        holds, of the size the manifest says)."""
        pinned: set[str] = set()
        for child, size in children:
            if media_type in INDEX_TYPES:
                if await self._index.get_manifest_type(HOSTED, repository, child) is None:
                    raise blob_unknown_to_manifest(child)
                stored = await self._index.get_blob(child)
                pinned |= set(await self._index.closure(child))
            else:
                stored = await self._stored_size(child)
                if stored is None or not await self.holds(repository, child):
                    raise blob_unknown_to_manifest(child)
            if stored != size:  # the stored size is not told: the pusher may lack pull
                raise manifest_invalid(f"{child}: the size given is not the stored one")
            pinned.add(child)
        return pinned

    async def refuse_moving(self, repository: str, tag: str, data: bytes) -> None:
        """With immutable tags: DENIED unless the tag is new or names these very bytes
        (pushing the same image again is not a move)."""
        row = await self._index.get_tag(HOSTED, repository, tag)
        if row is not None and row.digest != f"sha256:{hashlib.sha256(data).hexdigest()}":
            raise RegistryError.denied(f"tag {tag} is immutable in {repository}")

    async def _refuse_untagging(self, repository: str, reference: str) -> None:
        """With immutable tags: DENIED for a tag, and for a manifest that a tag names,
        directly or through an index (its platform images: the tag would stop pulling)."""
        if is_digest(reference):
            sharing = await self._index.tags_sharing(reference, set())
            tagged = bool(await self._index.tags_of(HOSTED, repository, reference)) or any(
                (registry, name) == (HOSTED, repository) for registry, name, _ in sharing
            )
        else:
            tagged = await self._index.get_tag(HOSTED, repository, reference) is not None
        if tagged:
            raise RegistryError.denied(f"tags are immutable in {repository}")

    async def manifest(self, repository: str, reference: str) -> Manifest:
        digest = reference
        if not is_digest(reference):
            row = await self._index.get_tag(HOSTED, repository, reference)
            if row is None:
                raise RegistryError.manifest_unknown(reference)
            digest = row.digest
        media_type = await self._index.get_manifest_type(HOSTED, repository, digest)
        data = None if media_type is None else await self._content.read(digest)
        if media_type is None or data is None:
            raise RegistryError.manifest_unknown(reference)
        return Manifest(digest, media_type, data)

    async def delete_manifest(
        self, repository: str, reference: str, user: str, immutable: bool = False
    ) -> None:
        """By digest: the manifest and its tags leave the repository (its bytes stay until
        garbage collection). By tag: only the tag. `user`: who deleted, for the event.
        `immutable`: DENIED for what a tag names, looked at and deleted under the lock a
        tag is claimed under, so a push tagging it meanwhile cannot be undone."""
        if not immutable:
            return await self._delete_manifest(repository, reference, user)
        async with self._tag_lock.hold():
            await self._refuse_untagging(repository, reference)
            return await self._delete_manifest(repository, reference, user)

    async def _delete_manifest(self, repository: str, reference: str, user: str) -> None:
        if is_digest(reference):
            digest = reference
            media_type = await self._index.get_manifest_type(HOSTED, repository, digest)
            if media_type is None:
                raise RegistryError.manifest_unknown(reference)
            # Its pins stay until GC, which removes what nothing else names.
            tags = await self._index.delete_manifest(HOSTED, repository, digest)
        else:
            row = await self._index.get_tag(HOSTED, repository, reference)
            if row is None:
                raise RegistryError.manifest_unknown(reference)
            digest, tags = row.digest, [reference]
            await self._index.delete_tag(HOSTED, repository, reference)
        HOSTED_DELETES.inc()
        size = await self._index.get_blob(digest) or 0
        self._events(
            "image.deleted",
            {"repository": repository, "tag": None if is_digest(reference) else reference,
             "tags": tags, "digest": digest, "user": user, "size": size},
        )  # fmt: skip

    async def blob(self, repository: str, digest: str, redirectable: bool) -> BlobSource:
        if not await self.holds(repository, digest):
            raise RegistryError.blob_unknown(digest)
        source = await self._fetcher.open_stored(digest, redirectable)
        if source is None:
            raise RegistryError.blob_unknown(digest)
        return source

    async def tags(self, repository: str) -> list[str]:
        tags = await self._index.list_tags(HOSTED, repository)
        if not tags and (HOSTED, repository) not in await self._index.repositories():
            raise RegistryError.name_unknown(repository)
        return tags

    async def referrers(self, repository: str, digest: str) -> list[dict[str, Any]]:
        """Descriptors of the repository's manifests whose `subject` is `digest`, as the
        referrers API lists them. Read from the manifests themselves: a hosted repository
        holds few, and nothing else has to be kept in step with them."""
        found: list[dict[str, Any]] = []
        for manifest_digest in await self._index.manifests_of(HOSTED, repository):
            try:
                manifest = await self.manifest(repository, manifest_digest)
                doc = parse_json(manifest.data)
            except (RegistryError, ValueError):
                continue
            if not isinstance(doc, dict) or subject_of(doc) != digest:
                continue
            config = doc.get("config") if isinstance(doc.get("config"), dict) else {}
            entry: dict[str, Any] = {
                "mediaType": manifest.media_type,
                "digest": manifest.digest,
                "size": len(manifest.data),
            }
            artifact_type = doc.get("artifactType") or (config or {}).get("mediaType")
            if isinstance(artifact_type, str):
                entry["artifactType"] = artifact_type
            if isinstance(doc.get("annotations"), dict):
                entry["annotations"] = doc["annotations"]
            found.append(entry)
        return found
