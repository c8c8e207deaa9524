"""Blob upload sessions, kept on disk under `<data>/uploads/`: one file of the bytes received so
far and one of who started it for which repository.

On disk, not in memory, because a worker process other than the one that started a session
may get its next request (the workers share the listen socket). The bytes file's size is the
session's offset, its modification time the last activity: a session idle for `UPLOAD_TTL`
is removed with its bytes. A session is a capability bound to its repository and its user:
the id alone opens nothing for another name or another login. Appends take an exclusive
lock on the bytes file, so two requests for one session never interleave their bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mirror.errors import RegistryError
from mirror.metrics import HOSTED_RECEIVED_BYTES

log = logging.getLogger(__name__)

UPLOAD_TTL = 3600.0  # seconds a session may sit idle before it and its bytes go
SWEEP_EVERY = 300.0  # seconds between looks for idle sessions
_ID = re.compile(r"^[A-Za-z0-9_-]{32}$")


@dataclass(frozen=True, slots=True)
class Upload:
    id: str
    repository: str
    user: str
    path: Path  # the bytes received so far

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def upload_unknown(upload_id: str) -> RegistryError:
    return RegistryError(
        404, "BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry", {"uuid": upload_id[:64]}
    )


def upload_range(size: int) -> str:
    """The `Range` header of a session: the bytes received, inclusive (`0-0` when none, as
    distribution answers)."""
    return f"0-{max(size - 1, 0)}"


class UploadSessions:
    def __init__(
        self, root: Path, ttl: float = UPLOAD_TTL, clock: Callable[[], float] = time.time
    ) -> None:
        self.root = root
        self._ttl = ttl
        self._clock = clock
        root.mkdir(parents=True, exist_ok=True)

    def start(self, repository: str, user: str) -> Upload:
        upload_id = secrets.token_urlsafe(24)
        path = self.root / f"{upload_id}.data"
        path.touch(exist_ok=False)
        meta = self.root / f"{upload_id}.json"
        staged = self.root / f".{upload_id}.json"
        staged.write_text(json.dumps({"repository": repository, "user": user}))
        os.rename(staged, meta)
        return Upload(upload_id, repository, user, path)

    def find(self, upload_id: str, repository: str, user: str) -> Upload:
        """The session, if it exists, is not expired, and is this repository's and user's."""
        if not _ID.fullmatch(upload_id):
            raise upload_unknown(upload_id)
        path = self.root / f"{upload_id}.data"
        try:
            meta = json.loads((self.root / f"{upload_id}.json").read_text())
            idle = self._clock() - path.stat().st_mtime
        except (OSError, ValueError) as exc:
            raise upload_unknown(upload_id) from exc
        if meta.get("repository") != repository or meta.get("user") != user or idle > self._ttl:
            raise upload_unknown(upload_id)
        return Upload(upload_id, repository, user, path)

    async def append(
        self, upload: Upload, body: AsyncIterator[bytes], start: int | None, room: int
    ) -> int:
        """Append a request body; the session's new size. `start`: the first byte's offset
        the client claims (Content-Range), refused with 416 unless it is the session's size.
        `room`: bytes the quota leaves all sessions (quota.py); a body that would take this
        session past what the other sessions leave of it is refused and its bytes taken
        back. The others are looked at before each chunk, as they grow too: sessions
        growing at once pass the room by one chunk each at most. A body cut short keeps
        what arrived: the client asks the offset and resumes from there."""
        with _locked(upload, os.O_WRONLY | os.O_APPEND) as fd:
            before = size = os.fstat(fd).st_size
            if start is not None and start != size:
                raise RegistryError(
                    416, "BLOB_UPLOAD_INVALID",
                    f"chunk starts at {start}, the upload holds {size} bytes",
                    headers={"Range": upload_range(size)},
                )  # fmt: skip
            async for chunk in body:
                if size + len(chunk) + self.held_bytes(upload.id) > room:
                    os.ftruncate(fd, before)
                    raise quota_exceeded()
                view = memoryview(chunk)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                    size += written
                HOSTED_RECEIVED_BYTES.inc(len(chunk))
            return size

    def take(self, upload: Upload) -> Path:
        """End the session for every other request and hand its bytes over: the file is
        renamed, under the append lock, to a name only the caller knows (a concurrent PUT,
        PATCH or DELETE of the session then finds none: 404). The caller removes the file."""
        with _locked(upload, os.O_RDONLY):
            taken = self.root / f"{upload.id}.taken"
            try:
                os.rename(upload.path, taken)
            except FileNotFoundError as exc:  # taken or cancelled an instant ago
                raise upload_unknown(upload.id) from exc
            # The sweep removes a taken file as a crash's leftover once it is idle past the
            # TTL: the rename kept the session's time, and its commit is just starting.
            os.utime(taken)
        (self.root / f"{upload.id}.json").unlink(missing_ok=True)
        return taken

    def held_bytes(self, except_id: str) -> int:
        """Bytes every other session holds: the room a session may grow into is what the
        quota leaves after them."""
        held = 0
        for entry in os.scandir(self.root):
            if entry.name.endswith(".data") and entry.name != f"{except_id}.data":
                with contextlib.suppress(FileNotFoundError):
                    held += entry.stat().st_size
        return held

    def remove(self, upload_id: str) -> None:
        for suffix in (".data", ".json"):
            (self.root / f"{upload_id}{suffix}").unlink(missing_ok=True)

    def sweep(self) -> int:
        """Remove sessions idle longer than the TTL, and what a crash left half-made; how
        many sessions went."""
        cutoff = self._clock() - self._ttl
        removed = 0
        for entry in os.scandir(self.root):
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime >= cutoff:
                    continue
                if entry.name.endswith(".data"):
                    self.remove(entry.name.removesuffix(".data"))
                    removed += 1
                elif not (self.root / f"{entry.name.lstrip('.').partition('.')[0]}.data").exists():
                    os.unlink(entry.path)  # metadata whose bytes went, or a crash's staged file
        return removed


@contextlib.contextmanager
def _locked(upload: Upload, mode: int) -> Iterator[int]:
    """The session's bytes file, open in `mode` and locked for this request alone (released
    with the descriptor); 416 when another request holds it, 404 when the session is gone."""
    try:
        fd = os.open(upload.path, mode | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise upload_unknown(upload.id) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise RegistryError(
                416, "BLOB_UPLOAD_INVALID", "another request is writing to this upload",
                headers={"Range": upload_range(os.fstat(fd).st_size)},
            ) from exc  # fmt: skip
        yield fd
    finally:
        os.close(fd)


def quota_exceeded() -> RegistryError:
    return RegistryError.denied("hosted_max_size reached: the hosted quota is full")


async def sweep_uploads(uploads: UploadSessions, every: float = SWEEP_EVERY) -> None:
    """Remove idle sessions now and every `every` seconds (the primary process runs it)."""
    while True:
        try:
            removed = await asyncio.to_thread(uploads.sweep)
        except OSError as exc:
            log.warning("upload sessions: sweep failed: %s", exc)
        else:
            if removed:
                log.info("upload sessions: %d idle for %ds removed", removed, UPLOAD_TTL)
        await asyncio.sleep(every)
