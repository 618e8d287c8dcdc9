"""The kit as a Docker swarm stack (deploy/swarm/), deployed by ``make swarm``, broken under load.

Without Docker: the stack's numbers agree with each other and the front's config rendered for it
re-resolves the tasks and passes ``nginx -t``. With Docker (markers ``container`` and ``swarm``):
``make swarm``
refuses cleanly (no client, a stopped engine, a taken port), deploys on a one-node swarm it
creates, and under 8 closed-loop GET clients through the front the stack rolls every task,
scales 2 -> 3 -> 2 and loses a container without one GET failing; ``make swarm-down`` leaves
nothing. HEAVYAPP_SWARM_FULL=1 runs the same scenario on stock Gunicorn too and prints its
failures (bench/swarm.py is the measured form, kit and stock side by side).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dockerkit
from harness import swarm
from harness.closedloop import Report
from harness.nginx import nginx_binary, nginx_t
from harness.server import REPO, free_port
from helpers import http_get, poll_until, unavailable

yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate (dev extra)")

#: The GET the clients send: real work, short enough that 8 clients keep every task busy.
PATH = "/heavy?n=20000"
CLIENTS = 8
FULL = os.environ.get("HEAVYAPP_SWARM_FULL") == "1"
RULES = REPO / "deploy" / "prometheus" / "heavyapp-rules.yaml"


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m)", str(value))
    assert m, value
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


def stack_file() -> dict:
    return yaml.safe_load(swarm.STACK_FILE.read_text())


# --------------------------------------------------------------------------- the files


def test_the_stacks_numbers_agree():
    """drain > the front's DNS cache; stop_grace_period > drain + GRACEFUL_TIMEOUT; rolls at
    least a DNS cache apart; start-first with rollback; tasks by DNS, the front on the host."""
    app = stack_file()["services"]["app"]
    env = app["environment"]
    drain = float(env["HEAVYAPP_DRAIN_SECONDS"])
    cache = seconds(dockerkit.RESOLVE_VALID)
    assert drain > cache, "a task must outlive the front's cached answers that still name it"
    assert seconds(app["stop_grace_period"]) > drain + float(env["GRACEFUL_TIMEOUT"])
    deploy = app["deploy"]
    assert deploy["endpoint_mode"] == "dnsrr", "no routing-mesh VIP (needs IPVS)"
    update = deploy["update_config"]
    assert (update["order"], update["failure_action"]) == ("start-first", "rollback")
    assert seconds(update["delay"]) >= cache
    assert deploy["rollback_config"]["order"] == "start-first"
    assert deploy["restart_policy"]["condition"] == "any"
    assert re.fullmatch(r"\d+", deploy["resources"]["limits"]["cpus"]), "whole CPUs: a worker each"
    assert "WEB_CONCURRENCY" not in env, "the pool sizes itself to the CPU limit"
    check = " ".join(app["healthcheck"]["test"])
    assert "/healthz" in check and "/readyz" not in check, "the one check also restarts tasks"
    (port,) = stack_file()["services"]["front"]["ports"]
    assert port["mode"] == "host" and port["target"] == 8080


def test_stock_variant_only_swaps_the_command():
    stock = yaml.safe_load(swarm.STOCK_FILE.read_text())["services"]
    assert stock.keys() == {"app"} and stock["app"].keys() == {"command"}
    command = stock["app"]["command"]
    workers = int(command[command.index("-w") + 1])
    assert workers == int(stack_file()["services"]["app"]["deploy"]["resources"]["limits"]["cpus"])


def test_front_conf_resolves_tasks_per_request_and_keeps_the_rest():
    shipped = dockerkit.NGINX_CONF.read_text()
    conf = dockerkit.front_conf(shipped)
    assert not re.search(r"^\s*upstream\s", re.sub(r"#.*", "", conf), re.MULTILINE), (
        "no upstream{}: nginx resolves those once, at start"
    )
    assert f"resolver {dockerkit.DOCKER_DNS} valid={dockerkit.RESOLVE_VALID}" in conf
    assert re.search(r"set \$heavyapp_app app:8000;\s+proxy_pass http://\$heavyapp_app;", conf)
    assert "listen 8080;" in conf
    assert f"proxy_connect_timeout {dockerkit.CONNECT_TIMEOUT};" in conf

    # every other directive of the shipped file is there as written (retries included)
    def directives(text: str) -> set[str]:
        return {
            line.strip() for line in re.sub(r"#.*", "", text).splitlines()
            if line.strip().endswith(";") and not line.strip().startswith(
                ("server ", "proxy_pass", "listen", "proxy_connect_timeout"))
        }  # fmt: skip

    missing = directives(shipped) - directives(conf) - {d for d in directives(shipped) if "${" in d}
    assert not missing, missing
    assert "proxy_next_upstream error timeout;" in conf


def test_front_conf_refuses_a_config_it_cannot_render():
    with pytest.raises(ValueError, match="upstream"):
        dockerkit.front_conf("server {\n    listen ${HEAVYAPP_LISTEN};\n}\n")


@pytest.mark.front
def test_front_conf_passes_nginx_t(tmp_path: Path):
    if nginx_binary() is None:
        unavailable("no nginx binary (apt-get install nginx)", "HEAVYAPP_REQUIRE_NGINX")
    conf = tmp_path / "front.conf"
    conf.write_text(dockerkit.front_conf(dockerkit.NGINX_CONF.read_text()))
    checked = nginx_t(conf)
    assert checked.returncode == 0, checked.stderr


# --------------------------------------------------------------------------- make swarm


def make(target: str, port: int, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", target],
        cwd=REPO,
        env={**os.environ, "SWARM_PORT": str(port), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def stacks() -> list[str]:
    return dockerkit.docker("stack", "ls", "--format", "{{.Name}}", check=False).stdout.split()


def assert_refused(proc: subprocess.CompletedProcess[str], why: str) -> None:
    said = [line for line in proc.stderr.splitlines() if line.startswith("swarm up:")]
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert len(said) == 1 and re.search(why, said[0]), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "http://" not in proc.stdout


@pytest.mark.container
@pytest.mark.swarm
def test_make_swarm_without_docker_says_so_in_one_line():
    proc = make("swarm", free_port(), HEAVYAPP_DOCKER_CLI="/nonexistent/docker")
    assert_refused(proc, r"no Docker here: no docker client at /nonexistent/docker")


@pytest.mark.container
@pytest.mark.swarm
def test_make_swarm_with_a_stopped_engine_says_so_in_one_line(tmp_path: Path):
    # a socket nobody answers on: what the client sees when dockerd is not running
    proc = make("swarm", free_port(), DOCKER_HOST=f"unix://{tmp_path}/docker.sock")
    assert_refused(proc, r"the Docker engine is not running")


@pytest.mark.container
@pytest.mark.swarm
def test_make_swarm_on_a_taken_port_refuses_and_deploys_nothing(docker_engine):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = make("swarm", port)
    assert_refused(proc, rf"port {port} is in use")
    assert swarm.STACK not in stacks()


@pytest.fixture(scope="module")
def deployed(app_image, front_image):
    """``make swarm`` on a free port; ``make swarm-down`` afterwards, checked to leave nothing."""
    if swarm.STACK in stacks():
        pytest.fail(f"a stack named {swarm.STACK} already runs here; remove it first")
    port = free_port()
    t0 = time.monotonic()
    proc = make("swarm", port)
    print(f"\n[swarm] make swarm: {time.monotonic() - t0:.1f} s\n{proc.stderr}", file=sys.stderr)
    stack = swarm.Stack(port=port)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == stack.url
        yield stack
    finally:
        down = make("swarm-down", port)
        assert down.returncode == 0, down.stdout + down.stderr
        assert swarm.STACK not in stacks()
        label = f"label=com.docker.stack.namespace={swarm.STACK}"
        assert not dockerkit.docker("ps", "-aq", "--filter", label).stdout.split()


@pytest.mark.container
@pytest.mark.swarm
def test_each_replicas_pool_follows_its_cpu_limit(deployed):
    """1 CPU per replica (resources.limits.cpus), so 1 worker in each, as heavyctl shows."""
    containers = deployed.containers("app")
    assert len(containers) == deployed.replicas() == 2
    for c in containers:
        logs = dockerkit.docker("logs", c["id"]).stderr
        assert re.search(r"usable 1 \(cgroup v1 cpu quota 100000/100000us", logs) or re.search(
            r"usable 1 \(cgroup v2", logs
        ), logs
        assert "starting 1 workers" in logs or "starting 1 worker" in logs, logs
        status = dockerkit.docker("exec", c["id"], "heavyctl", "status").stdout
        assert re.search(r"\b1/1 workers\b", status), status


def scenario(stack: swarm.Stack) -> tuple[list[swarm.Phase], Report]:
    """Issue 17's scenario under CLIENTS closed-loop GETs through the front."""
    return swarm.under_load(stack, PATH, CLIENTS)


def describe(stack: swarm.Stack, phases: list[swarm.Phase], report: Report) -> str:
    found = swarm.results(phases, report.outcomes, stack.front_errors())
    return "\n  ".join([report.summary(), *(r.line() for r in found)])


@pytest.mark.container
@pytest.mark.swarm
def test_roll_scale_and_a_lost_container_cost_no_get(deployed):
    """Every GET 200 through a rolling update and a scale out and back; after a SIGKILLed
    container, every GET but one whose answer had already begun (its header forwarded, which no
    front can take back or retry: at most one per worker of the lost task); the service back
    to its replicas within 60 s of the kill."""
    phases, report = scenario(deployed)
    found = swarm.results(phases, report.outcomes, deployed.front_errors())
    print("\n[swarm] kit:\n  " + "\n  ".join([report.summary(), *(r.line() for r in found)]))
    assert report.sent > 200, report.summary()
    assert all(r.gets > 0 for r in found), found
    for r, p in zip(found, phases, strict=True):
        failed = [o for o in report.outcomes if p.started <= o.started < p.ended and o.failed]
        if "killed" in r.name:
            assert r.converge_s < 60, r
            cut = [o for o in failed if o.error.startswith("BadResponse: body cut short: 0 of")]
            assert failed == cut and len(cut) <= 1, failed
        else:
            assert not failed, (r, failed)
    assert len(report.failures) <= 1, report.summary()


@pytest.mark.container
@pytest.mark.swarm
def test_stock_gunicorn_in_the_same_stack(deployed):
    """The peer, for the record (HEAVYAPP_SWARM_FULL=1): its failures are printed, not asserted."""
    if not FULL:
        pytest.skip(reason="HEAVYAPP_SWARM_FULL=1 runs it on stock Gunicorn too (bench/swarm.py)")
    stock = swarm.Stack(port=deployed.port, stock=True)
    stock.deploy()
    try:
        stock.wait_converged(120)
        phases, report = scenario(stock)
        print(f"\n[swarm] stock: {describe(stock, phases, report)}")
    finally:
        deployed.deploy()  # back to the kit for the tests after this one
        deployed.wait_converged(120)


@pytest.mark.container
@pytest.mark.swarm
def test_prometheus_scrapes_every_task(deployed, base_image):
    """The optional Prometheus file (HEAVYAPP_SWARM_FULL=1): one target per app task, all up,
    and a scale-out shows up as one more target."""
    if not FULL:
        pytest.skip(reason="HEAVYAPP_SWARM_FULL=1 also deploys deploy/swarm/prometheus.yaml")
    dockerkit.build_prometheus_image(base=base_image)
    stack = swarm.Stack(port=deployed.port, prometheus_port=free_port())
    api = f"http://127.0.0.1:{stack.env['PROMETHEUS_PORT']}/api/v1/targets"

    def up_targets(count: int) -> list[str] | None:
        status, body, _ = http_get(api, timeout=5)
        active = body["data"]["activeTargets"] if status == 200 else []
        up = [t["labels"]["instance"] for t in active if t["health"] == "up"]
        return up if len(up) == len(active) == count else None

    stack.deploy()
    try:
        stack.wait_converged(120)
        poll_until(lambda: up_targets(2), 60, "2 app tasks up in Prometheus", 1, ignore=(OSError,))
        if RULES.exists():  # the kit's alerting rules, when the checkout has them, are loaded
            _, body, _ = http_get(api.replace("/targets", "/rules"), timeout=5)
            assert body["data"]["groups"], body
        stack.scale(3)
        stack.wait_converged(60)
        poll_until(lambda: up_targets(3), 60, "3 app tasks up in Prometheus", 1, ignore=(OSError,))
    finally:
        stack.scale(2)
        dockerkit.docker("service", "rm", stack.service("prometheus"), check=False)
        deployed.wait_converged(120)
