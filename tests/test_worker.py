"""The kit's worker against a real server: each crash kind, ids, titles, memory cap, backoff."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import requests

from harness.server import GunicornServer
from helpers import poll_until
from workers.crashes import read_journal
from workers.shared import titles

pytestmark = pytest.mark.server
Start = Callable[..., GunicornServer]
CHAOS = {"HEAVYAPP_CHAOS": "1"}


def call(url: str, method: str = "GET", timeout: float = 30) -> int:
    """The status of one request; 0 when the connection broke (the worker died under it)."""
    try:
        return requests.request(method, url, timeout=timeout).status_code
    except requests.RequestException:
        return 0


@dataclass
class Traffic:
    statuses: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


@contextmanager
def background_traffic(server: GunicornServer, max_seconds: float = 60) -> Iterator[Traffic]:
    """A client sending /healthz back to back (bounded in time and count) while a test runs."""
    traffic = Traffic()

    def loop() -> None:
        deadline = time.monotonic() + max_seconds
        while (
            not traffic.stop.is_set()
            and time.monotonic() < deadline
            and len(traffic.statuses) < 5000
        ):
            traffic.statuses.append(call(f"{server.url}/healthz", timeout=10))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield traffic
    finally:
        traffic.stop.set()
        thread.join(15)


def journal(server: GunicornServer) -> list[dict]:
    return read_journal(server.run_dir / "crashes.jsonl")


def crash_and_recover(
    server: GunicornServer, kind: str, died: str, expect_status: int = 0
) -> tuple[int, int, dict]:
    """Crash one worker through /chaos/<kind> under other traffic: its death logged as ``died``
    (a regex: the exit, then the cause), replaced with the same id, one journal entry naming
    the request. (Victim pid, its id, the entry.)"""
    before = server.wait_for_ids({0, 1})
    with background_traffic(server) as traffic:
        assert call(f"{server.url}/chaos/{kind}", "POST") == expect_status
        victim = server.wait_for_log(r"worker pid=\d+ died")[0]
        pid = int(re.search(r"worker pid=(\d+) died", victim).group(1))
        after = server.wait_for_ids({0, 1})
    assert pid in before and pid not in after
    (newcomer,) = set(after) - set(before)
    wid = before[pid]
    assert after[newcomer] == wid, "the replacement takes the id of the worker it replaces"
    assert traffic.statuses and set(traffic.statuses) == {200}, "the other worker kept serving"
    server.wait_for_log(rf"worker pid={pid} died \({died}; worker id {wid}")
    server.wait_for_log(rf"worker pid={newcomer} started: id {wid}, .* replaces pid={pid} \(")
    (entry,) = journal(server)
    assert (entry["pid"], entry["worker_id"]) == (pid, wid)
    assert entry["request"] == f"POST /chaos/{kind}"
    return pid, wid, entry


def test_exit_is_logged_journaled_and_replaced_with_the_same_id(start_server: Start) -> None:
    server = start_server(workers=2, env=CHAOS)
    pid, _, entry = crash_and_recover(server, "exit", r"exit code 13\): exit")
    server.wait_for_log(rf"replaces pid={pid} \(exit\)")
    assert entry["cause"] == "exit" and entry["exit_code"] == 13


def test_segfault_leaves_the_python_traceback(start_server: Start) -> None:
    server = start_server(workers=2, env=CHAOS)
    _, _, entry = crash_and_recover(server, "segfault", r"signal SIGSEGV\): fatal-signal")
    server.wait_for_log(r'File ".*heavyapp/chaos\.py", line \d+ in segfault')
    assert entry["signal"] == "SIGSEGV" and "in segfault" in entry["traceback"]


def test_sigkill_gets_a_hint(server: GunicornServer) -> None:
    before = server.wait_for_ids({0, 1})
    victim, wid = next(iter(before.items()))
    with background_traffic(server) as traffic:
        poll_until(lambda: len(traffic.statuses) >= 5, 10, "traffic flowing")
        os.kill(victim, signal.SIGKILL)
        server.wait_for_workers(2, exclude={victim})  # not instant: it may still be listed
        after = server.wait_for_ids({0, 1})
        served = len(traffic.statuses)
        poll_until(lambda: len(traffic.statuses) >= served + 5, 10, "traffic after the kill")
    (newcomer,) = set(after) - set(before)
    assert after[newcomer] == wid, "the replacement takes the killed worker's id"
    server.wait_for_log(
        rf"worker pid={victim} died \(signal SIGKILL\): killed; worker id {wid}.*OOM"
    )
    server.wait_for_log(rf"Starting another worker for id {wid} \(replaces pid={victim}: killed\)")
    assert [e["cause"] for e in journal(server)] == ["killed"]
    # Only the request in flight on the killed worker may fail.
    failed = [s for s in traffic.statuses if s != 200]
    assert len(failed) <= 1, f"{len(failed)} of {len(traffic.statuses)} failed: {set(failed)}"


def test_exception_answers_500_json_and_the_worker_lives(start_server: Start) -> None:
    server = start_server(workers=2, env=CHAOS)
    before = server.wait_for_ids({0, 1})
    answer = requests.post(f"{server.url}/chaos/exception", timeout=30)
    assert answer.status_code == 500 and answer.json()["error"]
    pid = int(answer.headers["X-Worker-Pid"])
    lines = server.wait_for_log(rf"\[{pid}\] \[worker \d\] \[ERROR\] unhandled exception in POST")
    assert len(lines) == 1
    assert server.log_text().count("RuntimeError: chaos: an exception was requested") == 1
    (entry,) = journal(server)
    assert entry["cause"] == "exception" and entry["pid"] == pid
    assert entry["worker_id"] == before[pid] and "RuntimeError" in entry["traceback"]
    assert server.worker_ids() == before


def test_hung_request_is_killed_at_the_timeout_with_its_stack(start_server: Start) -> None:
    server = start_server(workers=2, env={**CHAOS, "TIMEOUT": "2"})
    pid, wid, entry = crash_and_recover(server, "hang", r"exit code 1\): timeout", 500)
    server.wait_for_log(
        rf"\[{pid}\] \[worker {wid}\] \[CRITICAL\] worker {wid} pid={pid} timed out after "
        r"[\d.]+s serving POST /chaos/hang, in hang\(\) at .*chaos\.py:\d+; stack:"
    )
    assert entry["cause"] == "timeout" and "time.sleep(seconds)" in entry["traceback"]


def test_memory_cap_recycles_without_a_failed_request(start_server: Start) -> None:
    server = start_server(workers=2, env={**CHAOS, "HEAVYAPP_MAX_RSS_MB": "150"})
    before = server.wait_for_ids({0, 1})
    with background_traffic(server) as traffic:
        assert call(f"{server.url}/chaos/leak?mb=200", "POST") == 200
        line = server.wait_for_log(r"recycling: rss \d+ MB above HEAVYAPP_MAX_RSS_MB=150")[0]
        pid = int(re.search(r"pid=(\d+) recycling", line).group(1))
        server.wait_for_log(rf"worker pid={pid} exited \(exit code 0\): recycle \(rss")
        after = server.wait_for_ids({0, 1})
    assert set(traffic.statuses) == {200}
    assert pid not in after and sorted(after.values()) == sorted(before.values())
    assert journal(server) == [], "a recycle is not a crash"


def test_ids_stay_dense_across_kills_ttin_ttou_and_reload(server: GunicornServer) -> None:
    ids = server.wait_for_ids({0, 1})
    os.kill(server.master_pid, signal.SIGTTIN)
    ids = server.wait_for_ids({0, 1, 2})
    os.kill(next(pid for pid, i in ids.items() if i == 1), signal.SIGKILL)
    ids = server.wait_for_ids({0, 1, 2})
    os.kill(server.master_pid, signal.SIGTTOU)
    ids = server.wait_for_ids({0, 1})
    server.wait_for_log(r"exited \(exit code 0\): scale-down; worker id 2")
    os.kill(server.master_pid, signal.SIGTTIN)
    ids = server.wait_for_ids({0, 1, 2})
    os.kill(server.master_pid, signal.SIGHUP)
    old = set(ids)
    poll_until(lambda: not set(server.worker_ids()) & old, 15, "the old generation gone")
    # A HUP re-reads the config, so the pool returns to its configured size (2) with ids 0..1.
    fresh = server.wait_for_ids({0, 1})
    assert not set(fresh) & old
    assert len(server.wait_for_log(r"exited \(exit code 0\): reload", count=3)) == 3


def served_per_title(server: GunicornServer) -> int:
    """The requests the workers' titles say they served, checking each title's shape."""
    served = 0
    for pid, wid in server.worker_ids().items():
        title = titles.read(pid)
        match = re.fullmatch(rf"heavyapp: worker {wid} \[pid {pid}\] (\d+) requests", title)
        assert match, title
        served += int(match.group(1))
    return served


def test_a_repeated_sigterm_still_ends_in_a_clean_exit(server: GunicornServer) -> None:
    """Gunicorn's master repeats SIGTERM every second to a retired worker it has not reaped yet
    (a scale-down on a loaded machine); the worker must still exit 0, not die by the signal."""
    victim = next(iter(server.wait_for_ids({0, 1})))  # booted: its handlers are in place
    deadline = time.monotonic() + 10
    with contextlib.suppress(ProcessLookupError):
        while time.monotonic() < deadline:  # until it is gone, every 2 ms (bounded)
            os.kill(victim, signal.SIGTERM)
            time.sleep(0.002)
    server.wait_for_log(rf"worker pid={victim} exited \(exit code 0\): stopped")
    server.wait_for_workers(2, exclude={victim})


def test_titles_name_id_pid_and_requests(server: GunicornServer) -> None:
    master = titles.read(server.master_pid)
    assert master == f"heavyapp: master [2 workers] 127.0.0.1:{server.port}"
    before = served_per_title(server)
    for _ in range(6):
        assert call(f"{server.url}/healthz") == 200
    # A title is updated just after the answer is sent.
    poll_until(lambda: served_per_title(server) == before + 6, 5, "6 more requests in the titles")


def test_crash_loop_backs_off_while_the_others_serve(start_server: Start) -> None:
    env = {"HEAVYAPP_BACKOFF_BASE_MS": "400", "HEAVYAPP_BACKOFF_MAX_MS": "1600"}
    server = start_server(workers=2, env=env)
    waits = []
    with background_traffic(server) as traffic:
        for _ in range(4):
            victim = next(pid for pid, i in server.wait_for_ids({0, 1}).items() if i == 0)
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)

            def id_0_serves(victim: int = victim) -> bool:
                """Id 0 is served by a new process again: its title says so."""
                shown = server.worker_titles()
                return victim not in shown and any(
                    re.match(r"heavyapp: worker 0 .*requests$", t) for t in shown.values()
                )

            poll_until(id_0_serves, 10, f"id 0 serving again after killing {victim}", every=0.01)
            waits.append(time.monotonic() - killed_at)
    logged = [
        float(x)
        for x in re.findall(
            r"worker 0 pid=\d+ is crash-looping: waiting ([\d.]+)s", server.log_text()
        )
    ]
    assert logged == [0.4, 0.8, 1.6]
    # Kills 2-4 each waited out at least the delay logged for them (upper bounds would only
    # measure how loaded the machine is).
    for wait, delay in zip(waits[1:], logged, strict=True):
        assert wait >= delay, f"waits {waits} vs logged delays {logged}"
    # Only a request in flight on a killed worker may fail: at most one per kill.
    assert set(traffic.statuses) <= {200, 0} and traffic.statuses.count(0) <= 4
    assert traffic.statuses.count(200) > 20
