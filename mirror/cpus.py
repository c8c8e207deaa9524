"""How many worker processes `mirror serve` starts when `--workers` is not given.

`os.sched_getaffinity` counts the cores the process may run on, not the CPU time it gets: a
container started with `docker run --cpus 2` (or a Kubernetes `limits.cpu: 2`) on a 64-core
host sees 64 cores and is throttled to 2 cores' worth of time. That limit is the cgroup's CPU
quota: `cpu.max` (cgroup v2: `<quota> <period>` or `max <period>`) or `cpu.cfs_quota_us` over
`cpu.cfs_period_us` (cgroup v1; -1 is no limit), in microseconds per period.
"""

from __future__ import annotations

import math
from pathlib import Path

# Past a handful of processes the mirror is bound by disk and network (blobs leave through
# sendfile), not by Python; each further worker only adds its own memory caches (up to 64 MiB
# of manifests), index connection and upstream connection pool (`max_upstream_fetches` each),
# and one more process taking turns at the single SQLite writer and the shared lock files.
# A large host gets 8 by default; `--workers` may ask for more.
MAX_DEFAULT_WORKERS = 8

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def default_workers(cores: int, cpu_limit: float | None, cap: int = MAX_DEFAULT_WORKERS) -> int:
    """min(cores the process may run on, its CPU quota rounded up, `cap`), at least 1.

    Rounded up: a quota of 1.5 CPUs is best used by two processes, each busy part of the time.
    """
    usable = cores if cpu_limit is None else min(cores, math.ceil(cpu_limit))
    return max(1, min(usable, cap))


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 `cpu.max`: `200000 100000` is 2 CPUs, `max 100000` no limit."""
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def parse_cfs_quota(quota: str, period: str) -> float | None:
    """cgroup v1 `cpu.cfs_quota_us` over `cpu.cfs_period_us`; a quota of -1 is no limit."""
    return _ratio(quota.strip(), period.strip())


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _upward(top: Path, own: str) -> list[Path]:
    """`top/own` and each of its parents up to `top`: a quota on a parent limits its children
    too. Inside a container with its own cgroup namespace `own` is `/`, the container itself;
    without one, a path the mount does not have simply leads back up to `top`."""
    path = top / own.lstrip("/")
    chain = [path]
    while path != top and top in path.parents:
        path = path.parent
        chain.append(path)
    return chain


def cgroup_cpu_limit(
    root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP
) -> float | None:
    """This process's CPU quota in CPUs (the smallest on its cgroup's path), or None."""
    limits: list[float] = []
    for line in (_read(proc_cgroup) or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, own = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2
            for directory in _upward(root, own):
                text = _read(directory / "cpu.max")
                limit = parse_cpu_max(text) if text is not None else None
                limits += [limit] if limit is not None else []
        elif "cpu" in controllers.split(","):  # cgroup v1, mounted as cpu or cpu,cpuacct
            for mount in (root / "cpu", root / controllers):
                for directory in _upward(mount, own):
                    quota = _read(directory / "cpu.cfs_quota_us")
                    period = _read(directory / "cpu.cfs_period_us")
                    if quota is not None and period is not None:
                        limit = parse_cfs_quota(quota, period)
                        limits += [limit] if limit is not None else []
    return min(limits, default=None)
