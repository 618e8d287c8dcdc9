"""How many CPUs this process may really use, and so how many workers to start.

``os.cpu_count()`` counts the host's CPUs: inside a container limited to 2 CPUs on a 64-core host
it says 64. The truth is the smallest of the CPU affinity set and the cgroup CPU quota (v2
``cpu.max``, v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``), found through the process's own
cgroup (``/proc/self/cgroup``) joined with the mount table (``/proc/self/mountinfo``): inside a
container the cgroup path says ``/docker/<id>`` while the mount's root is that same path.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from workers.settings import Settings


@dataclass(frozen=True)
class CpuQuota:
    cpus: int  # the quota rounded up: --cpus=1.5 gives 2
    detail: str  # for the startup log, e.g. "cgroup v1 cpu quota 150000/100000us at /sys/..."


@dataclass(frozen=True)
class CpuBudget:
    total: int  # os.cpu_count(): what naive sizing would use
    affinity: int  # CPUs in the affinity set (taskset, cpuset)
    quota: CpuQuota | None  # the tightest cgroup quota above us, if any

    @property
    def usable(self) -> int:
        limits = [self.affinity] + ([self.quota.cpus] if self.quota else [])
        return max(1, min(limits))

    @property
    def source(self) -> str:
        """Where the usable count came from, in words an operator can check."""
        if self.quota and self.quota.cpus < self.affinity:
            return self.quota.detail
        if self.affinity < self.total:
            return f"CPU affinity {self.affinity} of {self.total}"
        return "no affinity or cgroup limit"


@dataclass(frozen=True)
class _Mount:
    root: str  # the cgroup path the mount shows at its mount point
    point: Path
    version: int


def _mounts(mountinfo: str, fs_root: Path) -> list[_Mount]:
    """cgroup mounts that carry the cpu controller (v1 "cpu", or any v2 with cpu.max files)."""
    found = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype, superopts = tail[0], tail[2].split(",")
        point = fs_root / fields[4].lstrip("/")
        if fstype == "cgroup2":
            found.append(_Mount(fields[3], point, 2))
        elif fstype == "cgroup" and "cpu" in superopts:
            found.append(_Mount(fields[3], point, 1))
    return found


def _own_cgroups(proc_cgroup: str) -> dict[int, str]:
    """The process's cgroup path for the v2 hierarchy and for the v1 cpu controller."""
    paths: dict[int, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            paths[2] = path
        elif "cpu" in controllers.split(","):
            paths[1] = path
    return paths


def _cgroup_dirs(mount: _Mount, path: str) -> list[Path]:
    """The cgroup's directory and every ancestor up to the mount point (all their limits apply)."""
    rel = path[len(mount.root) :] if path.startswith(mount.root) else ""
    parts = [p for p in rel.split("/") if p]
    return [mount.point.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _quota_at(directory: Path, version: int) -> CpuQuota | None:
    if version == 2:
        raw = _read(directory / "cpu.max")
        if not raw or raw.split()[0] == "max":
            return None
        quota, period = (int(x) for x in raw.split()[:2])
        name = "cgroup v2 cpu.max"
    else:
        raw_quota, raw_period = (
            _read(directory / f) for f in ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        )
        if not raw_quota or not raw_period or int(raw_quota) <= 0:
            return None
        quota, period = int(raw_quota), int(raw_period)
        name = "cgroup v1 cpu quota"
    if period <= 0:
        return None
    return CpuQuota(math.ceil(quota / period), f"{name} {quota}/{period}us at {directory}")


def cgroup_quota(proc_cgroup: str, mountinfo: str, fs_root: Path = Path("/")) -> CpuQuota | None:
    """The tightest CPU quota on this process's cgroup or its ancestors, in v1 or v2."""
    own = _own_cgroups(proc_cgroup)
    quotas = []
    for mount in _mounts(mountinfo, fs_root):
        if mount.version not in own:
            continue
        for directory in _cgroup_dirs(mount, own[mount.version]):
            quota = _quota_at(directory, mount.version)
            if quota:
                quotas.append(quota)
    return min(quotas, key=lambda q: q.cpus, default=None)


def cpu_budget() -> CpuBudget:
    """Read this process's CPU budget from the live system."""
    proc_cgroup, mountinfo = (_read(Path(f"/proc/self/{f}")) or "" for f in ("cgroup", "mountinfo"))
    total = os.cpu_count() or 1
    return CpuBudget(
        total=total,
        # No affinity call off Linux (macOS): every CPU counts.
        affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total,
        quota=cgroup_quota(proc_cgroup, mountinfo),
    )


def worker_count(settings: Settings, budget: CpuBudget) -> int:
    """``WEB_CONCURRENCY`` if set; else usable CPUs x workers per core, capped, at least 1.

    CPU-bound work gains nothing from more workers than cores: they only queue on the CPU.
    """
    if settings.web_concurrency is not None:
        return settings.web_concurrency
    cap = settings.max_workers
    wanted = budget.usable * settings.workers_per_core
    return max(1, min(wanted, cap) if cap else wanted)
