"""Chaos under load: kills, reloads, scaling, a stop, a hung request and fuzzed input, each against
a real two-worker server under a steady closed-loop load, each printing the figures it reached.

The short form (CI, about 40 s) does each thing a few times; ``HEAVYAPP_CHAOS_FULL=1`` runs the
full form (a 20 s kill storm, 3 reloads, 3 scale cycles, 500 fuzz examples).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.closedloop import ClosedLoop, Report
from harness.server import GunicornServer
from helpers import http_get, poll_until
from workers.crashes import read_journal

pytestmark = [pytest.mark.chaos, pytest.mark.server]
Start = Callable[..., GunicornServer]

FULL = os.environ.get("HEAVYAPP_CHAOS_FULL") == "1"
IDS = {0, 1}
#: About 10 ms of work per request: many requests, each one long enough to be caught mid-way.
LOAD_PATH = "/heavy?n=300000"


def scale(short: int, full: int) -> int:
    return full if FULL else short


def figures(scenario: str, report: Report, **more: object) -> None:
    """One line of what the scenario reached; pytest shows it with -s, -rP or on failure."""
    extra = "".join(f", {name.replace('_', ' ')} {value}" for name, value in more.items())
    print(f"\n[chaos] {scenario}: {report.summary()}{extra}")


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Poll ``check`` until true (finely: the figures report it); the seconds it took."""
    started = time.monotonic()
    poll_until(check, timeout, what, every=0.01)
    return time.monotonic() - started


def pool_is(server: GunicornServer, ids: set[int], without: set[int] = frozenset()) -> bool:
    """The live workers carry exactly ``ids``, none of them one of the pids ``without``."""
    found = server.worker_ids()
    return sorted(found.values()) == sorted(ids) and not set(found) & without


def test_kill_storm_loses_at_most_the_requests_in_flight(start_server: Start) -> None:
    kills, interval = scale(3, 10), 2.0
    # A worker killed every 2 s would otherwise look like a crash loop and wait out a backoff.
    server = start_server(workers=2, env={"HEAVYAPP_BACKOFF_RESET_MS": "1000"})
    victims, recoveries, ids_seen = [], [], set()
    rng = random.Random()
    with ClosedLoop(server.url, LOAD_PATH, clients=4, duration=kills * interval + 60) as load:
        load.wait_for_requests(20)
        next_kill = time.monotonic()
        for _ in range(kills):
            while time.monotonic() < next_kill:
                time.sleep(0.02)
            next_kill = time.monotonic() + interval
            victim = rng.choice(list(server.wait_for_ids(IDS)))
            os.kill(victim, signal.SIGKILL)
            victims.append(victim)

            def back(victim: int = victim) -> bool:
                ids_seen.update(server.worker_ids().values())
                return pool_is(server, IDS, without={victim})

            recoveries.append(wait_until(f"pool {IDS} again after killing {victim}", back, 1.0))
        load.wait_for_requests(len(load.outcomes) + 10)
        report = load.stop()
    journal = server.run_dir / "crashes.jsonl"
    wait_until(f"{kills} crash entries", lambda: len(read_journal(journal)) >= kills, 5.0)
    entries = read_journal(journal)
    figures(
        "kill storm",
        report,
        kills=kills,
        recovery_ms=[round(r * 1000) for r in recoveries],
        journal_entries=len(entries),
    )
    assert len(report.failures) <= kills, [o.error for o in report.failures]
    assert ids_seen <= IDS
    assert [e["cause"] for e in entries] == ["killed"] * kills
    assert sorted(e["pid"] for e in entries) == sorted(victims)
    assert "crash-looping" not in server.log_text()


def test_graceful_reloads_and_scaling_lose_nothing(start_server: Start) -> None:
    server = start_server(workers=2)
    reloads, cycles = scale(1, 3), scale(1, 3)
    timings: dict[str, list[int]] = {"reload_ms": [], "scale_up_ms": [], "scale_down_ms": []}
    with ClosedLoop(server.url, LOAD_PATH, clients=4, duration=120) as load:
        load.wait_for_requests(20)
        for _ in range(reloads):
            old = set(server.wait_for_ids(IDS))
            os.kill(server.master_pid, signal.SIGHUP)
            took = wait_until("a new generation", lambda old=old: pool_is(server, IDS, old), 15)
            timings["reload_ms"].append(round(took * 1000))
            load.wait_for_requests(len(load.outcomes) + 10)
        for _ in range(cycles):
            os.kill(server.master_pid, signal.SIGTTIN)
            took = wait_until("3 workers", lambda: pool_is(server, {0, 1, 2}), 10)
            timings["scale_up_ms"].append(round(took * 1000))
            load.wait_for_requests(len(load.outcomes) + 10)
            os.kill(server.master_pid, signal.SIGTTOU)
            took = wait_until("2 workers", lambda: pool_is(server, IDS), 10)
            timings["scale_down_ms"].append(round(took * 1000))
            load.wait_for_requests(len(load.outcomes) + 10)
        report = load.stop()
    figures("reloads and scaling", report, reloads=reloads, scale_cycles=cycles, **timings)
    assert report.failures == [], [o.error for o in report.failures]
    assert "died" not in server.log_text()


def test_sigterm_under_load_finishes_the_requests_in_flight(start_server: Start) -> None:
    graceful = 10
    server = start_server(workers=2, env={"GRACEFUL_TIMEOUT": str(graceful)})
    # As many clients as workers: every request is in a worker's hands, none waits in the queue.
    with ClosedLoop(server.url, "/heavy?n=5000000", clients=2, duration=120) as load:
        load.wait_for_requests(2)
        wait_until("both workers busy", lambda: _busy(server) == 2, 10)
        stopped_at = time.monotonic()
        os.kill(server.master_pid, signal.SIGTERM)
        assert server.proc is not None
        code = server.proc.wait(graceful + 5)
        took = time.monotonic() - stopped_at
        report = load.stop()
    in_flight = [o for o in report.outcomes if o.started < stopped_at < o.ended]
    after = [o for o in report.outcomes if o.started >= stopped_at]
    figures(
        "SIGTERM under load",
        report,
        in_flight=len(in_flight),
        exit_code=code,
        exit_after_s=round(took, 2),
        refused_after_stop=sum(o.failed for o in after),
    )
    assert code == 0 and took < graceful
    assert len(in_flight) == 2
    assert not [o for o in report.outcomes if o.started < stopped_at and o.failed]


def _busy(server: GunicornServer) -> int:
    """How many workers are on a CPU (state R) rather than waiting in accept (state S)."""
    busy = 0
    for pid in server.worker_pids():
        try:
            with open(f"/proc/{pid}/stat") as f:
                busy += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except OSError:
            continue
    return busy


#: The worker's line (the logged stack also quotes the format string of that log call).
TIMED_OUT = r"\] worker \d+ pid=\d+ timed out after"


def test_hung_request_is_killed_at_the_timeout_and_nobody_else_notices(start_server: Start) -> None:
    timeout = 3
    server = start_server(workers=2, env={"HEAVYAPP_CHAOS": "1", "TIMEOUT": str(timeout)})
    with ThreadPoolExecutor(1) as pool, ClosedLoop(server.url, LOAD_PATH, clients=2) as load:
        load.wait_for_requests(10)
        sent = time.monotonic()
        hang = pool.submit(_post, f"{server.url}/chaos/hang?seconds=60")
        line = server.wait_for_log(TIMED_OUT, timeout=timeout + 10)[0]
        killed_after = time.monotonic() - sent
        hang_answer = hang.result(timeout=10)
        wait_until("the pool whole again", lambda: pool_is(server, IDS), 5)
        load.wait_for_requests(len(load.outcomes) + 10)
        report = load.stop()
    figures(
        "hung request",
        report,
        hung_request_killed_after_s=round(killed_after, 1),
        hung_request_got=hang_answer,
    )
    assert timeout <= killed_after < timeout + 5
    assert "POST /chaos/hang" in line
    timeouts = server.wait_for_log(TIMED_OUT)
    assert len(timeouts) == 1, timeouts
    assert "in hang() at" in line  # the stack names where it hung
    assert report.failures == [], [o.error for o in report.failures]
    meanwhile = [o for o in report.outcomes if sent < o.started and o.ended < sent + killed_after]
    assert len(meanwhile) >= 10, "the other worker kept serving while one hung"
    slowest = max(o.latency for o in report.outcomes)
    assert slowest < timeout, f"a request took {slowest:.1f}s: it waited on the hung worker"


def _post(url: str) -> str:
    """What a client of the hung request sees: a status, or how the connection ended."""
    try:
        return str(requests.post(url, timeout=30).status_code)
    except requests.RequestException as exc:
        return type(exc).__name__


#: Names and values a query string may carry, the expected ones more often than not.
QUERY_NAME = st.sampled_from(["n", "N", "n[]", "", "m"]) | st.text(max_size=6)
QUERY_VALUE = st.integers(-(10**25), 10**25).map(str) | st.text(max_size=30)
PATH = st.one_of(
    st.just("/heavy"),  # a third of the examples: the query string is what matters most
    st.sampled_from(["/healthz", "/", "/heavy/", "//heavy", "/HEAVY", "/chaos/exit"]),
    st.text(max_size=40).map(lambda s: "/" + s),
)
#: Kept raw rather than percent-encoded, so odd but legal requests reach the app too.
RAW = "/?&=%;+,:@!$'()*[]"


def test_fuzzed_paths_and_query_strings_never_cost_a_5xx_or_a_worker(start_server: Start) -> None:
    # A low bound on n, so valid sizes cost milliseconds and the examples stay many.
    env = {"HEAVYAPP_MAX_N": "100000", "HEAVYAPP_DEFAULT_N": "1000"}
    server = start_server(workers=2, env=env)
    pids = server.worker_pids()
    statuses: list[int] = []

    @settings(
        max_examples=scale(60, 500),
        deadline=None,
        derandomize=not FULL,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(path=PATH, query=st.lists(st.tuples(QUERY_NAME, QUERY_VALUE), max_size=4))
    def one(path: str, query: list[tuple[str, str]]) -> None:
        target = quote(path, safe=RAW)
        if query:
            target += "?" + "&".join(f"{quote(k, safe=RAW)}={quote(v, safe=RAW)}" for k, v in query)
        status, body, headers = http_get(server.url + target, timeout=10)  # the target as is
        statuses.append(status)
        assert 200 <= status < 500, target
        if status >= 400:  # a refusal says why, in JSON, and names the worker
            assert isinstance(body, dict) and body.get("error"), (target, body)
            assert headers["X-Worker-Pid"] in {str(p) for p in pids}, (target, headers)

    one()
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    print(f"\n[chaos] fuzzing: {len(statuses)} requests, statuses {counts}")
    assert server.worker_pids() == pids
    assert "died" not in server.log_text()
