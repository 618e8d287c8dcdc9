"""Stop, upgrade, reload: nothing lost that was already accepted, against real masters and signals.

The drain (``workers/master/drain.py``): SIGTERM with a queue, the drain window with ``/readyz``,
the quick stops, bad settings; stock Gunicorn beside the kit, so each count can fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
import yaml

from harness.lifecycle import Clients
from harness.server import REPO, GunicornServer, ServerError, free_port, serving
from helpers import poll_until
from workers.settings import Settings
from workers.shared import door

Start = Callable[..., GunicornServer]
HEAVY = "/heavy?n=1000000"  # ~40 ms of CPU on this machine: 12 clients keep 10 in the queue
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
HEAVYCTL = str(Path(sys.executable).with_name("heavyctl"))


def listening(port: int) -> bool:
    """Is anything in LISTEN on 127.0.0.1:``port``? (/proc, so asking opens no connection.)"""
    needle = f"0100007F:{port:04X} 00000000:0000 0A"
    return any(needle in line for line in Path("/proc/net/tcp").read_text().splitlines())


class ListenerWatch:
    """From a thread: the last moment ``port`` was seen listening, and whether it closed.

    The moment is taken before each look, so the listener was open at or after it: a refusal
    before it came while the server listened (the exact test, whatever the polling period)."""

    def __init__(self, port: int) -> None:
        self.last_open = time.time()
        self.closed = False
        self._port = port
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = time.time()
            if not listening(self._port):
                self.closed = True
                return
            self.last_open = now
            time.sleep(0.01)


def stock(port: int) -> GunicornServer:
    """Stock Gunicorn, 2 sync workers, the same app: the peer beside the kit."""
    server = GunicornServer(workers=2, port=port)
    server.command = [GUNICORN, "-w", "2", "-b", f"127.0.0.1:{server.port}", "heavyapp:app"]
    return server


def sigterm_with_a_queue(server: GunicornServer) -> tuple[int | None, float, Clients, float]:
    """12 clients back to back on 2 workers, then SIGTERM: (exit code, seconds to exit,
    the clients, the last moment the listener was seen open)."""
    clients = Clients(server.port, HEAVY, 12).start()
    poll_until(lambda: clients.tally.answered >= 24, 30, "the clients being served")
    watch = ListenerWatch(server.port)
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(40)
    took = time.monotonic() - sent
    clients.join(30)
    poll_until(lambda: watch.closed, 5, "the listener closed")
    return code, took, clients, watch.last_open


def test_sigterm_serves_every_queued_connection_and_exits_0() -> None:
    with serving(GunicornServer(workers=2)) as server:
        code, took, clients, last_open = sigterm_with_a_queue(server)
        log = server.log_text()
    tally = clients.tally
    assert tally.lost == [], tally.summary()
    assert code == 0 and took < 30, (code, took)
    assert tally.timed_out == 0 and len(tally.refused) == 12, tally.summary()
    assert min(tally.refused) > last_open, "a refusal while the listener was open"
    assert set(tally.headers) == {"connection: close"}
    assert "reuse_port=False" in log, "the default this test measures"
    waiting = int(log.split("Drained the accept queue: ")[1].split(" were waiting")[0])
    assert waiting >= 8, log  # 10 of the 12 wait while 2 are served
    assert "Drain done in" in log and "Shutting down: Master" in log


def test_stock_gunicorn_resets_the_same_queue() -> None:
    """The same stop of stock Gunicorn: the queue is reset, and refusals start at once."""
    with serving(stock(free_port())) as server:
        code, _, clients, _ = sigterm_with_a_queue(server)
    assert code == 0
    assert len(clients.tally.lost) >= 8, clients.tally.summary()


def test_the_drain_window_keeps_serving_unready(start_server: Start) -> None:
    """During ``HEAVYAPP_DRAIN_SECONDS``: /readyz 503 in JSON at once, /healthz 200, new
    connections served; then the stop completes with exit 0 inside the graceful timeout."""
    server = start_server(workers=2, env={"HEAVYAPP_DRAIN_SECONDS": "2", "GRACEFUL_TIMEOUT": "6"})
    assert requests.get(f"{server.url}/readyz", timeout=10).status_code == 200
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.wait_for_log("Draining: /readyz answers 503")
    ready = requests.get(f"{server.url}/readyz", timeout=10)
    assert ready.status_code == 503 and "draining" in ready.json()["error"]
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200
    heavy = requests.get(f"{server.url}/heavy?n=1000", timeout=10)
    assert heavy.status_code == 200 and heavy.headers["Connection"] == "close"
    assert time.monotonic() - sent < 2, "all of that inside the window"
    assert server.stop() == 0
    assert 2 <= time.monotonic() - sent < 6
    assert "listeners closed to new connections, 0 waiting" in server.log_text()


def test_graceful_timeout_bounds_the_whole_stop(start_server: Start) -> None:
    """A request that outlives GRACEFUL_TIMEOUT is cut there (as in Gunicorn), nothing is
    started again, and the master still exits 0 about then."""
    server = start_server(workers=1, env={"GRACEFUL_TIMEOUT": "1"})
    (worker,) = [psutil.Process(pid) for pid in server.worker_pids()]
    cpu = worker.cpu_times().user

    def cut_short() -> None:
        with contextlib.suppress(requests.RequestException):  # it is: the worker is killed
            requests.get(f"{server.url}/heavy?n=50000000", timeout=30)  # seconds of CPU

    threading.Thread(target=cut_short, daemon=True).start()
    poll_until(lambda: worker.cpu_times().user - cpu > 0.1, 10, "the worker busy", every=0.01)
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0
    assert time.monotonic() - sent < 3
    log = server.log_text()
    assert "1 workers still busy at GRACEFUL_TIMEOUT, killing them" in log
    assert "Starting another worker" not in log.split("Draining:", 1)[1], "nothing respawned"


@pytest.mark.parametrize("quick", [signal.SIGINT, signal.SIGQUIT])
def test_sigint_and_sigquit_still_stop_at_once(start_server: Start, quick: int) -> None:
    """Also in the middle of a drain window: the quick stop keeps its meaning."""
    server = start_server(workers=2, env={"HEAVYAPP_DRAIN_SECONDS": "20"})
    server.proc.send_signal(signal.SIGTERM)
    server.wait_for_log("Draining: /readyz answers 503")
    sent = time.monotonic()
    assert server.stop(quick) == 0
    assert time.monotonic() - sent < 5
    assert "Quick shutdown requested during the drain" in server.log_text()


@pytest.mark.parametrize(
    ("env", "args", "says"),
    [
        ({"HEAVYAPP_DRAIN_SECONDS": "-1"}, [], "HEAVYAPP_DRAIN_SECONDS must be zero or a positive"),
        ({"HEAVYAPP_DRAIN_SECONDS": "soon"}, [], "HEAVYAPP_DRAIN_SECONDS must be a number"),
        ({"HEAVYAPP_DRAIN_SECONDS": "30"}, [], "HEAVYAPP_DRAIN_SECONDS=30 must be below"),
        ({"HEAVYAPP_DRAIN_SECONDS": "5"}, ["--graceful-timeout", "3"], "must be below the grace"),
    ],
)
def test_a_bad_drain_window_refuses_to_start(env: dict, args: list, says: str) -> None:
    server = GunicornServer(workers=1, env=env, args=args)
    try:
        with pytest.raises(ServerError, match="server exited"):
            server.start(timeout=20)
        assert says in server.log_text() and "refusing to start" in server.log_text()
    finally:
        server.cleanup()


def test_the_door_keeps_the_queue_and_stops_new_handshakes() -> None:
    """The kernel part alone: queued connections are served, a new one is not let in, and
    opening the door again lets the next one in at once."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        address = listener.getsockname()
        queued = [socket.create_connection(address, timeout=5) for _ in range(3)]
        for n, client in enumerate(queued):
            client.sendall(b"%d" % n)
        assert door.close([listener]) == [listener]
        late = socket.socket()
        late.settimeout(0.3)
        with pytest.raises(TimeoutError):
            late.connect(address)
        late.close()
        for _ in queued:
            conn, _ = listener.accept()
            conn.sendall(conn.recv(1))
            conn.close()
        assert [c.recv(1) for c in queued] == [b"0", b"1", b"2"]
        door.open_([listener])
        with socket.create_connection(address, timeout=0.5):
            pass
        for client in queued:
            client.close()


def test_the_door_passes_unix_sockets_by() -> None:
    with socket.socket(socket.AF_UNIX) as unix:
        assert door.close([unix]) == []


def test_readyz_is_ready_outside_a_drain(server: GunicornServer) -> None:
    assert requests.get(f"{server.url}/readyz", timeout=10).json() == {"status": "ready"}
    assert not list(server.run_dir.glob("draining-*"))


# --------------------------------------------------------------------------- new code: USR2, HUP

VERSIONED_APP = '''\
"""The example app, answering with the version of this file it was loaded from."""
from heavyapp import create_app

VERSION = "{version}"
app = create_app()


@app.after_request
def _version(response):
    response.headers["X-Code-Version"] = VERSION
    return response
'''


def versioned_server(tmp_path: Path, preload: str) -> GunicornServer:
    """The kit serving ``lifeapp:app`` from ``tmp_path``, whose code the test rewrites."""
    (tmp_path / "lifeapp.py").write_text(VERSIONED_APP.format(version="1"))
    # A long queue timeout: the queue gate's 503s (tests/test_overload.py) must not count as
    # failures here on a loaded machine, where 4 workers share 2 cores for a moment.
    env = {"HEAVYAPP_PRELOAD": preload, "HEAVYAPP_QUEUE_TIMEOUT": "10"}
    server = GunicornServer(workers=2, env=env)
    server.command = [
        GUNICORN, "-c", "gunicorn_conf.py", "--pythonpath", str(tmp_path), "lifeapp:app"
    ]  # fmt: skip
    return server


def versions(port: int, count: int = 6) -> set[str]:
    return {
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).headers["X-Code-Version"]
        for _ in range(count)
    }


def heavyctl(server: GunicornServer, *args: str) -> Any:
    """``heavyctl ARGS --json`` for ``server``: its JSON answer (a non-zero exit fails)."""
    done = subprocess.run(
        [HEAVYCTL, *args, "--json"],
        env={**os.environ, "HEAVYAPP_RUN_DIR": str(server.run_dir)},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def loaded(server: GunicornServer) -> Clients:
    """4 clients back to back on ``/heavy`` (2 waiting), once they are being served."""
    clients = Clients(server.port, "/heavy?n=200000", 4, until_refused=False).start()
    poll_until(lambda: clients.tally.answered >= 8, 30, "the clients being served")
    return clients


def nothing_failed(clients: Clients) -> None:
    """Let 8 more requests be answered, stop the clients: every request got its 200."""
    goal = clients.tally.answered + 8
    poll_until(lambda: clients.tally.answered >= goal, 30, "requests served after it")
    tally = clients.stop()
    assert tally.lost == [] and tally.timed_out == 0 and tally.refused == [], tally.summary()
    assert set(tally.statuses) == {200}, tally.summary()


def stop_by_pid(pid: int) -> None:
    """Stop a master this test started (indirectly, by USR2) at once (SIGQUIT: its drain is
    not what this test is about), and wait until it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGQUIT)
    poll_until(lambda: not psutil.pid_exists(pid), 40, f"master pid={pid} gone")


@pytest.mark.parametrize("preload", ["0", "1"])
def test_heavyctl_upgrade_under_load_fails_nothing_and_serves_the_new_code(
    tmp_path: Path, preload: str
) -> None:
    server = versioned_server(tmp_path, preload)
    new_master = None
    try:
        server.start()
        assert versions(server.port) == {"1"}
        (tmp_path / "lifeapp.py").write_text(VERSIONED_APP.format(version="2"))
        clients = loaded(server)
        upgraded = heavyctl(server, "upgrade")
        new_master = upgraded["new_master"]
        nothing_failed(clients)
        assert server.proc.wait(5) == 0, "the old master exited 0"
        assert versions(server.port) == {"2"}, "the new code serves"
        assert upgraded["old_master"] == server.master_pid and new_master != server.master_pid
        assert "the listening socket outlives this master" in server.log_text()
        status = heavyctl(server, "status")
        assert status["master"]["pid"] == new_master, "its control socket was kept"
    finally:
        if new_master:
            stop_by_pid(new_master)
        server.cleanup()


def test_an_upgrade_to_code_that_does_not_load_leaves_the_old_master_serving(
    tmp_path: Path,
) -> None:
    with serving(versioned_server(tmp_path, "1")) as server:
        (tmp_path / "lifeapp.py").write_text("this is not python\n")
        done = subprocess.run(
            [HEAVYCTL, "upgrade", "--timeout", "30"],
            env={**os.environ, "HEAVYAPP_RUN_DIR": str(server.run_dir)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1
        assert "exited before its workers were up" in done.stderr, done.stderr
        assert f"the old master pid={server.master_pid} keeps serving" in done.stderr
        assert versions(server.port) == {"1"}
        assert heavyctl(server, "status")["master"]["pid"] == server.master_pid


@pytest.mark.parametrize(("preload", "serves"), [("0", "2"), ("1", "1")])
def test_a_hup_under_load_fails_nothing_and_says_when_it_cannot_load_new_code(
    tmp_path: Path, preload: str, serves: str
) -> None:
    with serving(versioned_server(tmp_path, preload)) as server:
        (tmp_path / "lifeapp.py").write_text(VERSIONED_APP.format(version="2"))
        clients = loaded(server)
        before = set(server.worker_pids())
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_workers(2, timeout=30, exclude=before)
        nothing_failed(clients)
        assert versions(server.port) == {serves}
        warned = "the new workers run the code loaded at start" in server.log_text()
        assert warned == (preload == "1")


# --------------------------------------------------------------------------- the numbers agree

DEPLOYMENT_MD = REPO / "docs" / "deployment.md"
MARGIN = 5  # seconds the orchestrator leaves the master to exit after GRACEFUL_TIMEOUT


def seconds(value: object) -> float:
    """``35``, ``"35"`` or ``"35s"`` as seconds."""
    return float(str(value).removesuffix("s"))


def k8s_numbers() -> dict[str, float]:
    docs = yaml.safe_load_all((REPO / "deploy" / "k8s" / "deployment.yaml").read_text())
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "heavyapp"]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "exec" in pre_stop:
        assert pre_stop["exec"]["command"][0] == "sleep", "a preStop that is not a sleep"
        pre = seconds(pre_stop["exec"]["command"][1])
    else:
        pre = seconds(pre_stop.get("sleep", {}).get("seconds", 0))
    return numbers(env, pre, pod["terminationGracePeriodSeconds"])


def compose_numbers() -> dict[str, float]:
    app = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())["services"]["app"]
    return numbers(app.get("environment", {}), 0, app["stop_grace_period"])


def systemd_numbers() -> dict[str, float]:
    text = (REPO / "deploy" / "systemd" / "heavyapp.service").read_text()
    env = dict(re.findall(r"^Environment=(\w+)=(\S+)$", text, re.MULTILINE))
    return numbers(env, 0, re.search(r"^TimeoutStopSec=(\d+)$", text, re.MULTILINE).group(1))


def numbers(env: dict, pre_stop: float, grace: object) -> dict[str, float]:
    """A shipped file's stop numbers, the kit's defaults where it sets none."""
    settings = Settings.from_env({k: str(v) for k, v in env.items()})
    return {
        "drain": settings.drain_seconds,
        "graceful": settings.graceful_timeout,
        "pre_stop": pre_stop,
        "grace": seconds(grace),
    }


def documented() -> dict[str, dict[str, float]]:
    """The table between ``<!-- stop-numbers -->`` markers in docs/deployment.md."""
    text = DEPLOYMENT_MD.read_text()
    table = text.split("<!-- stop-numbers -->")[1].split("<!-- /stop-numbers -->")[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        rows[cells[0]] = {
            "drain": float(cells[1]),
            "graceful": float(cells[2]),
            "pre_stop": float(cells[3]),
            "grace": seconds(re.split(r"[:=] ?", cells[4])[-1]),
        }
    return rows


SHIPPED = {
    "deploy/k8s/deployment.yaml": k8s_numbers,
    "deploy/compose.yaml": compose_numbers,
    "deploy/systemd/heavyapp.service": systemd_numbers,
}


@pytest.mark.parametrize("path", sorted(SHIPPED))
def test_the_shipped_stop_numbers_agree(path: str) -> None:
    """Drain window < GRACEFUL_TIMEOUT < grace period - preStop - margin, and the docs say so."""
    found = SHIPPED[path]()
    assert found["drain"] < found["graceful"], found
    assert found["grace"] >= found["pre_stop"] + found["graceful"] + MARGIN, found
    assert documented()[path] == found, f"docs/deployment.md's table disagrees with {path}"


def test_the_numbers_check_can_fail() -> None:
    """A grace period shorter than GRACEFUL_TIMEOUT plus a preStop is caught."""
    short = numbers({"GRACEFUL_TIMEOUT": "30"}, 5, "34s")
    assert not short["grace"] >= short["pre_stop"] + short["graceful"] + MARGIN
    assert set(documented()) == set(SHIPPED), "one row per shipped file"
