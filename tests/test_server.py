"""The real server: sizing, balance, replacement of a killed worker, graceful stop, bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests

from harness.server import GunicornServer
from helpers import http_get, poll_until
from workers.master.sizing import cpu_budget

pytestmark = pytest.mark.server
Start = Callable[..., GunicornServer]


def test_pool_is_one_worker_per_usable_cpu(start_server: Start) -> None:
    server = start_server()
    usable = cpu_budget().usable
    assert len(server.worker_pids()) == usable
    server.wait_for_log(rf"The total number of CPUs is \d+, usable {usable} ")
    server.wait_for_log(rf"Primary pid={server.master_pid}, starting {usable} workers")
    server.wait_for_log(r"effective config: bind=\['127\.0\.0\.1:\d+'\] workers=")


def test_taskset_to_one_cpu_gives_one_worker(start_server: Start) -> None:
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    cmd = ["taskset", "-c", "0", gunicorn, "-c", "gunicorn_conf.py", "heavyapp:app"]
    server = start_server(command=cmd)
    assert len(server.worker_pids()) == 1
    server.wait_for_log(r"usable 1 \(CPU affinity 1 of \d+\)")


def test_web_concurrency_wins(start_server: Start) -> None:
    server = start_server(workers=3)
    assert len(server.wait_for_workers(3)) == 3


def test_concurrent_heavy_requests_use_more_than_one_worker(server: GunicornServer) -> None:
    with ThreadPoolExecutor(8) as pool:
        url = f"{server.url}/heavy?n=2000000"
        answers = list(pool.map(lambda _: requests.get(url, timeout=30), range(16)))
    assert all(r.status_code == 200 for r in answers)
    pids = {r.json()["pid"] for r in answers}
    assert len(pids) > 1 and pids <= set(server.worker_pids())
    assert {r.headers["X-Worker-Pid"] for r in answers} == {str(p) for p in pids}


def test_killed_worker_is_replaced_within_two_seconds_and_logged(server: GunicornServer) -> None:
    before = server.worker_pids()
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    started = time.monotonic()
    after = server.wait_for_workers(len(before), timeout=2.0, exclude={victim})
    assert time.monotonic() - started < 2.0
    (newcomer,) = set(after) - set(before)
    server.wait_for_log(rf"worker pid={victim} died \(signal SIGKILL\): killed")
    server.wait_for_log(rf"Starting another worker for id \d \(replaces pid={victim}: killed\)")
    server.wait_for_log(rf"worker pid={newcomer} started: id \d")
    assert requests.get(f"{server.url}/healthz", timeout=30).status_code == 200


def test_sigterm_lets_the_request_in_flight_finish(server: GunicornServer) -> None:
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(requests.get, f"{server.url}/heavy?n=30000000", timeout=30)
        _wait_busy(server)
        os.kill(server.master_pid, signal.SIGTERM)
        answer = pending.result(timeout=60)
    assert answer.status_code == 200 and answer.json()["result"] == 30_000_000
    assert server.stop() == 0
    server.wait_for_log(r"Shutting down: Master")


def _wait_busy(server: GunicornServer, timeout: float = 5.0) -> None:
    """Poll until some worker has burnt 0.2 s of CPU since now: it is serving the request."""
    workers = [psutil.Process(pid) for pid in server.worker_pids()]
    start = [w.cpu_times().user for w in workers]
    poll_until(
        lambda: any(w.cpu_times().user - s > 0.2 for w, s in zip(workers, start, strict=True)),
        timeout,
        "a worker busy with the request",
        every=0.02,
    )


def raw(server: GunicornServer, request: bytes) -> tuple[int, dict, str]:
    """Send bytes no HTTP library would: (status, JSON body, head) of the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.decode("latin1").partition("\r\n\r\n")
    return int(head.split()[1]), json.loads(body), head


@pytest.mark.parametrize(
    ("request_bytes", "status", "says"),
    [
        (b"GET /heavy?n=" + b"9" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "URI Too Long"),
        (b"NOT A REQUEST\r\n\r\n", 400, "Bad Request"),
        (b"GET /healthz HTTP/1.1\r\n" + b"X-Junk: y\r\n" * 60 + b"\r\n", 431, "Header"),
        (b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n", 400, "HTTP Version"),
        (b"POST /heavy HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: foo\r\n\r\n", 400, "foo"),
    ],
)
def test_malformed_http_gets_json_too(
    server: GunicornServer, request_bytes: bytes, status: int, says: str
) -> None:
    workers = server.worker_pids()
    code, body, head = raw(server, request_bytes)
    assert code == status and says in body["error"]
    assert "X-Worker-Pid:" in head and "X-Worker-Id:" in head
    assert server.worker_pids() == workers


BIG_UNFINISHED_HEAD = b"GET /healthz HTTP/1.1\r\n" + (b"X-Big: " + b"a" * 8000 + b"\r\n") * 9


@pytest.mark.parametrize(
    "sent",
    [b"GET /healthz HTTP/1.1\r\nHost: x\r\n", BIG_UNFINISHED_HEAD],
    ids=["half a head", "72 kB of head, unfinished"],
)  # a client that sends nothing never reaches a worker: tests/test_clients.py
def test_a_client_that_sends_no_request_head_gets_a_408(start_server: Start, sent: bytes) -> None:
    server = start_server(workers=2, env={"HEAVYAPP_HEAD_TIMEOUT": "1", "TIMEOUT": "4"})
    workers = server.worker_pids()
    slow = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in workers]
    for sock in slow:  # one per worker: every worker waits on a slow client at once
        sock.sendall(sent)
    status = requests.get(f"{server.url}/healthz", timeout=10).status_code
    assert status == 200, "served once a worker gave up on its slow client"
    for sock in slow:
        with sock:
            head, _, answer = sock.recv(65536).decode("latin1").partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 408 Request Timeout")
        assert "no complete request head within 1s" in json.loads(answer)["error"]
    server.wait_for_log(r"Invalid request from ip=127\.0\.0\.1: no complete request head", count=2)
    assert server.worker_pids() == workers and "died" not in server.log_text()


def test_a_client_that_half_closes_mid_head_is_let_go_at_once(start_server: Start) -> None:
    """Its end of stream reaches the parser, which drops the connection: no 408 wait, no spin."""
    server = start_server(workers=1, env={"HEAVYAPP_HEAD_TIMEOUT": "5"})
    (worker,) = [psutil.Process(pid) for pid in server.worker_pids()]
    cpu_before = sum(worker.cpu_times()[:2])
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(65536) == b""  # closed without an answer: there was no request
    assert time.monotonic() - started < 2.5, "let go well before the 5 s deadline"
    assert sum(worker.cpu_times()[:2]) - cpu_before < 0.5, "the wait must not spin"
    assert requests.get(f"{server.url}/healthz", timeout=30).status_code == 200
    assert server.worker_pids() == [worker.pid]


BAD_INPUTS = [
    ("/heavy?n=abc", 400),
    ("/heavy?n=-1", 400),
    ("/heavy?n=50000001", 400),
    ("/heavy?n=" + "1" * 300, 400),
    ("/heavy?n=1&n=2", 400),
    ("/heavy?n=%00", 400),
    ("/nope", 404),
    ("/heavy/../../etc/passwd", 404),
]


def test_bad_input_costs_nothing(server: GunicornServer) -> None:
    workers = server.worker_pids()
    for path, code in BAD_INPUTS:  # sent exactly as written: a client library would tidy them
        status, body, headers = http_get(server.url + path)
        assert status == code, path
        assert body["error"], path
        assert headers["X-Worker-Pid"] in {str(p) for p in workers}
    refused = requests.delete(f"{server.url}/heavy", timeout=10)
    assert refused.status_code == 405 and refused.json()["error"]
    assert server.worker_pids() == workers
    assert "died" not in server.log_text()
