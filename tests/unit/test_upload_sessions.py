"""Upload sessions on disk (hosted/uploads.py): bound to repository and user, appended in
order, expired when idle, and swept with what a crash left."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mirror.errors import RegistryError
from mirror.hosted.uploads import UploadSessions, upload_range


async def body(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_a_session_is_found_only_for_its_repository_and_user(tmp_path: Path) -> None:
    sessions = UploadSessions(tmp_path)
    upload = sessions.start("acme/app", "alice")
    assert sessions.find(upload.id, "acme/app", "alice") == upload
    for repository, user in (("acme/other", "alice"), ("acme/app", "bob")):
        with pytest.raises(RegistryError) as refused:
            sessions.find(upload.id, repository, user)
        assert (refused.value.status, refused.value.code) == (404, "BLOB_UPLOAD_UNKNOWN")
    for bad in ("../../etc/passwd", "", upload.id + "x", "a" * 32):
        with pytest.raises(RegistryError):
            sessions.find(bad, "acme/app", "alice")


async def test_chunks_append_in_order_and_a_wrong_offset_is_416(tmp_path: Path) -> None:
    sessions = UploadSessions(tmp_path)
    upload = sessions.start("acme/app", "alice")
    assert await sessions.append(upload, body(b"abc", b"de"), 0, 1000) == 5
    with pytest.raises(RegistryError) as refused:
        await sessions.append(upload, body(b"x"), 3, 1000)
    assert refused.value.status == 416 and refused.value.headers["Range"] == "0-4"
    assert await sessions.append(upload, body(b"fg"), 5, 1000) == 7
    assert await sessions.append(upload, body(b"h"), None, 1000) == 8
    assert upload.path.read_bytes() == b"abcdefgh"
    assert upload_range(0) == "0-0" and upload_range(8) == "0-7"


async def test_a_body_past_the_quota_is_refused_and_taken_back(tmp_path: Path) -> None:
    sessions = UploadSessions(tmp_path)
    upload = sessions.start("acme/app", "alice")
    await sessions.append(upload, body(b"12345"), None, 10)
    with pytest.raises(RegistryError) as refused:
        await sessions.append(upload, body(b"678", b"9012"), None, 6)
    assert refused.value.code == "DENIED" and "hosted_max_size" in refused.value.message
    assert upload.path.read_bytes() == b"12345"


async def test_idle_sessions_expire_and_are_swept(tmp_path: Path) -> None:
    now = [1_000_000.0]
    sessions = UploadSessions(tmp_path, ttl=3600, clock=lambda: now[0])
    idle = sessions.start("acme/app", "alice")
    busy = sessions.start("acme/app", "alice")
    for upload, mtime in ((idle, now[0] - 3601), (busy, now[0] - 10)):
        os.utime(upload.path, (mtime, mtime))
        meta = tmp_path / f"{upload.id}.json"
        os.utime(meta, (now[0] - 7200, now[0] - 7200))
    (tmp_path / ".crashed.json").write_text("{}")
    os.utime(tmp_path / ".crashed.json", (now[0] - 7200, now[0] - 7200))
    with pytest.raises(RegistryError):
        sessions.find(idle.id, "acme/app", "alice")
    assert sessions.sweep() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{busy.id}.data", f"{busy.id}.json"]
    )
    assert sessions.find(busy.id, "acme/app", "alice") == busy


async def test_other_sessions_bytes_count_as_they_grow(tmp_path: Path) -> None:
    """The room is the quota's for every session: the others' bytes are looked at before
    each chunk, not once per request (sessions growing at once each saw the others empty)."""
    sessions = UploadSessions(tmp_path)
    growing, other = sessions.start("acme/app", "alice"), sessions.start("acme/app", "bob")

    async def chunks() -> AsyncIterator[bytes]:
        yield b"123"
        await sessions.append(other, body(b"abcde"), None, 10)  # grows meanwhile
        yield b"4567"

    with pytest.raises(RegistryError) as refused:
        await sessions.append(growing, chunks(), None, 10)
    assert refused.value.code == "DENIED"
    assert growing.path.read_bytes() == b"" and other.path.read_bytes() == b"abcde"


async def test_the_sweep_leaves_a_session_being_committed(tmp_path: Path) -> None:
    """A PUT ending a session idle for just under the TTL takes its file; the sweep removes
    taken files as a crash's leftovers once idle past the TTL, and the rename kept the
    session's time: the bytes went while they were being verified and stored (a 500)."""
    now = [time.time()]  # the file system's clock: `take` sets the taken file's time
    sessions = UploadSessions(tmp_path, ttl=3600, clock=lambda: now[0])
    upload = sessions.start("acme/app", "alice")
    await sessions.append(upload, body(b"layer bytes"), None, 1 << 20)
    os.utime(upload.path, (now[0] - 3599, now[0] - 3599))
    taken = sessions.take(sessions.find(upload.id, "acme/app", "alice"))
    now[0] += 2  # the sweep's next run, while the commit reads `taken`
    sessions.sweep()
    assert taken.read_bytes() == b"layer bytes"
