"""Worker sizing against fake cgroup trees (v1, v2, nested, containers) and env validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.master.sizing import CpuBudget, CpuQuota, cgroup_quota, worker_count
from workers.settings import Settings, SettingsError

V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
V1_MOUNT = "32 31 0:29 {root} /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_quota_is_rounded_up(tmp_path: Path) -> None:
    write(tmp_path, "/sys/fs/cgroup/app.slice/cpu.max", "150000 100000\n")
    quota = cgroup_quota("0::/app.slice\n", V2_MOUNT, tmp_path)
    assert quota is not None and quota.cpus == 2
    assert "cgroup v2 cpu.max 150000/100000us" in quota.detail


def test_v2_max_means_no_quota(tmp_path: Path) -> None:
    write(tmp_path, "/sys/fs/cgroup/app.slice/cpu.max", "max 100000\n")
    assert cgroup_quota("0::/app.slice\n", V2_MOUNT, tmp_path) is None


def test_v2_parent_quota_applies_to_child(tmp_path: Path) -> None:
    write(tmp_path, "/sys/fs/cgroup/kubepods/cpu.max", "100000 100000\n")
    write(tmp_path, "/sys/fs/cgroup/kubepods/pod1/cpu.max", "max 100000\n")
    quota = cgroup_quota("0::/kubepods/pod1\n", V2_MOUNT, tmp_path)
    assert quota is not None and quota.cpus == 1


def test_v1_quota_and_unlimited(tmp_path: Path) -> None:
    write(tmp_path, "/sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_quota_us", "300000\n")
    write(tmp_path, "/sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_period_us", "100000\n")
    write(tmp_path, "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    write(tmp_path, "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    mounts = V1_MOUNT.format(root="/")
    quota = cgroup_quota("4:cpu,cpuacct:/job\n", mounts, tmp_path)
    assert quota is not None and quota.cpus == 3
    assert cgroup_quota("4:cpu,cpuacct:/\n", mounts, tmp_path) is None


def test_v1_container_path_is_joined_through_the_mount_root(tmp_path: Path) -> None:
    """In a container /proc/self/cgroup says /docker/<id>, which is the mount's root."""
    write(tmp_path, "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "200000\n")
    write(tmp_path, "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    mounts = V1_MOUNT.format(root="/docker/abc123")
    quota = cgroup_quota("4:cpu,cpuacct:/docker/abc123\n", mounts, tmp_path)
    assert quota is not None and quota.cpus == 2


def test_no_cgroup_files_means_no_quota(tmp_path: Path) -> None:
    assert cgroup_quota("0::/\n", V2_MOUNT, tmp_path) is None
    assert cgroup_quota("", "", tmp_path) is None


def budget(affinity: int, quota: int | None, total: int = 64) -> CpuBudget:
    return CpuBudget(total, affinity, CpuQuota(quota, "q") if quota else None)


@pytest.mark.parametrize(
    ("affinity", "quota", "usable"), [(64, 2, 2), (1, 4, 1), (8, None, 8), (3, 3, 3)]
)
def test_usable_is_the_smallest_limit(affinity: int, quota: int | None, usable: int) -> None:
    assert budget(affinity, quota).usable == usable


def test_source_names_the_binding_limit() -> None:
    assert budget(64, 2).source == "q"
    assert budget(1, 4).source == "CPU affinity 1 of 64"
    assert budget(64, None).source == "no affinity or cgroup limit"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, 4),
        ({"WEB_CONCURRENCY": "3"}, 3),
        ({"HEAVYAPP_WORKERS_PER_CORE": "2"}, 8),
        ({"HEAVYAPP_WORKERS_PER_CORE": "2", "HEAVYAPP_MAX_WORKERS": "5"}, 5),
        ({"WEB_CONCURRENCY": "7", "HEAVYAPP_MAX_WORKERS": "2"}, 7),
    ],
)
def test_worker_count(env: dict[str, str], expected: int) -> None:
    assert worker_count(Settings.from_env(env), budget(4, None)) == expected


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5"])
def test_bad_web_concurrency_is_refused(bad: str) -> None:
    with pytest.raises(SettingsError, match="WEB_CONCURRENCY"):
        worker_count(Settings.from_env({"WEB_CONCURRENCY": bad}), budget(4, None))
