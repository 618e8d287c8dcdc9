"""A real cgroup v1 CPU quota shrinks the pool: the server is moved into a child cgroup."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.server import GunicornServer

pytestmark = [pytest.mark.server, pytest.mark.cgroup]
CPU_V1 = Path("/sys/fs/cgroup/cpu")


@pytest.fixture
def quota_cgroup() -> Iterator[Path]:
    """A child of this process's cpu cgroup limited to 1 CPU (100 ms per 100 ms)."""
    own = next(
        (
            line.split(":", 2)[2]
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if "cpu" in line.split(":")[1].split(",")
        ),
        None,
    )
    parent = CPU_V1 / (own or "/").lstrip("/")
    if os.geteuid() != 0 or own is None or not os.access(parent, os.W_OK):
        pytest.skip(f"needs root and a writable cgroup v1 cpu controller at {parent}")
    group = parent / f"heavyapp-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")
        yield group
    finally:
        group.rmdir()  # empty by now: the server and its workers have exited


def test_cgroup_quota_of_one_cpu_gives_one_worker(
    quota_cgroup: Path, start_server: Callable[..., GunicornServer]
) -> None:
    gunicorn = Path(sys.executable).with_name("gunicorn")
    script = (
        f"echo $$ > {quota_cgroup}/cgroup.procs && exec {gunicorn} -c gunicorn_conf.py heavyapp:app"
    )
    server = start_server(command=["sh", "-c", script])
    assert len(server.worker_pids()) == 1
    server.wait_for_log(rf"usable 1 \(cgroup v1 cpu quota 100000/100000us at {quota_cgroup}\)")
    assert str(server.master_pid) in (quota_cgroup / "cgroup.procs").read_text().split()
    server.stop()
