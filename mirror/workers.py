"""`--workers N`: N processes serve one listen address, one data directory and one index.

One Python process uses one core, so the mirror runs several. The supervisor (the `mirror
serve` process) makes sure the listen address is its to take (listeners.py), recovers the data
once, then starts the workers as fresh interpreters (so prometheus-client's multiprocess mode is
set before it is imported). Each worker binds the listen address with SO_REUSEPORT, and the
kernel spreads connections over them; worker 0 also serves the admin API and runs periodic
maintenance. What the workers must agree on (who downloads a blob, cache usage, eviction) goes
through lock files and the shared state (see shared.py) and the SQLite index (WAL).

Each worker tells the supervisor over a pipe once its listeners are up ("ready"), or why they
cannot be ("error ..."). The mirror announces itself only once every worker is ready. A worker
that exits before it was ready is not restarted: what stopped it (a port another process
holds, a broken data directory) would stop the next one too, so the supervisor stops the rest
and exits 1 with the reason, rather than restarting a failing worker every second forever. A
worker that dies later is restarted, once its partial downloads are swept (recovery.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import select
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

import uvloop

from mirror.app import prepare_data, run
from mirror.config import Config
from mirror.listeners import ListenError, hold, probe
from mirror.recovery import SWEEP_GRACE, Swept, sweep_after_worker_crash

log = logging.getLogger(__name__)

WORKER_FLAG = "--worker"
RESTART_DELAY = SWEEP_GRACE  # the sweep of a dead worker's downloads waits this long anyway
PR_SET_PDEATHSIG = 1
READY = b"ready\n"
ERROR = b"error "


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


def run_worker(config: Config, tls: ssl.SSLContext | None, number: int, report_fd: int) -> int:
    """A worker's life: serve until told to stop, reporting to the supervisor over
    `report_fd` once the listeners are up, or why they cannot be (then exit 1, quietly: the
    supervisor says it, once)."""

    def ready() -> None:
        os.write(report_fd, READY)
        os.close(report_fd)

    try:
        uvloop.run(run(config, tls, number, ready=ready))
    except ListenError as exc:
        os.write(report_fd, ERROR + str(exc).encode() + b"\n")
        return 1
    return 0


class Worker:
    """One worker process, and what it reported over its pipe."""

    def __init__(self, number: int, argv: Sequence[str], env: dict[str, str]) -> None:
        self.number = number
        self.reports, write = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [*argv, WORKER_FLAG, f"{number}:{os.getpid()}:{write}"], env=env, pass_fds=(write,)
            )
        finally:
            os.close(write)  # the worker holds the only write end: EOF when it exits
        self.said = b""
        self.open = True

    def read(self) -> bool:
        """Take in what the worker wrote (call when readable, or once it exited); False at EOF."""
        chunk = os.read(self.reports, 4096) if self.open else b""
        self.said += chunk
        if not chunk and self.open:
            os.close(self.reports)
            self.open = False
        return bool(chunk)

    @property
    def ready(self) -> bool:
        return self.said.startswith(READY)

    def failure(self) -> str:
        """Why this worker, gone before it was ready, did not start: one line."""
        while self.read():
            pass
        if self.said.startswith(ERROR):
            reason = self.said[len(ERROR) :].decode(errors="replace").strip()
        else:
            code = self.proc.wait()
            reason = f"it exited with {code} (its error is above)"
        return (
            f"worker {self.number} failed to start: {reason}; stopping, as a restart would "
            "fail the same way"
        )

    def close(self) -> None:
        if self.open:
            os.close(self.reports)
            self.open = False


def _until_ready(workers: dict[int, Worker], stopping: Callable[[], bool]) -> str | None:
    """Wait until every worker reported ready: None, or the first one's failure."""
    waiting = {w.reports: w for w in workers.values()}
    while waiting and not stopping():
        readable, _, _ = select.select(list(waiting), [], [], 1.0)
        for fd in readable:
            worker = waiting[fd]
            more = worker.read()
            if worker.ready:
                del waiting[fd]
            elif not more:  # it exited (after saying why, if it could)
                return worker.failure()
    return None


def supervise(config: Config, argv: Sequence[str], announce: Callable[[], None]) -> int:
    """Run `config.workers` workers with the same arguments until SIGTERM or SIGINT; call
    `announce` once all are ready. 1 if the mirror could not start (one line on stderr)."""
    try:
        held = hold(config.listen_host, config.listen_port, "listen")
        probe(config.admin_host, config.admin_port, "admin_listen")
    except ListenError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 1
    try:
        return _supervise(config, argv, announce)
    finally:
        for sock in held:
            sock.close()


def _supervise(config: Config, argv: Sequence[str], announce: Callable[[], None]) -> int:
    asyncio.run(_prepare(config))
    metrics_dir = config.data_dir / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)  # counters restart with the process
    metrics_dir.mkdir(parents=True)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    command = [sys.executable, "-m", "mirror", "serve", *argv]
    workers = {number: Worker(number, command, env) for number in range(config.workers)}
    stopping = False
    failure: str | None = None

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers.values():
            if worker.proc.returncode is None:  # os.kill, not send_signal: that would reap
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.proc.pid, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failure = _until_ready(workers, lambda: stopping)
    if stopping:  # asked to stop while starting: workers that went down then did not fail
        failure = None
    elif failure is not None:
        # Nothing was announced: the rest are stopped at once, and only the reason is printed.
        for worker in workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()
            worker.proc.wait()
            worker.close()
        print(f"mirror: {failure}", file=sys.stderr)
        return 1
    else:
        announce()
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        died_at = time.time()
        dead = next((w for w in workers.values() if w.proc.pid == pid), None)
        if dead is None:
            continue
        dead.proc.returncode = os.waitstatus_to_exitcode(status)
        _mark_dead(pid, metrics_dir)
        while dead.read():
            pass
        if stopping:
            del workers[dead.number]
            continue
        if not dead.ready:  # a restarted worker that could not start
            failure = dead.failure()
            print(f"mirror: {failure}", file=sys.stderr)
            del workers[dead.number]
            stop(signal.SIGTERM, None)
            continue
        log.error("worker %d exited with %d; restarting it", dead.number, dead.proc.returncode)
        time.sleep(RESTART_DELAY)
        if stopping:  # a SIGTERM came meanwhile
            del workers[dead.number]
            continue
        try:
            swept = sweep_after_worker_crash(config.data_dir / "tmp", died_at)
        except OSError as exc:  # the restart matters more; the next start empties tmp/ anyway
            log.error("could not sweep tmp/ after worker %d died: %s", dead.number, exc)
            swept = Swept()
        if swept.downloads or swept.claims_and_locks:
            log.warning(
                "worker %d left %d partial download(s) (%d bytes) and %d claim/lock file(s) "
                "in tmp/: removed", dead.number, swept.downloads, swept.bytes,
                swept.claims_and_locks,
            )  # fmt: skip
        workers[dead.number] = Worker(dead.number, command, env)
    return 1 if failure is not None else 0


def _mark_dead(pid: int, metrics_dir: Path) -> None:
    """Drop a dead worker's live gauges (its counters stay: totals never go backwards)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]
