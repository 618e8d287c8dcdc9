"""The kit as a Docker swarm stack: ``make swarm`` / ``make swarm-down``, and the driver the
tests (tests/test_swarm.py) and the benchmark (bench/swarm.py) use to roll, scale and break it.

    python -m harness.swarm up      # build the images, join or create a swarm, deploy, wait
    python -m harness.swarm down    # remove the stack; leave the swarm if ``up`` created it

``up`` builds every image from local bases (tests/dockerkit.py: the app image as the container
tests build it, the front from the same base with Debian's nginx), so no registry is needed,
and prints the front's URL as its last line. Whatever stops it (no Docker, a stopped engine, the
port taken, a stack that never gets healthy) is one line on stderr and exit status 1, with
nothing of this run left deployed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from harness.closedloop import ClosedLoop, Outcome, Report, fetch
from harness.server import REPO

sys.path.insert(0, str(REPO / "tests"))
import dockerkit  # tests/dockerkit.py: the engine and the image builds

STACK = "heavyapp"
SWARM_DIR = REPO / "deploy" / "swarm"
STACK_FILE = SWARM_DIR / "stack.yaml"
#: The same stack with stock ``gunicorn -w N heavyapp:app`` as the app (the peer).
STOCK_FILE = SWARM_DIR / "stock.yaml"
#: Prometheus scraping every app task, an optional second file.
PROMETHEUS_FILE = SWARM_DIR / "prometheus.yaml"
DEFAULT_PORT = 8080
#: Written by ``up`` when it ran ``docker swarm init``: ``down`` leaves only a swarm it created.
MARKER = dockerkit.STATE_DIR / "swarm-created-by-heavyapp"
#: How long ``up`` waits for every replica to be healthy and the front to answer.
UP_TIMEOUT = 120.0
POLL = 0.25


class SwarmError(RuntimeError):
    """Why the stack cannot be deployed (or removed), in one line for the operator."""


def docker(*args: str, timeout: float = 60, check: bool = True) -> str:
    """A docker command's stdout; a failure becomes a SwarmError quoting its stderr."""
    proc = dockerkit.docker(*args, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        raise SwarmError(
            f"docker {' '.join(args[:3])} failed: {why[-1] if why else proc.returncode}"
        )
    return proc.stdout


# --------------------------------------------------------------------------- the swarm


def preflight(port: int, stack: str = STACK) -> None:
    """A Docker client, a running engine, and the front's port free (or already the stack's)."""
    try:
        cli = dockerkit.docker_cli()
    except dockerkit.DockerUnavailable as exc:
        raise SwarmError(f"no Docker here: {exc}") from None
    if not os.access(cli, os.X_OK):
        raise SwarmError(f"no Docker here: no docker client at {cli} (apt-get install docker.io)")
    if not dockerkit.engine_running():
        raise SwarmError(
            "the Docker engine is not running: start it (systemctl start docker, or "
            "python tests/dockerkit.py engine) and run this again"
        )
    if port_in_use(port) and port not in published_ports(stack):
        raise SwarmError(f"port {port} is in use on this host: free it or set SWARM_PORT")


def port_in_use(port: int) -> bool:
    """Whether something listens on ``port`` (a host-mode publish binds every address)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def published_ports(stack: str) -> set[int]:
    out = docker(
        "service", "inspect", f"{stack}_front", "--format",
        "{{range .Spec.EndpointSpec.Ports}}{{.PublishedPort}} {{end}}",
        check=False,
    )  # fmt: skip
    return {int(p) for p in out.split() if p.isdigit()}


def swarm_state() -> str:
    return docker("info", "--format", "{{.Swarm.LocalNodeState}}").strip()


def join_swarm() -> bool:
    """Make this engine a swarm manager if it is in no swarm. True when this call created it."""
    state = swarm_state()
    if state == "active":
        return False
    if state != "inactive":
        raise SwarmError(f"this engine's swarm state is {state!r}: fix it (docker swarm leave)")
    # Loopback: a one-node swarm reachable by nobody else; a worker needs another address.
    docker("swarm", "init", "--advertise-addr", "127.0.0.1")
    node = docker("info", "--format", "{{.Swarm.NodeID}}").strip()
    MARKER.parent.mkdir(parents=True, exist_ok=True)
    MARKER.write_text(node)
    return True


def leave_swarm_if_ours() -> bool:
    """``docker swarm leave --force`` only if ``join_swarm`` created the swarm this node is in."""
    if not MARKER.exists():
        return False
    node = docker("info", "--format", "{{.Swarm.NodeID}}", check=False).strip()
    if node and node == MARKER.read_text().strip():
        docker("swarm", "leave", "--force")
    MARKER.unlink()
    return bool(node)


# --------------------------------------------------------------------------- a stack


class Stack:
    """One deployment of deploy/swarm/stack.yaml (plus stock.yaml for the peer) as ``name``."""

    def __init__(
        self,
        name: str = STACK,
        port: int = DEFAULT_PORT,
        *,
        stock: bool = False,
        prometheus_port: int | None = None,
        app_image: str = dockerkit.APP_TAG,
        front_image: str = dockerkit.FRONT_TAG,
    ) -> None:
        self.name = name
        self.port = port
        self.files = [STACK_FILE, *([STOCK_FILE] if stock else [])]
        self.services = ["app", "front"]
        self.env = {
            "HEAVYAPP_IMAGE": app_image,
            "HEAVYAPP_FRONT_IMAGE": front_image,
            "SWARM_PORT": str(port),
        }
        if prometheus_port:
            self.files.append(PROMETHEUS_FILE)
            self.services.append("prometheus")
            self.env["HEAVYAPP_PROMETHEUS_IMAGE"] = dockerkit.PROMETHEUS_TAG
            self.env["PROMETHEUS_PORT"] = str(prometheus_port)
        self.url = f"http://127.0.0.1:{port}"

    def service(self, short: str) -> str:
        return f"{self.name}_{short}"

    # -- deploying and removing --------------------------------------------------------------

    def deploy(self) -> None:
        """``docker stack deploy``; images are the local ones, never looked up in a registry."""
        files = [arg for f in self.files for arg in ("-c", str(f))]
        cmd = ["stack", "deploy", "--resolve-image", "never", *files, self.name]
        proc = subprocess.run(
            [dockerkit.docker_cli(), *cmd],
            env={**dockerkit.docker_env(), **self.env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise SwarmError(f"docker stack deploy failed: {proc.stderr.strip()}")

    def exists(self) -> bool:
        return bool(
            docker("stack", "ls", "--format", "{{.Name}}", check=False).split().count(self.name)
        )

    def remove(self, timeout: float = 60) -> None:
        """``docker stack rm``, then wait until its containers and network are gone too (the
        command returns at once; a redeploy before that would find the old network)."""
        docker("stack", "rm", self.name, check=False)
        label = f"label=com.docker.stack.namespace={self.name}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = docker("ps", "-aq", "--filter", label, check=False).split()
            nets = docker("network", "ls", "-q", "--filter", label, check=False).split()
            if not left and not nets:
                return
            time.sleep(POLL)
        raise SwarmError(
            f"stack {self.name} still has containers or networks after {timeout:.0f} s"
        )

    # -- what runs ---------------------------------------------------------------------------

    def replicas(self, short: str = "app") -> int:
        """The replica count the service is asked for."""
        return int(docker("service", "inspect", self.service(short), "--format",
                          "{{.Spec.Mode.Replicated.Replicas}}").strip())  # fmt: skip

    def containers(self, short: str = "app") -> list[dict]:
        """The service's running containers on this node: id, name, health ("" if none)."""
        out = docker(
            "ps", "--filter", f"label=com.docker.swarm.service.name={self.service(short)}",
            "--format", "{{.ID}}", check=False,
        )  # fmt: skip
        ids = out.split()
        if not ids:
            return []
        found = json.loads(docker("inspect", *ids, check=False) or "[]")
        return [
            {
                "id": c["Id"][:12],
                "name": c["Name"].lstrip("/"),
                "health": (c["State"].get("Health") or {}).get("Status", ""),
                "running": c["State"]["Running"],
            }
            for c in found
        ]

    def update_state(self, short: str = "app") -> str:
        """The service's rolling update: "" (none yet), updating, completed, rollback_..."""
        return docker("service", "inspect", self.service(short), "--format",
                      "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}").strip()  # fmt: skip

    def converged(self, gone: frozenset[str] = frozenset()) -> bool:
        """Every service runs exactly its replicas, each healthy where it has a check, none of
        the containers in ``gone`` (replaced or killed ones), no update in flight, and the front
        answers /healthz with 200 (through to an app task)."""
        for short in self.services:
            running = [c for c in self.containers(short) if c["running"]]
            if gone & {c["id"] for c in running} or len(running) != self.replicas(short):
                return False
            if any(c["health"] not in ("", "healthy") for c in running):
                return False
            if self.update_state(short) in ("updating", "rollback_started", "paused"):
                return False
        return self.answers()

    def answers(self) -> bool:
        try:
            status, _ = fetch("127.0.0.1", self.port, "/healthz", 5.0)
        except OSError:
            return False
        return status == 200

    def wait_converged(self, timeout: float, gone: frozenset[str] = frozenset()) -> float:
        """Seconds until ``converged(gone)``; SwarmError (with the tasks' states) past timeout."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.converged(gone):
                return time.monotonic() - t0
            time.sleep(POLL)
        raise SwarmError(f"stack {self.name} not converged within {timeout:.0f} s: {self.status()}")

    def status(self) -> str:
        """One line: each service's tasks and what the newest ones say."""
        out = docker(
            "stack", "ps", self.name, "--no-trunc", "--filter", "desired-state=running",
            "--format", "{{.Name}} {{.CurrentState}} {{.Error}}", check=False,
        )  # fmt: skip
        return "; ".join(line.strip() for line in out.splitlines()) or "no tasks"

    def front_errors(self) -> list[tuple[float, str]]:
        """(Unix time, message) of each failed try the front logged towards a task: every one
        it retried on another task, and every one it could not."""
        (front,) = self.containers("front") or [{"id": ""}]
        proc = (
            dockerkit.docker("logs", front["id"], check=False, timeout=30) if front["id"] else None
        )
        found = []
        for line in (proc.stderr if proc else "").splitlines():
            m = NGINX_ERROR.match(line)
            if m:
                stamp = time.mktime(time.strptime(m.group(1), "%Y/%m/%d %H:%M:%S"))
                found.append((stamp - time.timezone, m.group(2)))
        return found

    # -- changing it -------------------------------------------------------------------------

    def app_ids(self) -> frozenset[str]:
        return frozenset(c["id"] for c in self.containers("app"))

    def roll(self) -> frozenset[str]:
        """``docker service update --force`` of the app: every task replaced, as by a new
        image. The containers that must go."""
        old = self.app_ids()
        docker("service", "update", "--force", "--detach", "--no-resolve-image",
               self.service("app"))  # fmt: skip
        return old

    def scale(self, replicas: int) -> frozenset[str]:
        docker("service", "scale", "--detach", f"{self.service('app')}={replicas}")
        return frozenset()

    def kill_one(self) -> frozenset[str]:
        """SIGKILL one app container (as the OOM killer or a crash would): the one that goes."""
        victim = self.containers("app")[0]["id"]
        docker("kill", victim)
        return frozenset({victim})


#: nginx's error log line: its time (the container's clock, UTC) and message.
NGINX_ERROR = re.compile(
    r"^(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) \[error\] \d+#\d+: \*\d+ ([^,]*upstream)"
)


# --------------------------------------------------------------------------- the scenario


@dataclass
class Phase:
    """One step of the scenario: when it ran (monotonic and Unix clocks), how long until the
    stack had converged again."""

    name: str
    started: float
    ended: float
    wall_started: float
    converge_s: float


#: The scenario of issue 17, in order: a rolling update, a scale out and back, a lost container.
SCENARIO: list[tuple[str, Callable[[Stack], frozenset[str]]]] = [
    ("rolling update (service update --force)", Stack.roll),
    ("scale 2 -> 3", lambda stack: stack.scale(3)),
    ("scale 3 -> 2", lambda stack: stack.scale(2)),
    ("one app container killed", Stack.kill_one),
]


@dataclass(frozen=True)
class PhaseResult:
    """What the clients saw during one phase, and what the front had to retry."""

    name: str
    gets: int
    failed: int
    statuses: dict[int, int]
    converge_s: float
    front_retries: int

    def line(self) -> str:
        return (
            f"{self.name}: {self.gets} GETs, {self.failed} failed {self.statuses}, converged in "
            f"{self.converge_s:.1f} s, {self.front_retries} tries failed at the front"
        )


def results(
    phases: list[Phase], outcomes: list[Outcome], errors: list[tuple[float, str]]
) -> list[PhaseResult]:
    """Per phase: the requests that started in it, and the front's failed tries logged in it
    (nginx stamps whole seconds, so a second either side)."""
    found = []
    for p in phases:
        during = [o for o in outcomes if p.started <= o.started < p.ended]
        wall_end = p.wall_started + (p.ended - p.started)
        tries = [e for e in errors if p.wall_started - 1 <= e[0] <= wall_end + 1]
        statuses = Counter(o.status for o in during)
        failed = sum(1 for o in during if o.failed)
        counts = dict(sorted(statuses.items()))
        found.append(PhaseResult(p.name, len(during), failed, counts, p.converge_s, len(tries)))
    return found


def under_load(stack: Stack, path: str, clients: int) -> tuple[list[Phase], Report]:
    """SCENARIO with ``clients`` closed-loop GETs of ``path`` through the front all along."""
    loop = ClosedLoop(stack.url, path, clients=clients, duration=900, timeout=30).start()
    try:
        loop.wait_for_requests(50, timeout=30)
        phases = run_scenario(stack)
    finally:
        report = loop.stop()
    return phases, report


def run_scenario(stack: Stack, timeout: float = 90.0, settle: float = 2.0) -> list[Phase]:
    """Each step of SCENARIO, waiting for the stack to converge after it (at most ``timeout``),
    then ``settle`` seconds more under the caller's load before the next."""
    phases = []
    for name, step in SCENARIO:
        started, wall = time.monotonic(), time.time()
        gone = step(stack)
        took = stack.wait_converged(timeout, gone)
        time.sleep(settle)  # the load runs on: what the front does with what it has cached
        phases.append(Phase(name, started, time.monotonic(), wall, took))
    return phases


# --------------------------------------------------------------------------- make swarm


def build_images(log=print) -> None:
    """The app and front images from the local base (each a no-op when nothing changed)."""
    try:
        base = dockerkit.ensure_base_image(log=log)
        dockerkit.build_app_image(dockerkit.APP_TAG, base, log=log)
        dockerkit.build_front_image(dockerkit.FRONT_TAG, base, log=log)
    except (dockerkit.DockerUnavailable, RuntimeError) as exc:
        raise SwarmError(f"building the images failed: {str(exc).splitlines()[0]}") from None


def up(port: int, log=print) -> str:
    """Build, deploy, wait; the front's URL. Undoes everything it did when it fails."""
    preflight(port)
    build_images(log)
    created = join_swarm()
    stack = Stack(port=port)
    try:
        stack.deploy()
        took = stack.wait_converged(UP_TIMEOUT)
    except BaseException:
        stack.remove()
        if created:
            leave_swarm_if_ours()
        raise
    log(f"[swarm] stack {stack.name}: {stack.replicas()} app replicas healthy in {took:.1f} s")
    return stack.url


def down(log=print) -> None:
    stack = Stack()
    if dockerkit.engine_running() and swarm_state() == "active":
        stack.remove()
        log(f"[swarm] stack {stack.name} removed")
    if leave_swarm_if_ours():
        log("[swarm] left the swarm `make swarm` had created")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down"])
    args = parser.parse_args(argv)
    port = int(os.environ.get("SWARM_PORT") or DEFAULT_PORT)
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731 - stdout is the URL
    try:
        if args.command == "up":
            print(up(port, log))
        else:
            down(log)
    except SwarmError as exc:
        print(f"swarm {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
