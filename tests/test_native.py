"""Native work: each worker's thread budget, /matmul and /predict, a model preloaded once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.server import GunicornServer, ServerError
from helpers import http_get, poll_until
from workers.master.sizing import cpu_budget
from workers.settings import NATIVE_THREADS
from workers.shared.threads import VARIABLES, ThreadBudget, export_budget

Start = Callable[..., GunicornServer]
HEAVYCTL = str(Path(sys.executable).with_name("heavyctl"))
MODEL_MB = 64


# -- the budget, as pure functions ---------------------------------------------------------


@pytest.mark.parametrize(
    ("usable", "workers", "chosen", "threads", "text"),
    [
        (2, 2, None, 1, "1 (2 usable CPUs / 2 workers)"),
        (2, 1, None, 2, "2 (2 usable CPUs / 1 worker)"),
        (8, 3, None, 2, "2 (8 usable CPUs / 3 workers)"),
        (1, 4, None, 1, "1 (1 usable CPUs / 4 workers)"),
        (2, 2, 3, 3, "3 (HEAVYAPP_THREADS_PER_WORKER; 2 usable CPUs)"),
    ],
)
def test_each_worker_gets_its_share_of_the_cpus(
    usable: int, workers: int, chosen: int | None, threads: int, text: str
) -> None:
    budget = ThreadBudget.of(usable, workers, chosen)
    assert (budget.threads, budget.describe()) == (threads, text)


def test_the_kit_replaces_an_operators_variable_and_says_so() -> None:
    warned: list[str] = []
    env = {"OPENBLAS_NUM_THREADS": "4", "PATH": "/bin"}
    replaced = export_budget(ThreadBudget.of(2, 2, None), env, warned.append)
    assert replaced == ["OPENBLAS_NUM_THREADS=4"]
    assert "replaced OPENBLAS_NUM_THREADS=4 by 1" in warned[0]
    assert {name: env[name] for name in VARIABLES} == dict.fromkeys(VARIABLES, "1")
    assert env[NATIVE_THREADS] == "1" and env["PATH"] == "/bin"
    # A reload recomputing the budget: the kit's own earlier value is no operator's.
    assert export_budget(ThreadBudget.of(2, 1, None), env, warned.append) == []
    assert env["OMP_NUM_THREADS"] == "2" and len(warned) == 1


def test_a_pool_loaded_before_the_budget_is_limited_after_the_fork() -> None:
    """Under preload a library may be loaded before the variables were set: threadpoolctl."""
    code = (
        "import numpy, os, json\n"
        "from threadpoolctl import threadpool_info\n"
        "from workers.shared.threads import limit_loaded_pools\n"
        "before = [p['num_threads'] for p in threadpool_info()]\n"
        f"os.environ['{NATIVE_THREADS}'] = '1'\n"
        "changed = limit_loaded_pools()\n"
        "after = [p['num_threads'] for p in threadpool_info()]\n"
        "print(json.dumps([before, changed, after]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in (*VARIABLES, NATIVE_THREADS)}
    env["OPENBLAS_NUM_THREADS"] = "2"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    before, changed, after = json.loads(out.stdout)
    assert before == [2] and after == [1]
    assert changed[0].endswith(" 2->1")


# -- real servers ----------------------------------------------------------------------------


def expected_threads(workers: int) -> int:
    return max(1, cpu_budget().usable // workers)


def matmul_threads(server: GunicornServer, workers: int) -> dict[int, int]:
    """{worker pid: its BLAS pool size} from /matmul answers, until every worker answered."""
    seen: dict[int, int] = {}

    def everyone() -> bool:
        status, body, headers = http_get(f"{server.url}/matmul?size=50")
        assert status == 200, body
        assert int(headers["X-Worker-Pid"]) == body["pid"]
        seen[body["pid"]] = body["blas_threads"]
        return len(seen) == workers

    poll_until(everyone, 20, f"answers from all {workers} workers", every=0.01)
    return seen


def count_requests(server: GunicornServer, endpoint: str) -> float:
    """``endpoint``'s requests answered, as /metrics sums them over all workers."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "heavyapp_http_requests_total" and s.labels["endpoint"] == endpoint
    )


def heavyctl_status(server: GunicornServer) -> dict:
    env = {**os.environ, "HEAVYAPP_RUN_DIR": str(server.run_dir)}
    out = subprocess.run(
        [HEAVYCTL, "status", "--json", "--interval", "0.05"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.server
def test_matmul_and_predict_answer_json_and_refuse_bad_input(start_server: Start) -> None:
    server = start_server(
        workers=2, env={"OPENBLAS_NUM_THREADS": "3", "HEAVYAPP_MAX_MATMUL_SIZE": "500"}
    )
    threads = expected_threads(2)
    server.wait_for_log(rf"native threads per worker: {threads} \(\d+ usable CPUs / 2 workers\)")
    server.wait_for_log("replaced OPENBLAS_NUM_THREADS=3 by")
    assert set(matmul_threads(server, 2).values()) == {threads}

    status, body, _ = http_get(f"{server.url}/matmul")
    assert status == 200
    assert (body["size"], round(body["result"], 3)) == (400, 15991818.599)
    assert body["message"].startswith("The checksum of the 400x400 product is")
    assert body["worker_id"] in ("0", "1") and body["elapsed_ms"] > 0
    for query, says in [
        ("size=501", "size=501 is above the maximum 500 (HEAVYAPP_MAX_MATMUL_SIZE)"),
        ("size=-1", "must not be negative"),
        ("size=4e2", "size must be a non-negative integer"),
        ("size=1&size=2", "given 2 times"),
        ("size=" + "9" * 30, "at most 20 are accepted"),
    ]:
        status, body, headers = http_get(f"{server.url}/matmul?{query}")
        assert status == 400 and says in body["error"], (query, body)
        assert headers["X-Worker-Id"] in ("0", "1") and headers["X-Worker-Pid"]
    status, body, headers = http_get(f"{server.url}/predict")
    assert status == 503 and "HEAVYAPP_MODEL_MB" in body["error"]
    assert headers["X-Worker-Pid"]
    status, body, _ = http_get(f"{server.url}/predict?k=101")
    assert status == 400 and "k=101 is above the maximum 100" in body["error"]
    assert server.healthy() and len(server.worker_pids()) == 2


@pytest.mark.server
def test_threads_per_worker_overrides_the_division(start_server: Start) -> None:
    server = start_server(workers=2, env={"HEAVYAPP_THREADS_PER_WORKER": "2"})
    server.wait_for_log(r"native threads per worker: 2 \(HEAVYAPP_THREADS_PER_WORKER")
    assert set(matmul_threads(server, 2).values()) == {2}


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"HEAVYAPP_THREADS_PER_WORKER": "0"}, "HEAVYAPP_THREADS_PER_WORKER must be a positive"),
        ({"HEAVYAPP_THREADS_PER_WORKER": "2000"}, "HEAVYAPP_THREADS_PER_WORKER must be at most"),
        ({"HEAVYAPP_PRELOAD": "yes"}, "HEAVYAPP_PRELOAD must be one of 0, 1"),
        ({"HEAVYAPP_MODEL_MB": "5000"}, "HEAVYAPP_MODEL_MB must be at most 4096, got 5000"),
        ({"HEAVYAPP_MODEL_MB": "-1"}, "HEAVYAPP_MODEL_MB must be zero or more"),
        (
            {"HEAVYAPP_MODEL_MB": "5000", "HEAVYAPP_PRELOAD": "1"},
            "HEAVYAPP_MODEL_MB must be at most 4096",
        ),
    ],
)
@pytest.mark.server
def test_bad_native_settings_refuse_to_start(env: dict[str, str], says: str) -> None:
    server = GunicornServer(workers=1, env=env)
    try:
        with pytest.raises(ServerError, match=says):
            server.start()
        assert server.stop() not in (0, None)
    finally:
        server.cleanup()


@pytest.mark.server
def test_a_preloaded_model_is_shared_and_everything_else_still_works(start_server: Start) -> None:
    """No named metrics directory: the kit names one before the app loads."""
    server = start_server(
        workers=2, env={"HEAVYAPP_PRELOAD": "1", "HEAVYAPP_MODEL_MB": str(MODEL_MB)}
    )
    server.wait_for_log("preload_app=True")
    assert server.wait_for_ids({0, 1})
    answers: dict[int, tuple] = {}
    sent = [0]

    def both_workers() -> bool:
        status, body, _ = http_get(f"{server.url}/predict?seed=7&k=3")
        sent[0] += 1
        assert status == 200, body
        answers[body["pid"]] = (body["rows"], body["scores"], body["model_rows"])
        return len(answers) == 2

    poll_until(both_workers, 20, "/predict from both workers", every=0.01)
    first, second = answers.values()
    assert first == second and first[2] == MODEL_MB * 1024
    assert count_requests(server, "/predict") == sent[0]  # summed over both workers

    data = heavyctl_status(server)
    rows, master = data["workers"], data["master"]
    assert master["native_threads"] == expected_threads(2)
    assert all(r["uss_mb"] > 0 and r["pss_mb"] > 0 for r in rows)
    total = master["pss_mb"] + sum(r["pss_mb"] for r in rows)
    assert abs(master["pss_mb_total"] - total) < 0.5
    # Each worker reads the whole model, yet owns almost none of it: the pages are the master's.
    assert all(r["uss_mb"] < MODEL_MB / 2 for r in rows), rows

    # A HUP re-forks from the same preloaded app (Gunicorn does not re-import it): new pids,
    # the same ids, metrics still summed over the new workers.
    old = set(server.worker_pids())
    os.kill(server.master_pid, signal.SIGHUP)
    poll_until(lambda: not old & set(server.worker_pids()), 20, "the old workers replaced")
    assert server.wait_for_ids({0, 1})
    answers.clear()
    poll_until(both_workers, 20, "/predict from both new workers", every=0.01)
    assert not old & set(answers)
    assert count_requests(server, "/predict") == sent[0]
