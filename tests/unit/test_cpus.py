"""The default number of workers follows the CPU quota of the cgroup, not the host's cores."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirror import config as config_module
from mirror.config import load_config
from mirror.cpus import cgroup_cpu_limit, default_workers, parse_cfs_quota, parse_cpu_max


@pytest.mark.parametrize(
    ("cores", "limit", "workers"),
    [
        (64, 2.0, 2),  # docker run --cpus 2 on a 64-core host
        (64, 1.5, 2),  # rounded up
        (64, 0.5, 1),
        (4, 16.0, 4),  # a quota above the cores the process may run on
        (4, None, 4),  # no quota
        (64, None, 8),  # capped
        (64, 12.0, 8),
        (1, None, 1),
    ],
)
def test_default_workers(cores: int, limit: float | None, workers: int) -> None:
    assert default_workers(cores, limit) == workers


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("200000 100000\n", 2.0), ("150000 100000", 1.5), ("max 100000\n", None), ("", None)],
)
def test_cgroup_v2_cpu_max(text: str, cpus: float | None) -> None:
    assert parse_cpu_max(text) == cpus


def test_cgroup_v1_cfs_quota() -> None:
    assert parse_cfs_quota("300000\n", "100000\n") == 3.0
    assert parse_cfs_quota("-1\n", "100000\n") is None


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_quota_of_own_cgroup_or_a_parent_whichever_is_smaller(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc-self-cgroup"
    write(proc, "0::/kubepods/pod1/ctr\n")
    write(root / "cpu.max", "max 100000\n")
    write(root / "kubepods/pod1/cpu.max", "300000 100000\n")
    write(root / "kubepods/pod1/ctr/cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(root, proc) == 3.0
    write(root / "kubepods/pod1/ctr/cpu.max", "150000 100000\n")
    assert cgroup_cpu_limit(root, proc) == 1.5


def test_v2_inside_a_cgroup_namespace(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc-self-cgroup"
    write(proc, "0::/\n")
    write(root / "cpu.max", "200000 100000\n")
    assert cgroup_cpu_limit(root, proc) == 2.0


def test_v1_container_whose_path_the_mount_does_not_have(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc-self-cgroup"
    write(proc, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    write(root / "cpu,cpuacct/cpu.cfs_quota_us", "200000\n")
    write(root / "cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(root, proc) == 2.0


def test_no_cgroup_files_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path / "none", tmp_path / "nothing") is None


def test_load_config_defaults_to_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "cgroup_cpu_limit", lambda: 0.5)
    assert load_config({}, {}).workers == 1
    assert load_config({"workers": 3}, {}).workers == 3  # given, it is obeyed
