"""What the supervisor removes from tmp/ after a worker died, and what it must leave alone."""

from __future__ import annotations

import os
from pathlib import Path

from mirror.recovery import orphaned_downloads, sweep_after_worker_crash
from mirror.shared import Claim

A = "sha256-" + "a" * 64
B = "sha256-" + "b" * 64
C = "sha256-" + "c" * 64


def test_orphaned_downloads() -> None:
    died_at = 1000.0
    temps = {
        f"{A}.000000000001": 990.0,  # named by A's live claim: a download under way
        f"{A}.000000000002": 999.0,  # the dead worker's older try at A
        f"{B}.000000000003": 998.0,  # no live claim: the dead worker's
        f"{B}.000000000004": 1001.0,  # written after the death: a live file not named yet
        f"{C}.000000000005": 900.0,  # C's claim could not be read: keep all of C
        "notes.txt": 0.0,  # not a download
    }
    claimed = {A: f"{A}.000000000001", C: None}
    assert orphaned_downloads(temps, claimed, died_at) == [
        f"{A}.000000000002",
        f"{B}.000000000003",
    ]


def test_sweep_leaves_live_claims_and_removes_dead_ones(tmp_path: Path) -> None:
    live = Claim.take(tmp_path / f"{A}.claim")  # held by this process: a live download
    live.note(temp=f"{A}.000000000001")
    files = [
        f"{A}.000000000001", f"{A}.000000000002", f"{B}.000000000003", f"{B}.claim",
        "manifest-x.lock",
    ]  # fmt: skip
    for name in files:
        (tmp_path / name).write_bytes(b"x" * 10)
        os.utime(tmp_path / name, (500.0, 500.0))
    swept = sweep_after_worker_crash(tmp_path, died_at=1000.0)
    assert sorted(os.listdir(tmp_path)) == [f"{A}.000000000001", f"{A}.claim"]
    assert (swept.downloads, swept.bytes, swept.claims_and_locks) == (2, 20, 2)
    live.close()
