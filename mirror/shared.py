"""What the worker processes of one mirror share besides the data: locks and two numbers.

Workers (`--workers N`) share the data directory and the index, but not memory. Three things
need agreement across them, all built on `flock(2)`, which the kernel drops when a process
dies, so a `kill -9` never leaves a lock held:

- `FileLock`: a cross-process mutex (eviction passes, upstream manifest fetches), or a
  shared/exclusive lock (hosted pushes share it, hosted GC holds it);
- `Claim`: who downloads a blob; the others follow the claimant's growing temp file;
- `SharedState`: cache usage in bytes (reservations included) and a generation number that
  moves whenever content is deleted, so per-worker memory caches know to drop what they hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import mmap
import os
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

POLL = 0.005  # seconds between attempts on a lock another process holds


def _open_locked(path: Path, mode: int) -> int | None:
    """An fd on `path` holding `mode` (LOCK_EX/LOCK_SH), or None if another process holds it.

    The inode check closes the race with a holder that unlinks the file while releasing it:
    a lock taken on an unlinked inode is worthless, so try again on the new file.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


class FileLock:
    """A cross-process mutex for asyncio: polls a non-blocking flock, never blocks the loop."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._local = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        async with self._local:
            while (fd := _open_locked(self._path, fcntl.LOCK_EX)) is None:
                await asyncio.sleep(POLL)
            try:
                yield
            finally:
                os.close(fd)

    @contextlib.asynccontextmanager
    async def share(self) -> AsyncIterator[None]:
        """Held beside other sharers (in any process), never beside `hold`: each sharer has
        a descriptor of its own, and flock(2) locks belong to descriptions, not processes."""
        while (fd := _open_locked(self._path, fcntl.LOCK_SH)) is None:
            await asyncio.sleep(POLL)
        try:
            yield
        finally:
            os.close(fd)


@contextlib.asynccontextmanager
async def keyed_lock(directory: Path, key: str) -> AsyncIterator[None]:
    """Hold the cross-process lock named `key` (a file under `directory`, removed after)."""
    path = directory / f"{key}.lock"
    while (fd := _open_locked(path, fcntl.LOCK_EX)) is None:
        await asyncio.sleep(POLL)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


class Claim:
    """The right to download one blob, and the notes the claimant leaves for its followers.

    The claim file holds JSON: `{"temp": name}` once the temp file exists, plus `"size"` once
    upstream answered, or `{"error": {...}}` if the download failed. A follower keeps its own
    descriptor, so it can read the outcome after the claimant unlinked the file.
    """

    def __init__(self, path: Path, fd: int, owner: bool) -> None:
        self.path = path
        self._fd = fd
        self.owner = owner

    @classmethod
    def take(cls, path: Path) -> Claim:
        """Claim `path`, or, if another process holds it, watch it."""
        while True:
            fd = _open_locked(path, fcntl.LOCK_EX)
            if fd is not None:
                os.ftruncate(fd, 0)
                return cls(path, fd, owner=True)
            try:
                return cls(path, os.open(path, os.O_RDONLY | os.O_CLOEXEC), owner=False)
            except FileNotFoundError:
                continue  # the claimant just finished: look again

    def note(self, **notes: Any) -> None:
        data = json.dumps(notes).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def read(self) -> dict[str, Any]:
        """The claimant's notes; {} while a write is half done."""
        try:
            value = json.loads(os.pread(self._fd, 65536, 0) or b"{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def released(self) -> bool:
        """For a follower: the claimant let go (done, failed, or died)."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        return True

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd < 0:
            return
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = -1


def remove_if_unheld(path: Path) -> bool:
    """Delete a claim or lock file whose holder is gone; False if a live process holds it.

    It is taken with LOCK_EX and unlinked while held, as keyed_lock releases: a process that
    opened it meanwhile finds the inode gone once it gets the lock, and starts over.
    """
    if not path.exists():
        return False
    fd = _open_locked(path, fcntl.LOCK_EX)
    if fd is None:
        return False
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    finally:
        os.close(fd)
    return True


def claim_notes(path: Path, attempts: int = 3) -> dict[str, Any] | None:
    """A claim's notes as its claimant last wrote them; None if they cannot be read (gone, or
    caught mid-rewrite each time: a rewrite truncates, then writes, microseconds apart)."""
    for attempt in range(attempts):
        try:
            value = json.loads(path.read_bytes() or b"null")
        except FileNotFoundError:
            return None
        except ValueError:
            value = None
        if isinstance(value, dict):
            return value
        time.sleep(0.001 * (attempt + 1))
    return None


_LAYOUT = struct.Struct("<qq")  # usage bytes, generation


class SharedState:
    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if os.fstat(self._fd).st_size < _LAYOUT.size:
            os.ftruncate(self._fd, _LAYOUT.size)
        self._map = mmap.mmap(self._fd, _LAYOUT.size)
        self._hooks: list[Callable[[], None]] = []

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    @property
    def usage(self) -> int:
        return int(_LAYOUT.unpack_from(self._map)[0])

    @property
    def generation(self) -> int:
        return int(_LAYOUT.unpack_from(self._map)[1])

    def _update(self, usage_delta: int = 0, usage: int | None = None, bump: int = 0) -> int:
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # microseconds: a read and a write of 16 bytes
        try:
            current, generation = _LAYOUT.unpack_from(self._map)
            current = (current if usage is None else usage) + usage_delta
            _LAYOUT.pack_into(self._map, 0, current, generation + bump)
            return int(current)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def add_usage(self, delta: int) -> int:
        return self._update(usage_delta=delta)

    def set_usage(self, value: int) -> None:
        self._update(usage=value)

    def content_removed(self) -> None:
        """Content or a tag mapping went (eviction, purge, a tag that moved): every worker's
        memory caches are stale. Hooks (cluster/notify.py) tell the other replicas."""
        self._update(bump=1)
        for hook in self._hooks:
            hook()

    def changed_elsewhere(self) -> None:
        """Another replica removed or moved something: drop memory caches, tell nobody."""
        self._update(bump=1)

    def on_change(self, hook: Callable[[], None]) -> None:
        self._hooks.append(hook)
