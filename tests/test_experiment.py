"""The experiment's overload run: what it counts, and its short form against real servers.

The experiment itself runs in a subprocess (``python -m loadtest.experiment``): importing it
imports Locust, which monkey-patches the standard library with gevent.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest

from harness.openloop import Answer, OpenLoopResult, open_loop, recovery_seconds
from harness.server import REPO, GunicornServer, free_port
from loadtest.report import overload_rows
from loadtest.results import Overload, OverloadResult
from workers.master.sizing import cpu_budget

MISSING = [name for name in ("hey", "wrk") if shutil.which(name) is None]
needs_tools = pytest.mark.skipif(
    bool(MISSING), reason=f"{MISSING} not installed: apt-get install hey wrk (.ci/run does)"
)
NO_LOAD_EXTRA = [m for m in ("locust", "matplotlib") if importlib.util.find_spec(m) is None]

# -- pure parts --------------------------------------------------------------------------------


def spec(recovery_limit_s: float = 10.0) -> Overload:
    return Overload(4.0, 10.0, 40, 2, 1, 1000, recovery_limit_s)


def test_a_refusal_a_late_answer_and_no_answer_are_counted_apart() -> None:
    answers = (
        Answer(0, 1.0, 0.05, 200),
        Answer(1, 1.1, 0.002, 503),
        Answer(2, 1.2, 1.004, 200),  # a 2xx past the timeout: not served in time
        Answer(3, 1.3, 0.01, 500),
    )
    run = OpenLoopResult(3, 2, 1, 3, 6, answers, 5.0, 0.1)
    result = OverloadResult.of("kit", 2, run, float("inf"))
    assert (result.served, result.refused, result.other, result.timeouts) == (1, 1, 2, 2)
    assert result.served + result.refused + result.other + result.timeouts == result.sent
    assert result.goodput_rps == 0.5
    assert result.recovery_s is None and result.statuses == {"200": 2, "500": 1, "503": 1}
    (row,) = overload_rows([result], spec())
    assert row[-1] == "> 10" and row[8] == "2 (33%)"
    assert json.dumps(asdict(result), allow_nan=False)  # strict JSON: no NaN, no Infinity


# -- real servers ------------------------------------------------------------------------------

#: A WSGI app that answers its requests in turn: served at once, refused at once (503 with
#: Retry-After, as a shedding server does), or only after the client's timeout has passed.
TRIAGE_APP = """
import itertools, time

turns = itertools.count()


def app(environ, start_response):
    if environ["PATH_INFO"] != "/healthz":
        turn = next(turns) % 3
        if turn == 1:
            start_response("503 Service Unavailable", [("Retry-After", "1")])
            return [b'{"error": "overloaded"}']
        if turn == 2:
            time.sleep(2.5)
    start_response("200 OK", [("Content-Type", "application/json")])
    return [b"{}"]
"""


@pytest.mark.server
@needs_tools
def test_overload_counts_served_refused_and_timed_out_apart(
    start_server: Callable[..., GunicornServer], tmp_path: Path
) -> None:
    (tmp_path / "triage.py").write_text(TRIAGE_APP)
    port = free_port()
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    server = start_server(
        port=port,
        command=[gunicorn, "-w", "1", "-k", "gthread", "--threads", "16", "-b",
                 f"127.0.0.1:{port}", "--chdir", str(tmp_path), "triage:app"],
    )  # fmt: skip
    run = open_loop(f"{server.url}/work", 6, 2, timeout=1)
    result = OverloadResult.of("triage", 1, run, recovery_seconds(f"{server.url}/healthz"))
    assert result.sent == 12, run.summary()
    assert (result.served, result.refused, result.timeouts, result.other) == (4, 4, 4, 0), (
        run.summary()
    )
    assert result.statuses == {"200": 4, "503": 4}
    assert result.goodput_rps == 2.0
    assert result.p50_ms is not None and result.p95_ms is not None and result.p95_ms < 1000
    assert result.recovery_s is not None and result.recovery_s < 1


@pytest.mark.server
@needs_tools
@pytest.mark.skipif(
    bool(NO_LOAD_EXTRA), reason=f"{NO_LOAD_EXTRA} not installed: pip install -e '.[load]'"
)
def test_short_overload_run_reports_both_pools(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.experiment", "--short", "--only", "overload",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["load"] is None and results["runs"] == []
    spec = results["overload"]
    assert spec["rate"] == round(spec["multiple"] * spec["capacity_rps"]) > 0, spec
    stock, kit = results["overload_runs"]
    usable = cpu_budget().usable
    assert (stock["label"], kit["label"]) == ("stock Gunicorn", "kit")
    for pool in (stock, kit):
        assert pool["workers"] == usable, pool
        assert pool["sent"] == spec["rate"] * spec["duration_s"], pool
        parts = pool["served"] + pool["refused"] + pool["timeouts"] + pool["other"]
        assert parts == pool["sent"], pool
        assert sum(pool["statuses"].values()) == pool["sent"] - pool["timeouts"], pool
        assert pool["refused"] == pool["statuses"].get("503", 0), pool
        assert pool["goodput_rps"] == pool["served"] / spec["duration_s"], pool
    # Stock Gunicorn has no answer but a late one past its capacity: some must time out.
    assert stock["refused"] == 0 and stock["timeouts"] > 0, done.stdout
    report = (tmp_path / "report.md").read_text()
    assert "| stock Gunicorn | " in report and "| kit | " in report
    assert "One process vs one per core" not in report  # that part did not run
    assert (tmp_path / "overload.png").read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "experiment.png").exists()
