"""Operating the server like pm2: /metrics summed across workers, heavyctl, JSON logs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from harness.server import GunicornServer
from helpers import poll_until
from workers import ctl
from workers.settings import Settings
from workers.shared import jsonlog, titles

Start = Callable[..., GunicornServer]
HEAVYCTL = str(Path(sys.executable).with_name("heavyctl"))
N = 20_000  # a /heavy request of about a millisecond


def get_pid(url: str) -> int:
    """GET ``url``; the pid of the worker that answered it (any non-200 fails the test)."""
    answer = requests.get(url, timeout=30)
    assert answer.status_code == 200, answer.text
    return int(answer.headers["X-Worker-Pid"])


def scrape(server: GunicornServer) -> tuple[int, dict[tuple[str, frozenset], float]]:
    """(pid of the worker that answered, {(sample name, labels): value}) of one ``/metrics``."""
    resp = requests.get(f"{server.url}/metrics", timeout=10)
    resp.raise_for_status()
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = resp.text
    pid = int(resp.headers["X-Worker-Pid"])
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return pid, samples


def sample(name: str, **labels: str) -> tuple[str, frozenset]:
    """The key of one sample in what ``scrape`` returns."""
    return name, frozenset(labels.items())


def value(samples: dict, name: str, **labels: str) -> float:
    """A sample's value; fails when /metrics lacks it, so ``== 0`` cannot pass by absence."""
    found = samples.get(sample(name, **labels))
    assert found is not None, f"{name} {labels} not in /metrics: {sorted({n for n, _ in samples})}"
    return found


def heavyctl(
    server: GunicornServer, *args: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """The installed console script, found from the environment the server was started with."""
    run_env = {**os.environ, "HEAVYAPP_RUN_DIR": str(server.run_dir), **(env or {})}
    return subprocess.run(
        [HEAVYCTL, *args], env=run_env, capture_output=True, text=True, timeout=90
    )


def heavyctl_json(server: GunicornServer, *args: str) -> Any:
    done = heavyctl(server, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def status(server: GunicornServer) -> dict[str, Any]:
    return heavyctl_json(server, "status", "--interval", "0.1")


# -- /metrics --------------------------------------------------------------------------------


@pytest.mark.server
def test_request_counter_sums_across_workers(server: GunicornServer) -> None:
    served: Counter[int] = Counter()
    with ThreadPoolExecutor(2) as pool:
        # Pairs of concurrent requests until both workers served some: bounded at 200.
        while sum(served.values()) < 200 and (len(served) < 2 or sum(served.values()) < 20):
            served.update(pool.map(get_pid, [f"{server.url}/heavy?n={N}"] * 2))
        assert len(served) == 2, f"one worker served all {served}"
        k = sum(served.values())

        answered: dict[int, dict] = {}
        for _ in range(100):  # scrape until each worker answered one (concurrently: both busy)
            answered.update(pool.map(lambda _: scrape(server), range(2)))
            if len(answered) == 2:
                break
    assert set(answered) == set(served), "every worker answers /metrics"
    for samples in answered.values():
        assert value(samples, "heavyapp_http_requests_total", endpoint="/heavy", status="200") == k
        heavy = {"endpoint": "/heavy"}
        assert value(samples, "heavyapp_http_request_duration_seconds_count", **heavy) == k
        assert value(samples, "heavyapp_heavy_work_size_count") == k
        assert value(samples, "heavyapp_heavy_work_size_sum") == k * N
        assert value(samples, "heavyapp_workers") == 2
        assert value(samples, "heavyapp_workers_target") == 2
        assert value(samples, "heavyapp_worker_starts_total") == 2


@pytest.mark.server
def test_crash_counts_as_an_exit_with_its_cause(start_server: Start) -> None:
    server = start_server(workers=2, env={"HEAVYAPP_CHAOS": "1"})
    before = set(server.worker_pids())
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{server.url}/chaos/exit", timeout=10)

    def replaced() -> set[int] | None:
        pids = set(server.worker_pids())
        return pids if len(pids) == 2 and pids != before else None

    assert len(poll_until(replaced, 15, "a replacement") - before) == 1, (
        "one worker died, one replaced it"
    )

    def counted() -> dict | None:
        samples = scrape(server)[1]
        exits = sample("heavyapp_worker_exits_total", cause="exit", planned="false")
        return samples if samples.get(exits) == 1 else None

    samples = poll_until(counted, 15, "the exit counted")
    assert value(samples, "heavyapp_worker_starts_total") == 3
    assert value(samples, "heavyapp_workers") == 2
    total = "heavyapp_http_requests_total"
    answered = {dict(labels)["endpoint"] for name, labels in samples if name == total}
    assert "/healthz" in answered and "/chaos/exit" not in answered, "the crash answered nothing"


# -- heavyctl --------------------------------------------------------------------------------


@pytest.mark.server
def test_status_shows_each_worker_and_counts_restarts(server: GunicornServer) -> None:
    for _ in range(4):
        get_pid(f"{server.url}/heavy?n={N}")
    data = status(server)
    rows = data["workers"]
    assert data["master"]["pid"] == server.master_pid
    assert data["master"]["bind"] == [server.url]
    assert sorted(r["pid"] for r in rows) == server.worker_pids()
    assert [r["id"] for r in rows] == [0, 1]
    assert {r["status"] for r in rows} == {"online"}
    assert [r["restarts"] for r in rows] == [0, 0]
    assert sum(r["requests"] for r in rows) >= 4  # and the readiness checks
    assert all(r["memory_mb"] > 1 for r in rows)

    victim = next(r for r in rows if r["id"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    server.wait_for_workers(2, exclude={victim["pid"]})

    def replaced() -> dict | None:
        again = {r["id"]: r for r in status(server)["workers"]}
        return again if again.get(1, {}).get("status") == "online" else None

    again = poll_until(replaced, 15, "id 1 back online")
    assert sorted(again) == [0, 1]
    assert again[1]["pid"] not in (victim["pid"], again[0]["pid"])
    assert (again[0]["restarts"], again[1]["restarts"]) == (0, 1)
    assert again[1]["last_crash"] == "killed"
    assert again[0]["pid"] == next(r["pid"] for r in rows if r["id"] == 0)

    text = heavyctl(server, "status", "--interval", "0.1").stdout
    print(text)
    assert f"master pid {server.master_pid}" in text
    worker_lines = [line.split() for line in text.splitlines()[3:]]
    assert [(w[0], int(w[1])) for w in worker_lines] == [(str(i), again[i]["pid"]) for i in (0, 1)]
    assert worker_lines[1][4] == "1" and "killed" in worker_lines[1]

    crashes = heavyctl_json(server, "crashes")
    assert [(c["pid"], c["worker_id"], c["cause"]) for c in crashes] == [
        (victim["pid"], 1, "killed")
    ]
    assert "killed (signal SIGKILL)" in heavyctl(server, "crashes").stdout


@pytest.mark.server
def test_scale_up_then_down(server: GunicornServer) -> None:
    first = {r["id"]: r["pid"] for r in status(server)["workers"]}
    up = heavyctl_json(server, "scale", "+1")
    assert (up["previous"], up["target"], len(up["pids"])) == (2, 3, 3)
    rows = {r["id"]: r["pid"] for r in status(server)["workers"]}
    assert sorted(rows) == [0, 1, 2]
    assert sorted(rows.values()) == server.worker_pids() == up["pids"]

    down = heavyctl_json(server, "scale", "-1")
    assert (down["previous"], down["target"]) == (3, 2)
    rows = {r["id"]: r["pid"] for r in status(server)["workers"]}
    assert rows == first, "the newest id left, the others stayed"
    assert server.worker_pids() == sorted(first.values())

    for bad, says in (("0", "the least is 1"), ("-5", "the least is 1"), ("x", "N, +k or -k")):
        refused = heavyctl(server, "scale", bad)
        assert refused.returncode == 1 and says in refused.stderr, refused.stderr


@pytest.mark.server
def test_reload_under_load_fails_no_request(server: GunicornServer) -> None:
    stop = threading.Event()
    served: Counter[int] = Counter()
    failures: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(5000):  # bounded; stopped long before
            if stop.is_set():
                return
            try:
                pid = get_pid(f"{server.url}/heavy?n={N}")
            except Exception as exc:  # any failure of any kind counts
                with lock:
                    failures.append(repr(exc))
                continue
            with lock:
                served[pid] += 1

    old = set(server.worker_pids())
    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        poll_until(lambda: sum(served.values()) >= 20, 15, "load running")
        reloaded = heavyctl_json(server, "reload")
        new = set(reloaded["new_pids"])
        assert set(reloaded["old_pids"]) == old and len(new) == 2 and not new & old
        poll_until(lambda: sum(served[p] for p in new) >= 20, 15, "the new workers serve")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    print(f"reload under load: {sum(served.values())} requests, 0 failed, {reloaded}")
    assert sum(served[p] for p in old) > 0

    data = status(server)
    assert [r["id"] for r in data["workers"]] == [0, 1]
    assert data["master"]["generation"] == 1 and data["master"]["reloads"] == 1
    samples = scrape(server)[1]
    assert value(samples, "heavyapp_worker_exits_total", cause="reload", planned="true") == 2


@pytest.mark.server
def test_heavyctl_finds_each_server_from_host_and_port(start_server: Start) -> None:
    """Two servers side by side, each found from the HOST/PORT its shell started it with."""
    servers = [start_server(workers=1, env={"HEAVYAPP_RUN_DIR": ""}) for _ in range(2)]

    def shell(server: GunicornServer) -> dict[str, str]:
        """The environment the server and heavyctl inherit (XDG_RUNTIME_DIR included)."""
        return {**os.environ, "HEAVYAPP_RUN_DIR": "", "HOST": "127.0.0.1", "PORT": str(server.port)}

    try:
        for server in servers:
            done = heavyctl(server, "status", "--json", "--interval", "0.1", env=shell(server))
            assert done.returncode == 0, done.stderr
            master = json.loads(done.stdout)["master"]
            assert master["pid"] == server.master_pid
            assert master["run_dir"] == str(Settings.from_env(shell(server)).run_dir())
    finally:
        for server in servers:
            server.stop()
            shutil.rmtree(Settings.from_env(shell(server)).run_dir(), True)


def test_heavyctl_says_when_no_server_runs(tmp_path: Path) -> None:
    done = subprocess.run(
        [HEAVYCTL, "status", "--run-dir", str(tmp_path)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1
    assert f"no heavyapp server is running at {tmp_path}/gunicorn.ctl" in done.stderr
    assert "--run-dir" in done.stderr


# -- JSON logs -------------------------------------------------------------------------------


@pytest.mark.server
def test_json_logs_parse_and_name_the_worker(start_server: Start) -> None:
    server = start_server(workers=2, env={"HEAVYAPP_LOG_FORMAT": "json"})
    headers = requests.get(f"{server.url}/heavy?n={N}", timeout=10).headers
    pid, wid = int(headers["X-Worker-Pid"]), int(headers["X-Worker-Id"])
    server.wait_for_log(r'"path": "/heavy"')
    server.stop()
    entries = [json.loads(line) for line in server.log_text().splitlines() if line.strip()]
    assert all({"time", "level", "pid", "worker_id", "message"} <= set(e) for e in entries)
    access = [e for e in entries if e.get("path") == "/heavy"]
    assert len(access) == 1
    assert (access[0]["pid"], access[0]["worker_id"], access[0]["role"]) == (pid, wid, "worker")
    assert (access[0]["status"], access[0]["query"], access[0]["method"]) == (200, f"n={N}", "GET")
    master = [e for e in entries if e["pid"] == server.master_pid]
    assert master and {(e["role"], e["worker_id"]) for e in master} == {("master", None)}


# -- pure parts ------------------------------------------------------------------------------


def test_parse_title() -> None:
    assert titles.parse("heavyapp: worker 3 [pid 42] 17 requests") == {
        "id": 3,
        "requests": 17,
        "waiting": False,
    }
    assert titles.parse("heavyapp: worker 0 [pid 42] waiting 2.0s (crash loop)") == {
        "id": 0,
        "requests": None,
        "waiting": True,
    }
    assert titles.parse("gunicorn: worker [heavyapp]")["id"] is None


@pytest.mark.parametrize(
    ("spec", "current", "target"), [("3", 2, 3), ("+2", 2, 4), ("-1", 3, 2), ("1", 5, 1)]
)
def test_scale_target(spec: str, current: int, target: int) -> None:
    assert ctl.scale_target(spec, current) == target


@pytest.mark.parametrize("spec", ["0", "-2", "two", "+", "1.5", ""])
def test_scale_target_refuses(spec: str) -> None:
    with pytest.raises(ctl.CtlError):
        ctl.scale_target(spec, 2)


def test_human_duration() -> None:
    assert [ctl.human_duration(s) for s in (None, 5, 185, 7380, 352800)] == [
        "-",
        "5s",
        "3m05s",
        "2h03m",
        "4d02h",
    ]


def test_json_formatter_keeps_a_traceback_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("gunicorn.error", logging.ERROR, "", 0, "x=%s", (1,), None)
        record.exc_info = sys.exc_info()
    record.worker = "worker 7"
    line = jsonlog.JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert (entry["message"], entry["worker_id"], entry["role"]) == ("x=1", 7, "worker")
    assert "ValueError: boom" in entry["traceback"]


def test_during_a_reload_the_older_process_of_an_id_is_stopping() -> None:
    rows = [
        {"id": 0, "age": 1, "status": "online"},
        {"id": 0, "age": 3, "status": "online"},
        {"id": 1, "age": 4, "status": "booting"},
    ]
    ctl._mark_stopping(rows)
    assert [r["status"] for r in rows] == ["stopping", "online", "booting"]
