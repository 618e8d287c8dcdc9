"""Locust against real servers: the locustfile headless and in its web UI, and the experiment.

Locust runs in subprocesses (``locust`` and ``python -m loadtest.experiment``), never in the
pytest process: importing Locust monkey-patches the standard library with gevent.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from harness.server import REPO, GunicornServer, free_port
from helpers import poll_until
from loadtest.answers import heavy_answer_problem
from loadtest.balance import NO_ANSWER, WorkerTally, csv_path, format_table, read_csv, write_csv
from loadtest.report import per_second, side_by_side
from loadtest.results import RunResult, Sample
from workers.master.sizing import cpu_budget

LOCUST = str(Path(sys.executable).with_name("locust"))
LOCUSTFILE = str(REPO / "locustfile.py")


# -- pure parts --------------------------------------------------------------------------------


def test_tally_counts_per_worker_and_unanswered() -> None:
    tally = WorkerTally()
    for headers in [
        {"X-Worker-Id": "1", "X-Worker-Pid": "11"},
        {"X-Worker-Id": "0", "X-Worker-Pid": "10"},
        {"X-Worker-Id": "1", "X-Worker-Pid": "11"},
        {"X-Worker-Id": "1", "X-Worker-Pid": "12"},  # worker 1 replaced: a row of its own
        None,
    ]:
        tally.record(headers)
    rows = tally.rows()
    assert [(r.worker_id, r.pid, r.requests) for r in rows] == [
        ("0", "10", 1),
        ("1", "11", 2),
        ("1", "12", 1),
        (NO_ANSWER, NO_ANSWER, 1),
    ]
    assert sum(r.share for r in rows) == pytest.approx(1.0)
    assert "no answer" in format_table(rows)


def test_tally_merges_reports_from_locust_workers(tmp_path: Path) -> None:
    a, b = WorkerTally(), WorkerTally()
    a.record({"X-Worker-Id": "0", "X-Worker-Pid": "10"})
    b.record({"X-Worker-Id": "0", "X-Worker-Pid": "10"})
    b.record({"X-Worker-Id": "2", "X-Worker-Pid": "12"})
    a.merge(json.loads(json.dumps(b.export())))
    path = csv_path(str(tmp_path / "run"))
    write_csv(path, a.rows())
    assert path.name == "run_workers.csv"
    assert [(r.worker_id, r.requests) for r in read_csv(path)] == [("0", 2), ("2", 1)]


GOOD = '{"n": 5, "result": 5, "pid": 7, "worker_id": "0"}'
WORKER_0 = {"X-Worker-Pid": "7", "X-Worker-Id": "0"}


@pytest.mark.parametrize(
    ("status", "headers", "body", "wrong"),
    [
        (200, WORKER_0, GOOD, None),
        (400, {}, '{"error": "n must not be negative"}', "status 400"),
        (200, {}, "<html>", "not JSON"),
        (200, {}, "[1]", "not a JSON object"),
        (200, {}, '{"n":5,"result":4}', "asked n=5"),
        (200, {**WORKER_0, "X-Worker-Pid": "8"}, GOOD, "headers say"),
    ],
)  # fmt: skip
def test_answer_check(status: int, headers: dict[str, str], body: str, wrong: str | None) -> None:
    problem = heavy_answer_problem(status, headers, body, 5)
    assert problem is None if wrong is None else wrong in (problem or "")


def test_report_rates_and_table() -> None:
    history = [Sample(1.0, 30, 0), Sample(2.0, 50, 5), Sample(3.0, 70, 5)]
    assert per_second(history) == ([1.0, 2.0, 3.0], [30.0, 15.0, 20.0], [0.0, 5.0, 0.0])
    run = RunResult("single process", 1, 70, 5, 23.3, 800, 790, 1000, 1100, [], history, 0.98, 0.6)
    table = side_by_side([run])
    assert "single process" in table and "5 (7%)" in table and "23.3" in table
    assert "0.98 cores" in table


# -- real servers ------------------------------------------------------------------------------


@pytest.mark.server
@pytest.mark.parametrize("mode", [[], ["--processes", "2"]], ids=["local", "distributed"])
def test_headless_run_checks_answers_and_every_worker_serves(
    server: GunicornServer, tmp_path: Path, mode: list[str]
) -> None:
    prefix, final = tmp_path / "run", tmp_path / "final"  # Locust appends .json
    done = subprocess.run(
        [LOCUST, "-f", LOCUSTFILE, "--headless", "--host", server.url, *mode,
         "-u", "4", "-r", "4", "-t", "3s", "--heavy-n", "100000",
         "--csv", str(prefix), "--json-file", str(final)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output  # Locust exits 1 on any failed request
    assert "Requests per Gunicorn worker" in output
    entries = json.loads(
        final.with_suffix(".json").read_text()
    )  # Locust's final statistics, written at exit
    requests_made = sum(e["num_requests"] for e in entries)
    assert requests_made > 0 and sum(e["num_failures"] for e in entries) == 0, entries
    rows = read_csv(csv_path(str(prefix)))
    assert {int(r.pid) for r in rows} == set(server.worker_pids()), rows
    assert all(r.answered and r.requests > 0 for r in rows), rows
    assert sum(r.requests for r in rows) == requests_made  # no report lost, none counted twice


def run_experiment(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loadtest.experiment", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.server
def test_experiment_short_mode_reports_one_per_core_faster(tmp_path: Path) -> None:
    usable = cpu_budget().usable
    if usable < 2:
        pytest.skip(reason=f"only {usable} usable CPU: one worker per core is one worker here")
    done = run_experiment("--short", "--only", "before-after", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "single process" in done.stdout and "one per core" in done.stdout
    single, pool = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert (single["workers"], pool["workers"]) == (1, usable)
    if pool["rps"] <= single["rps"] and pool["machine_busy"] > 0.9 > pool["server_cpu"] / usable:
        why = (
            f"the machine's CPUs were {pool['machine_busy']:.0%} busy and the pool got only "
            f"{pool['server_cpu']:.2f} of its {usable} cores: neighbours took the rest, so "
            f"requests/s ({pool['rps']:.1f} vs {single['rps']:.1f}) compares nothing\n"
        )
        pytest.skip(reason=why + done.stdout)
    assert pool["rps"] > single["rps"], done.stdout
    answered = [w for w in pool["balance"] if w["worker_id"] != NO_ANSWER]
    assert len(answered) == usable and all(w["requests"] > 0 for w in answered), pool
    report = (tmp_path / "report.md").read_text()
    assert f"Usable CPUs: **{usable}**" in report and "| one per core |" in report
    assert (tmp_path / "experiment.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.server
def test_experiment_refuses_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_experiment("--short", "--out", str(tmp_path), "--port", str(port))
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"port {port} on 127.0.0.1 is already taken" in done.stderr


@pytest.fixture
def web_ui(tmp_path: Path) -> Iterator[str]:
    """``locust`` with the kit's locustfile, its web UI on a free loopback port; its URL."""
    port = free_port()
    log = (tmp_path / "locust.log").open("wb")
    proc = subprocess.Popen(
        [LOCUST, "-f", LOCUSTFILE, "--web-host", "127.0.0.1", "--web-port", str(port)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "locust.log").read_text())
            try:
                return requests.get(url, timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        poll_until(up, 30, "Locust's web UI answering", every=0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.mark.server
def test_web_ui_swarm_produces_statistics_and_balance(server: GunicornServer, web_ui: str) -> None:
    page = requests.get(web_ui, timeout=5).text
    assert '"title": "Workers"' in page  # the extra tab
    assert '"heavy_n": {' in page and '"heavy_timeout": {' in page  # the form's extra fields
    started = requests.post(
        f"{web_ui}/swarm",
        data={"user_count": 2, "spawn_rate": 2, "host": server.url, "heavy_n": 100000},
        timeout=10,
    ).json()
    assert started["success"], started

    def answered() -> dict[str, Any] | None:
        stats = requests.get(f"{web_ui}/stats/requests", timeout=5).json()
        total = next(s for s in stats["stats"] if s["name"] == "Aggregated")
        return stats if total["num_requests"] >= 10 else None

    stats = poll_until(answered, 30, "10 requests in Locust's statistics", every=0.2)
    (workers,) = (e["data"] for e in stats["extended_stats"] if e["key"] == "workers")
    assert workers and all(w["worker_id"] != NO_ANSWER for w in workers), workers
    assert requests.get(f"{web_ui}/workers", timeout=5).json()
    assert requests.post(f"{web_ui}/stop", timeout=10).json()["success"]
