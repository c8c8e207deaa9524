"""`--workers N`: N processes serve one listen address, one data directory and one index.

One Python process uses one core, so the mirror runs several. The supervisor (the `mirror
serve` process) recovers the data once, then starts the workers as fresh interpreters (so
prometheus-client's multiprocess mode is set before it is imported) and restarts any that
dies. Each worker binds the listen address with SO_REUSEPORT, and the kernel spreads
connections over them; worker 0 also serves the admin API and runs periodic maintenance.
What the workers must agree on (who downloads a blob, cache usage, eviction) goes through
lock files and the shared state (see shared.py) and the SQLite index (WAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from mirror.app import prepare_data
from mirror.config import Config

log = logging.getLogger(__name__)

WORKER_FLAG = "--worker"
RESTART_DELAY = 1.0
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """A worker must not outlive its supervisor: a `kill -9` of `mirror serve` stops all of it
    (SIGKILL, so it is a crash like any other: recovery at the next start cleans up)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


async def _prepare(config: Config) -> None:
    index, shared = await prepare_data(config)
    await index.close()
    shared.close()


def supervise(config: Config, argv: Sequence[str]) -> int:
    """Run `config.workers` workers with the same arguments until SIGTERM or SIGINT."""
    asyncio.run(_prepare(config))
    metrics_dir = config.data_dir / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)  # counters restart with the process
    metrics_dir.mkdir(parents=True)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    parent = str(os.getpid())

    def start(number: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "mirror", "serve", *argv, WORKER_FLAG, f"{number}:{parent}"],
            env=env,
        )

    workers = {number: start(number) for number in range(config.workers)}
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for proc in workers.values():
            if proc.returncode is None:  # os.kill, not send_signal: that would reap (poll)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        number = next((n for n, p in workers.items() if p.pid == pid), None)
        if number is None:
            continue
        workers[number].returncode = os.waitstatus_to_exitcode(status)
        _mark_dead(pid, metrics_dir)
        if stopping:
            del workers[number]
            continue
        log.error("worker %d exited with %d; restarting it", number, workers[number].returncode)
        time.sleep(RESTART_DELAY)
        workers[number] = start(number)
    return 0


def _mark_dead(pid: int, metrics_dir: Path) -> None:
    """Drop a dead worker's live gauges (its counters stay: totals never go backwards)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]
