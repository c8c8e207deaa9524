"""The disk-full mode ends by itself: its gauge falls back without a request to ask."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from mirror.store.blobs import BlobStore


def disk_full_gauge() -> float | None:
    return REGISTRY.get_sample_value("mirror_disk_full")


def test_disk_full_mode_lasts_its_window_then_the_gauge_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr("mirror.store.blobs.local.time.monotonic", lambda: now[0])
    store = BlobStore(tmp_path)
    assert not store.note_if_full(OSError(errno.EIO, "i/o error"))
    assert not store.full
    assert store.note_if_full(OSError(errno.ENOSPC, "No space left on device"))
    assert store.full and disk_full_gauge() == 1
    now[0] += store.FULL_FOR - 1
    store.refresh_full()
    assert store.full and disk_full_gauge() == 1
    now[0] += 2
    store.refresh_full()
    assert not store.full and disk_full_gauge() == 0


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_quota_and_space_errors_both_count(tmp_path: Path, code: int) -> None:
    assert BlobStore(tmp_path).note_if_full(OSError(code, "full"))
