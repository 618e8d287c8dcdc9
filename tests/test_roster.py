"""The roster's pure parts: death classification, backoff delays, id allocation, the journal."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from workers import crashes
from workers.crashes import on_crash
from workers.master.hooks import Master
from workers.master.roster import Backoff, Roster, classify
from workers.settings import Settings


def exited(code: int) -> int:
    return code << 8


def killed(sig: int) -> int:
    return sig


@pytest.mark.parametrize(
    ("status", "flags", "cause"),
    [
        (killed(signal.SIGKILL), {}, "killed"),
        (killed(signal.SIGSEGV), {}, "fatal-signal"),
        (killed(signal.SIGABRT), {}, "fatal-signal"),
        (exited(13), {}, "exit"),
        (exited(1), {"aborted": True}, "timeout"),
        (exited(0), {"reason": "timeout"}, "timeout"),
        (exited(0), {"old_generation": True}, "reload"),
        (killed(signal.SIGTERM), {"retiring": True}, "scale-down"),
        (exited(0), {"reason": "recycle"}, "recycle"),
        (exited(0), {}, "stopped"),
    ],
)
def test_classify(status: int, flags: dict, cause: str) -> None:
    kwargs = {"aborted": False, "old_generation": False, "retiring": False, "reason": None}
    assert classify(status, **{**kwargs, **flags})[0] == cause


def test_backoff_grows_then_caps() -> None:
    backoff = Backoff(base=0.5, cap=3.0, reset_after=30)
    assert [backoff.delay(k) for k in range(1, 7)] == [0.0, 0.5, 1.0, 2.0, 3.0, 3.0]


def test_backoff_from_settings() -> None:
    env = {"HEAVYAPP_BACKOFF_BASE_MS": "200", "HEAVYAPP_BACKOFF_MAX_MS": "1000"}
    settings = Settings.from_env(env)
    assert Backoff.from_settings(settings) == Backoff(base=0.2, cap=1.0, reset_after=30.0)


def test_ids_are_lowest_free_and_replacements_inherit() -> None:
    roster = Roster(Backoff(base=1, cap=8, reset_after=100))
    live = {}
    for pid in (101, 102, 103):
        live[pid] = roster.admit(live)
    assert [m.id for m in live.values()] == [0, 1, 2]
    gone = live.pop(102)
    death = roster.release(gone, 102, signal.SIGKILL, aborted=False, reason=None)
    assert death.cause == "killed" and not death.planned
    newcomer = roster.admit(live)
    assert (newcomer.id, newcomer.replaces, newcomer.replaced_because) == (1, 102, "killed")
    assert newcomer.restart_delay == 0.0  # the first crash restarts at once
    assert roster.slots[1].restarts == 1 and roster.slots[1].crashes == 1


def test_a_crash_loop_waits_longer_each_time() -> None:
    roster = Roster(Backoff(base=1, cap=8, reset_after=100))
    member, delays = roster.admit({}), []
    for pid in range(200, 205):
        roster.release(member, pid, signal.SIGSEGV, aborted=False, reason=None)
        member = roster.admit({})
        delays.append(member.restart_delay)
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0]


def test_scale_down_retires_the_highest_ids_and_reload_reuses_ids() -> None:
    roster = Roster(Backoff())
    live = {pid: None for pid in (1, 2, 3)}
    for pid in live:
        live[pid] = roster.admit({p: m for p, m in live.items() if m})
    leaving = roster.retire(live.values(), keep=2)
    assert [m.id for m in leaving] == [2]
    roster.generation += 1
    fresh = roster.admit(live)
    assert (fresh.id, fresh.replaces, fresh.replaced_because) == (0, 1, "reload")


def test_journal_and_hooks(tmp_path: Path) -> None:
    seen: list[dict] = []
    hooks = crashes.CrashHooks()

    @hooks.add
    def failing(_crash: dict) -> None:
        raise RuntimeError("a broken hook must not stop the others")

    hooks.add(seen.append)
    hooks.add(seen.append)  # once only
    journal = tmp_path / "crashes.jsonl"
    crashes.record({"cause": "killed", "pid": 7, "worker_id": 0}, journal, hooks)
    hooks.remove(failing)
    crashes.record({"cause": "exit", "pid": 8, "worker_id": 1}, journal, hooks)
    lines = journal.read_text().splitlines()
    assert [json.loads(line)["pid"] for line in lines] == [7, 8]
    assert [c["cause"] for c in seen] == ["killed", "exit"] and "time" in seen[0]
    assert [c["pid"] for c in crashes.read_journal(journal, last=1)] == [8]


def test_on_crash_registers_with_the_process_hooks_the_master_holds(tmp_path: Path) -> None:
    """``from workers.crashes import on_crash`` (docs/operating.md) fills the hooks the master
    is made with, and a record with no hooks named reaches them too (a worker's view error)."""
    seen: list[dict] = []
    hook = on_crash(seen.append)
    try:
        assert Master(Settings.from_env({})).crash_hooks is crashes.hooks
        crashes.record({"cause": "exception", "pid": 9}, tmp_path / "crashes.jsonl")
        crashes.record(
            {"cause": "exit", "pid": 10}, tmp_path / "crashes.jsonl", crashes.CrashHooks()
        )
    finally:
        crashes.remove_crash_hook(hook)
    assert [c["pid"] for c in seen] == [9]


def test_an_id_added_back_after_a_scale_down_replaces_nobody() -> None:
    roster = Roster(Backoff())
    live = {}
    for pid in (1, 2, 3):
        live[pid] = roster.admit(live)
    (leaving,) = roster.retire(live.values(), keep=2)
    assert leaving is live[3]
    gone = live.pop(3)
    assert roster.release(gone, 3, exited(0), aborted=False, reason=None).cause == "scale-down"
    again = roster.admit(live)
    assert (again.id, again.replaces, again.replaced_because) == (2, None, None)
    assert roster.slots[2].restarts == 0


def test_a_worker_killed_while_retiring_is_not_replaced_later() -> None:
    roster = Roster(Backoff(base=1, cap=8, reset_after=100))
    live = {}
    for pid in (1, 2):
        live[pid] = roster.admit(live)
    roster.retire(live.values(), keep=1)
    death = roster.release(live.pop(2), 2, killed(signal.SIGKILL), aborted=False, reason=None)
    assert death.cause == "killed"
    again = roster.admit(live)
    assert (again.id, again.replaces, again.restart_delay) == (1, None, 0.0)


def test_a_crash_during_a_reload_overlap_is_a_crash_not_a_reload() -> None:
    roster = Roster(Backoff(base=1, cap=8, reset_after=100))
    old = {10: roster.admit({})}
    roster.generation += 1
    new = roster.admit(old)
    assert (new.replaces, new.replaced_because) == (10, "reload")
    roster.release(new, 20, killed(signal.SIGKILL), aborted=False, reason=None)
    again = roster.admit(old)  # the old generation's id 0 is still draining
    assert (again.replaces, again.replaced_because) == (20, "killed")
