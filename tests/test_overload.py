"""Overload: queue wait from the kernel, the queue timeout, departed clients, cheap paths.

Each scenario holds a one-worker server's only worker with a request whose head is not complete
yet (the worker waits in its head gate), queues more connections behind it, lets them age, then
completes the first head: what was queued is judged when the worker picks it up.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from harness.server import GunicornServer
from helpers import poll_until

Start = Callable[..., GunicornServer]
HEAVYCTL = str(Path(sys.executable).with_name("heavyctl"))


def metric(server: GunicornServer, name: str, **labels: str) -> float:
    """One sample of ``/metrics`` (0 when absent), matched by name and labels."""
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name_part, _, label_part = series.partition("{")
        got = ",".join(sorted(label_part.rstrip("}").split(","))) if label_part else ""
        if name_part == name and got == want:
            return float(value)
    return 0.0


def heavy_served(server: GunicornServer) -> float:
    """How many ``/heavy`` requests the app itself answered (any status)."""
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith('heavyapp_http_requests_total{endpoint="/heavy"')
    )


def connect(server: GunicornServer, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(data)
    return sock


def answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a ``Connection: close`` answer read to the end."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


@contextmanager
def worker_held(server: GunicornServer) -> Iterator[None]:
    """The only worker waits for the rest of a head until the block ends; then it answers."""
    blocker = connect(server, b"GET /healthz HTTP/1.1\r\n")
    try:
        yield
    finally:
        blocker.sendall(b"Host: held\r\n\r\n")
        assert answer(blocker)[0] == 200


def age(seconds: float) -> None:
    """Let queued requests wait ``seconds`` (the condition under test is the elapsed time)."""
    since = time.monotonic()
    poll_until(lambda: time.monotonic() - since >= seconds, seconds + 5, "time to pass")


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode()


def test_a_request_that_waited_too_long_is_refused_at_once_and_never_reaches_the_app(
    start_server: Start,
) -> None:
    server = start_server(
        workers=1, env={"HEAVYAPP_QUEUE_TIMEOUT": "0.2", "HEAVYAPP_LOG_FORMAT": "json"}
    )
    requests.get(f"{server.url}/heavy?n=10", timeout=10)  # one served, for its access line
    with worker_held(server):
        queued = connect(server, get("/heavy?n=12345"))
        age(0.4)
    status, headers, body = answer(queued)
    assert status == 503
    assert headers["Retry-After"] == "1"
    assert headers["X-Worker-Id"] == "0" and headers["X-Worker-Pid"].isdigit()
    assert "overloaded" in json.loads(body)["error"]
    assert heavy_served(server) == 1  # only the first request ran the app
    assert metric(server, "heavyapp_shed_total", reason="queue-timeout") == 1
    lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    refused = [e for e in lines if e.get("query") == "n=12345"]
    assert [(e["status"], e["path"]) for e in refused] == [(503, "/heavy")]
    assert refused[0]["queue_wait_ms"] >= 400
    served = next(e for e in lines if e.get("query") == "n=10")
    assert 0 <= served["queue_wait_ms"] < 200
    assert not [e for e in lines if e["level"] in ("WARNING", "ERROR")]
    assert metric(server, "heavyapp_queue_wait_seconds_count") >= 3


def test_a_trickled_request_that_waited_too_long_is_refused_before_a_worker_waits_on_it(
    start_server: Start,
) -> None:
    """Its bytes trickle in while it queues: the kernel's receive stamp of the coalesced bytes
    is the latest byte's, but its age counts from the first (the connection's TCP age)."""
    server = start_server(workers=1, env={"HEAVYAPP_QUEUE_TIMEOUT": "0.3"})
    with worker_held(server):
        queued = connect(server, b"POST /heavy HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\n")
        for _ in range(6):  # 0.6 s of trickle, the last byte fresh when the worker comes
            age(0.1)
            queued.sendall(b" ")
    picked = time.monotonic()
    status, _, body = answer(queued)
    assert status == 503 and "overloaded" in json.loads(body)["error"]
    assert time.monotonic() - picked < 1  # refused at once, not after a body deadline
    assert heavy_served(server) == 0


def test_a_client_that_left_before_its_turn_never_reaches_the_app(start_server: Start) -> None:
    server = start_server(workers=1, env={"HEAVYAPP_QUEUE_TIMEOUT": "5"})
    with worker_held(server):
        gone = connect(server, get("/heavy?n=424242"))
        gone.close()
    poll_until(
        lambda: metric(server, "heavyapp_shed_total", reason="client-gone") == 1,
        10,
        "the departed client counted",
    )
    assert heavy_served(server) == 0
    assert '"GET /heavy?n=424242 HTTP/1.1" 499' in server.log_text()
    assert requests.get(f"{server.url}/heavy?n=10", timeout=10).status_code == 200


def test_cheap_paths_pass_an_overloaded_queue_and_readiness_does_not(
    start_server: Start,
) -> None:
    """Liveness must never restart a busy pod, so /healthz (and /metrics) are never shed;
    /readyz is, so readiness takes an overloaded pod out of rotation."""
    server = start_server(workers=1, env={"HEAVYAPP_QUEUE_TIMEOUT": "0.2"})
    with worker_held(server):
        queued = {path: connect(server, get(path)) for path in ("/heavy", "/healthz", "/readyz")}
        queued["/metrics"] = connect(server, get("/metrics"))
        age(0.4)
    statuses = {path: answer(sock)[0] for path, sock in queued.items()}
    assert statuses == {"/heavy": 503, "/healthz": 200, "/readyz": 503, "/metrics": 200}
    assert requests.get(f"{server.url}/readyz", timeout=10).status_code == 200


#: Malformed, ancient, from the future: none may change the answer.
REQUEST_STARTS = ["t=garbage", "t=0", "t=1", "t=99999999999999", "t=", "nonsense", "t=1e300"]


def test_x_request_start_is_ignored_never_a_5xx(server: GunicornServer) -> None:
    """The kernel's stamp decides; nginx's header (untrusted here: not from
    forwarded_allow_ips, and malformed or absurd) changes nothing."""
    for value in REQUEST_STARTS:
        resp = requests.get(
            f"{server.url}/heavy?n=100",
            headers={"X-Request-Start": value.encode("latin-1")},
            timeout=10,
        )
        assert resp.status_code == 200, (value, resp.text)
    assert metric(server, "heavyapp_shed_total", reason="queue-timeout") == 0


def test_below_capacity_nothing_is_refused(server: GunicornServer) -> None:
    """As many clients as workers, each waiting for its answer: the queue never stands."""
    with requests.Session() as one, requests.Session() as two:
        for _ in range(25):
            for client in (one, two):
                assert client.get(f"{server.url}/heavy?n=20000", timeout=10).status_code == 200
    shed = sum(
        metric(server, "heavyapp_shed_total", reason=r)
        for r in ("queue-timeout", "queue-growing", "client-gone")
    )
    assert shed == 0
    assert metric(server, "heavyapp_queue_wait_seconds_count") >= 50
    assert metric(server, "heavyapp_listen_backlog") == 0


def test_heavyctl_status_shows_queue_wait_and_shed_counts(start_server: Start) -> None:
    server = start_server(workers=1, env={"HEAVYAPP_QUEUE_TIMEOUT": "0.2"})
    with worker_held(server):
        queued = connect(server, get("/heavy"))
        age(0.4)
    assert answer(queued)[0] == 503
    env = {**server.env}
    run = [HEAVYCTL, "status", "--interval", "0.1", "--run-dir", str(server.run_dir)]
    data = json.loads(
        subprocess.run([*run, "--json"], env=env, capture_output=True, timeout=30).stdout
    )
    assert data["queue"]["shed"] == {"queue-timeout": 1, "queue-growing": 0, "client-gone": 0}
    assert data["queue"]["requests"] >= 2
    text = subprocess.run(run, env=env, capture_output=True, text=True, timeout=30).stdout
    assert "shed: queue-timeout 1" in text and "requests timed, mean wait" in text


@pytest.mark.skipif(
    importlib.util.find_spec("locust") is None,
    reason="locust not installed: pip install -e '.[load]' (the newest-Python CI leg has none)",
)
def test_locust_counts_a_refusal_apart_and_honours_retry_after(
    start_server: Start, tmp_path: Path
) -> None:
    """Six closed-loop users on one worker: the queue is always past 0.1 s, so some are refused;
    a refusal is its own row, not a failure, and each refused user then waits Retry-After (1 s),
    so there are at most users x (seconds + 1) of them."""
    server = start_server(workers=1, env={"HEAVYAPP_QUEUE_TIMEOUT": "0.1"})
    final = tmp_path / "final"
    done = subprocess.run(
        [str(Path(sys.executable).with_name("locust")), "-f", "locustfile.py", "--headless",
         "--host", server.url, "-u", "6", "-r", "6", "-t", "4s", "--heavy-n", "1000000",
         "--heavy-timeout", "10", "--heavy-retry-after", "--json-file", str(final)],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr  # no failures
    entries = {e["name"]: e for e in json.loads(final.with_suffix(".json").read_text())}
    assert entries["/heavy"]["num_requests"] > 0
    refused = entries["/heavy refused"]["num_requests"]
    assert 0 < refused <= 6 * 5, entries
    shed = sum(
        metric(server, "heavyapp_shed_total", reason=r) for r in ("queue-timeout", "queue-growing")
    )
    assert shed >= refused  # a request still queued when Locust stopped is shed unseen
