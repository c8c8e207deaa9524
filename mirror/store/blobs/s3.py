"""Blobs in S3-compatible object storage (AWS S3, MinIO, Ceph RGW, SeaweedFS, GCS's XML API),
through aiobotocore: `<prefix>blobs/<algorithm>/<2 hex>/<hex>`, the local layout's key.

Why aiobotocore (bench/README.md has the figures): it is botocore, so the credential chain is
the standard one (static keys, environment, shared files and profiles, EKS web identity/IRSA,
ECS and EC2 instance roles) and every S3 call is there, among them the multipart calls by upload
id, `ListMultipartUploads` and `AbortMultipartUpload`. The mirror needs those: a blob whose
digest turns out wrong is aborted, an upload is resumable by its id, and uploads left by a crash
are found and aborted. obstore was faster per CPU second but hides the upload id.

Everything that can fail raises `ObjectStoreError` (an `OSError`), whose message names the
operation, the key and the server's error code, never a credential. Every request has a connect
and a read timeout; `ping()` has a total one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from mirror.errors import RegistryError
from mirror.metrics import BACKEND_DURATION, BACKEND_ERRORS
from mirror.reference import validate_digest
from mirror.store.health import BackendUnavailable

if TYPE_CHECKING:
    from aiobotocore.response import StreamingBody
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

MiB = 1024 * 1024
PART_SIZE = 8 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's floor for every part but the last
MAX_PARTS = 10_000  # S3's ceiling on parts per upload
DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys
DELETES_IN_FLIGHT = 4  # DeleteObjects requests of one `delete` at once


@dataclass(frozen=True)
class S3Settings:
    """Where the blobs live. `access_key`/`secret_key` None: the standard AWS credential chain
    (environment, shared credentials file, web identity/IRSA, container and instance roles)."""

    bucket: str
    prefix: str = ""
    endpoint: str | None = None
    region: str | None = None
    path_style: bool = False  # MinIO, Ceph and SeaweedFS without wildcard DNS need it
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    connect_timeout: float = 5.0
    read_timeout: float = 30.0  # longest silence while waiting for or reading a response
    ping_timeout: float = 3.0  # total, retries included: a health probe must answer promptly
    # Total, retries included, for one small request: a HEAD, a manifest's GET or PUT, the
    # headers of a ranged GET, a delete batch. A bucket that accepts connections but never
    # answers must cost a client a prompt 503, not its own timeout (containerd's is 30 s).
    request_timeout: float = 10.0
    part_size: int = PART_SIZE

    def __post_init__(self) -> None:
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("S3 access key and secret key go together (or neither: the chain)")
        if self.part_size < MIN_PART_SIZE:
            raise ValueError(f"S3 part size must be at least {MIN_PART_SIZE} bytes")


class ObjectStoreError(BackendUnavailable, OSError):
    """The object store failed or could not be reached; the message holds no credential. A
    BackendUnavailable: a request it reaches is answered 503 (store/health.py)."""

    backend = "s3"


class ObjectMissing(ObjectStoreError):
    """The object is not there (404): an answer, not an outage."""

    outage = False


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _is_missing(error: ClientError) -> bool:
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 404 or _code(error) in ("NoSuchKey", "NoSuchUpload", "404", "NotFound")


@contextlib.contextmanager
def _errors(operation: str, key: str, timed: bool = True) -> Iterator[None]:
    """Translate what botocore and aiohttp raise into ObjectStoreError. botocore's messages
    carry the operation, error code, server message and endpoint, never keys or signatures,
    but ours is built from the parts anyway so that no future botocore message can leak one.
    `timed`: observe the duration as the operation's latency (not for each piece of a body:
    that is a wait for the next bytes, and a histogram write per piece of a relay)."""
    label = operation.split(" ", 1)[0]  # "UploadPart 3" is operation UploadPart
    started = time.perf_counter()
    try:
        yield
    except ClientError as error:
        if _is_missing(error):
            raise ObjectMissing(f"S3 {operation} {key}: not found") from None
        BACKEND_ERRORS.labels("s3", label).inc()
        message = error.response.get("Error", {}).get("Message", "")
        raise ObjectStoreError(f"S3 {operation} {key}: {_code(error)} {message}") from None
    except (BotoCoreError, aiohttp.ClientError, TimeoutError) as error:
        BACKEND_ERRORS.labels("s3", label).inc()
        raise ObjectStoreError(f"S3 {operation} {key}: {type(error).__name__}") from None
    finally:
        if timed:
            BACKEND_DURATION.labels("s3", label).observe(time.perf_counter() - started)


def parse_key(key: str, prefix: str) -> str | None:
    """The digest a key of ours names, or None for any other key (foreign objects, or a key
    whose fan-out directory does not match its digest)."""
    if not key.startswith(prefix + "blobs/"):
        return None
    parts = key[len(prefix) + len("blobs/") :].split("/")
    if len(parts) != 3 or parts[1] != parts[2][:2]:
        return None
    try:
        return validate_digest(f"{parts[0]}:{parts[2]}")
    except RegistryError:
        return None


def part_size_for(size: int | None, base: int = PART_SIZE) -> int:
    """Parts of `base` bytes unless the announced size needs bigger ones to fit in 10,000
    parts; rounded up to whole MiB."""
    if size is None or size <= base * MAX_PARTS:
        return base
    return math.ceil(size / MAX_PARTS / MiB) * MiB


class ObjectStore:
    """Content-addressed blobs in one bucket under one prefix."""

    def __init__(self, settings: S3Settings, client: S3Client, stack: AsyncExitStack) -> None:
        self.settings = settings
        self.prefix = settings.prefix
        self._client = client
        self._stack = stack

    def __repr__(self) -> str:
        return f"ObjectStore(bucket={self.settings.bucket!r}, prefix={self.prefix!r})"

    @classmethod
    async def open(cls, settings: S3Settings) -> ObjectStore:
        config = AioConfig(
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path" if settings.path_style else "auto"},
            signature_version="s3v4",
            # botocore >= 1.36 adds CRC checksums (aws-chunked trailers) to every upload by
            # default, which Ceph, older MinIO and GCS reject; the mirror verifies digests itself.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        stack = AsyncExitStack()
        client = await stack.enter_async_context(
            get_session().create_client(
                "s3",
                endpoint_url=settings.endpoint,
                region_name=settings.region,
                aws_access_key_id=settings.access_key,
                aws_secret_access_key=settings.secret_key,
                config=config,
            )
        )
        return cls(settings, client, stack)

    async def close(self) -> None:
        await self._stack.aclose()

    async def ping(self) -> bool:
        """HEAD of the bucket: reachable, exists, and our credentials may use it. Never raises;
        answers within `ping_timeout` even while the server does not (botocore's retries back
        off for seconds)."""
        try:
            async with asyncio.timeout(self.settings.ping_timeout):
                await self._client.head_bucket(Bucket=self.settings.bucket)
            return True
        except Exception as error:  # a probe's answer is the bool; the reason goes to the log
            log.debug("S3 bucket %s unusable: %s", self.settings.bucket, type(error).__name__)
            return False

    @contextlib.asynccontextmanager
    async def _bounded(self, operation: str, key: str) -> AsyncIterator[None]:
        """One small request: translated errors (_errors) and a total deadline, retries
        included (`request_timeout`), whose expiry is an ObjectStoreError too."""
        with _errors(operation, key):
            async with asyncio.timeout(self.settings.request_timeout):
                yield

    def key(self, digest: str) -> str:
        algorithm, hexdigest = validate_digest(digest).split(":", 1)
        return f"{self.prefix}blobs/{algorithm}/{hexdigest[:2]}/{hexdigest}"

    async def begin_upload(self, digest: str, size: int | None = None) -> ObjectUpload:
        """A multipart upload of `digest`, begun at the first full part (a blob smaller than
        one part becomes a single PUT at complete())."""
        part_size = part_size_for(size, self.settings.part_size)
        return ObjectUpload(self._client, self.settings.bucket, self.key(digest), part_size)

    async def put(self, digest: str, data: bytes) -> None:
        key = self.key(digest)
        async with self._bounded("PutObject", key):
            await self._client.put_object(Bucket=self.settings.bucket, Key=key, Body=data)

    async def get(self, digest: str) -> bytes | None:
        key = self.key(digest)
        try:
            async with self._bounded("GetObject", key):
                response = await self._client.get_object(Bucket=self.settings.bucket, Key=key)
                async with response["Body"] as body:
                    return await body.read()
        except ObjectMissing:
            return None

    async def stat(self, digest: str) -> int | None:
        key = self.key(digest)
        try:
            async with self._bounded("HeadObject", key):
                response = await self._client.head_object(Bucket=self.settings.bucket, Key=key)
        except ObjectMissing:
            return None
        return response["ContentLength"]

    async def read(self, digest: str, start: int, end: int) -> ObjectStream:
        """Bytes [start, end) as they arrive. The GET is made here, so a missing object raises
        ObjectMissing before the caller commits to a response; the caller iterates the stream
        to its end (the connection goes back to the pool) or `aclose()`s it (the connection
        is closed). A server that answers another range than the one asked (one ignoring
        `Range` answers 200 and the whole object) is an error before any byte is relayed:
        a client resuming at an offset would keep the wrong bytes."""
        key = self.key(digest)
        if not 0 <= start <= end:
            raise ValueError(f"bad range [{start}, {end})")
        if start == end:
            return ObjectStream(None, key)
        async with self._bounded("GetObject", key):
            response = await self._client.get_object(
                Bucket=self.settings.bucket, Key=key, Range=f"bytes={start}-{end - 1}"
            )
        answered = response.get("ContentRange")
        if (answered is None and start) or (
            answered is not None and not answered.startswith(f"bytes {start}-{end - 1}/")
        ):
            response["Body"].close()
            BACKEND_ERRORS.labels("s3", "GetObject").inc()
            raise ObjectStoreError(
                f"S3 GetObject {key}: asked for bytes {start}-{end - 1}, "
                f"answered {answered or 'the whole object'}"
            )
        return ObjectStream(response["Body"], key, end - start)

    async def delete(self, digests: list[str]) -> None:
        """DeleteObjects in batches of 1000, DELETES_IN_FLIGHT at once (a request of 1000 keys
        waits on the server most of its time: one at a time, an eviction pass of 100,000 blobs
        spent most of its time waiting on them); keys already gone count as deleted (S3 says
        so). Every batch is waited for before an error is raised: the caller forgets rows
        only after their objects are gone."""
        keys = [self.key(d) for d in digests]
        slots = asyncio.Semaphore(DELETES_IN_FLIGHT)

        async def delete_batch(batch: list[str]) -> None:
            async with slots, self._bounded("DeleteObjects", f"({len(batch)} keys)"):
                response = await self._client.delete_objects(
                    Bucket=self.settings.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            failed = [e for e in response.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if failed:
                first = failed[0]
                raise ObjectStoreError(
                    f"S3 DeleteObjects: {len(failed)} keys failed, "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message', '')}"
                )

        batches = [keys[i : i + DELETE_BATCH] for i in range(0, len(keys), DELETE_BATCH)]
        results = await asyncio.gather(*map(delete_batch, batches), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def presign(self, digest: str, expires: float) -> str:
        """A GET URL valid `expires` seconds (whole, at least 1), signed locally: no request."""
        key = self.key(digest)
        with _errors("presign", key):
            return await self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.settings.bucket, "Key": key},
                ExpiresIn=max(1, math.ceil(expires)),
            )

    async def listing(self) -> AsyncIterator[tuple[str, int, float]]:
        """(digest, size, mtime) of every blob under the prefix, 1000 keys per request."""
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.settings.bucket, Prefix=f"{self.prefix}blobs/")
        with _errors("ListObjectsV2", f"{self.prefix}blobs/"):
            async for page in pages:
                for entry in page.get("Contents", []):
                    digest = parse_key(entry["Key"], self.prefix)
                    if digest is not None:
                        yield digest, entry["Size"], entry["LastModified"].timestamp()

    async def abort_stale_uploads(self, older_than: float) -> int:
        """Abort the multipart uploads of our blob keys begun more than `older_than` seconds
        ago (a crashed writer's; their parts are billed storage until aborted)."""
        cutoff = time.time() - older_than
        paginator = self._client.get_paginator("list_multipart_uploads")
        stale: list[tuple[str, str]] = []
        with _errors("ListMultipartUploads", self.prefix):
            pages = paginator.paginate(Bucket=self.settings.bucket, Prefix=f"{self.prefix}blobs/")
            async for page in pages:
                for upload in page.get("Uploads", []):
                    # Only uploads of our own keys: a bucket (or prefix) may be shared with
                    # other applications, whose uploads are none of our business.
                    if parse_key(upload["Key"], self.prefix) is None:
                        continue
                    if upload["Initiated"].timestamp() < cutoff:
                        stale.append((upload["Key"], upload["UploadId"]))
        for key, upload_id in stale:
            await _abort(self._client, self.settings.bucket, key, upload_id)
        return len(stale)


async def _abort(client: S3Client, bucket: str, key: str, upload_id: str) -> None:
    try:
        with _errors("AbortMultipartUpload", key):
            await client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except ObjectMissing:
        pass  # already aborted or completed


class ObjectStream:
    """The body of a ranged GET as an async iterator of the pieces received, errors as
    ObjectStoreError. Each piece is what the connection's reads brought, not joined into
    chunks of a fixed size: a relay to a client has no use for the copy. A body that ends
    before `length` bytes is an error, never a short success."""

    def __init__(self, body: StreamingBody | None, key: str, length: int = 0) -> None:
        self._body = body
        self._key = key
        self._left = length

    def __aiter__(self) -> ObjectStream:
        return self

    async def __anext__(self) -> bytes:
        if self._body is None:
            raise StopAsyncIteration
        try:
            with _errors("GetObject body", self._key, timed=False):
                chunk = await _next_piece(self._body.raw_stream.content)
            self._left -= len(chunk)
            if self._left < 0 or (not chunk and self._left):
                BACKEND_ERRORS.labels("s3", "GetObject").inc()
                raise ObjectStoreError(
                    f"S3 GetObject body {self._key}: {abs(self._left)} bytes "
                    f"{'over' if self._left < 0 else 'short of'} the range"
                )
        except BaseException:
            await self.aclose()
            raise
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            body.close()


async def _next_piece(content: aiohttp.StreamReader) -> bytes:
    """The next piece as received, b"" at the end. `readchunk`, not `readany`: readany joins
    every piece buffered (a third of a relay's samples were that copy); an empty piece that
    only marks the end of an HTTP chunk (chunked encoding) is skipped."""
    while True:
        piece, chunk_ended = await content.readchunk()
        if piece or not chunk_ended:
            return piece


class ObjectUpload:
    """One object written as a multipart upload, a part buffered at a time. Parts go up one
    after another as `write()` fills them, so a slow store slows the writer instead of growing
    memory."""

    def __init__(self, client: S3Client, bucket: str, key: str, part_size: int) -> None:
        self._client = client
        self.bucket = bucket
        self.key = key
        self.part_size = part_size
        self.upload_id: str | None = None  # set when the first part goes up
        self._parts: list[CompletedPartTypeDef] = []
        self._buffer = bytearray()
        self._done = False

    async def write(self, data: bytes) -> None:
        if self._done:
            raise ObjectStoreError(f"S3 upload {self.key}: already completed or aborted")
        self._buffer += data
        while len(self._buffer) >= self.part_size:
            part = bytes(self._buffer[: self.part_size])
            del self._buffer[: self.part_size]
            await self._upload_part(part)

    async def _upload_part(self, data: bytes) -> None:
        if self.upload_id is None:
            with _errors("CreateMultipartUpload", self.key):
                created = await self._client.create_multipart_upload(
                    Bucket=self.bucket, Key=self.key
                )
            self.upload_id = created["UploadId"]
        number = len(self._parts) + 1
        with _errors(f"UploadPart {number}", self.key):
            response = await self._client.upload_part(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=data,
            )
        self._parts.append({"PartNumber": number, "ETag": response["ETag"]})

    async def complete(self) -> None:
        """Upload what is buffered as the last part and complete: the object is visible once
        this returns, and not before."""
        if self._done:
            raise ObjectStoreError(f"S3 upload {self.key}: already completed or aborted")
        data, self._buffer = bytes(self._buffer), bytearray()
        if self.upload_id is None:  # smaller than a part: one PUT
            with _errors("PutObject", self.key):
                await self._client.put_object(Bucket=self.bucket, Key=self.key, Body=data)
        else:
            if data:
                await self._upload_part(data)
            with _errors("CompleteMultipartUpload", self.key):
                await self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
        self._done = True

    async def abort(self) -> None:
        """Drop the upload and its parts; again, or after the server dropped it, does nothing."""
        self._done = True
        self._buffer = bytearray()
        upload_id, self.upload_id = self.upload_id, None
        if upload_id is not None:
            await _abort(self._client, self.bucket, self.key, upload_id)
