"""The master's roster: stable worker ids, why each worker left, restart counts, crash backoff.

Gunicorn numbers workers by ``age``, which only grows, and forgets a worker once it is reaped.
The roster gives each worker a dense id ``0..W-1`` (a replacement takes the id of the worker it
replaces; a new worker the lowest free id) and keeps, per id, what an operator asks after an
incident: how often it restarted, how it last died, whether it is crash-looping.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from workers.settings import Settings
from workers.shared.board import Board
from workers.shared.exits import ExitCause

FATAL_SIGNALS = {signal.SIGSEGV, signal.SIGFPE, signal.SIGBUS, signal.SIGILL, signal.SIGABRT}
GRACEFUL_SIGNALS = {signal.SIGTERM, signal.SIGQUIT, signal.SIGINT}


@dataclass(frozen=True)
class Backoff:
    """Restart delay for an id that keeps crashing, like pm2's ``exp_backoff_restart_delay``.

    The first crash restarts at once; each further crash of a process that lived less than
    ``reset_after`` seconds doubles the delay from ``base``, up to ``cap``.
    """

    base: float = 0.5
    cap: float = 15.0
    reset_after: float = 30.0

    @classmethod
    def from_settings(cls, s: Settings) -> Backoff:
        return cls(s.backoff_base_ms / 1000, s.backoff_max_ms / 1000, s.backoff_reset_ms / 1000)

    def delay(self, streak: int) -> float:
        return 0.0 if streak <= 1 else min(self.cap, self.base * 2 ** (streak - 2))


@dataclass
class Member:
    """What the master knows of one worker process; travels into the child through the fork."""

    id: int
    generation: int
    started: float
    replaces: int | None
    replaced_because: ExitCause | None
    restart_delay: float
    board: Board = field(repr=False)
    retiring: bool = False


@dataclass
class Slot:
    """The history of one worker id across the processes that held it."""

    pid: int | None = None  # its latest process that died awaiting a replacement
    restarts: int = 0
    crashes: int = 0
    streak: int = 0
    exit_cause: ExitCause | None = None  # why ``pid`` died, until a replacement is admitted
    last_crash: ExitCause | None = None
    last_crash_time: float | None = None


@dataclass(frozen=True)
class Death:
    pid: int
    worker_id: int
    cause: ExitCause
    exit_code: int | None
    signal: str | None
    uptime: float
    requests: int
    request: str  # the request in flight when it died, if any

    @property
    def planned(self) -> bool:
        return self.cause.planned

    @property
    def status(self) -> str:
        return f"signal {self.signal}" if self.signal else f"exit code {self.exit_code}"


def classify(
    status: int | None, *, aborted: bool, old_generation: bool, retiring: bool, reason: str | None
) -> tuple[ExitCause, int | None, str | None]:
    """(cause, exit code, signal name) of a reaped worker; ``reason`` is its own last word."""
    code = os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None
    sig = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
    name = signal.Signals(sig).name if sig else None
    if aborted or reason == ExitCause.TIMEOUT:
        return ExitCause.TIMEOUT, code, name
    if sig in FATAL_SIGNALS:
        return ExitCause.FATAL_SIGNAL, code, name
    if sig == signal.SIGKILL:
        return ExitCause.KILLED, code, name
    if code == 0 or sig in GRACEFUL_SIGNALS:
        if old_generation:
            return ExitCause.RELOAD, code, name
        if retiring:
            return ExitCause.SCALE_DOWN, code, name
        return (ExitCause.RECYCLE if reason == ExitCause.RECYCLE else ExitCause.STOPPED), code, name
    return ExitCause.EXIT, code, name


class Roster:
    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff
        self.generation = 0
        self.slots: dict[int, Slot] = {}

    def admit(self, live: Mapping[int, Member]) -> Member:
        """A worker is about to fork: give it the lowest id free in the current generation.

        ``live`` maps the pids of the running workers to their members. A worker replaces the
        id's last process if that one died and awaits a replacement (after a crash it first
        waits out the id's backoff delay), or else the id's holder in an older generation that
        is still draining after a reload (a brief overlap).
        """
        taken = {m.id for m in live.values() if m.generation == self.generation and not m.retiring}
        wid = next(i for i in range(len(taken) + 1) if i not in taken)
        slot = self.slots.setdefault(wid, Slot())
        older = [p for p, m in live.items() if m.id == wid and m.generation < self.generation]
        if slot.exit_cause is not None:
            replaces, because = slot.pid, slot.exit_cause
        elif older:
            replaces, because = older[0], ExitCause.RELOAD
        else:
            replaces, because = None, None
        crashed = because is not None and not because.planned
        if replaces:
            slot.restarts += 1
        slot.exit_cause = None
        return Member(
            id=wid,
            generation=self.generation,
            started=time.time(),
            replaces=replaces,
            replaced_because=because,
            restart_delay=self.backoff.delay(slot.streak) if crashed else 0.0,
            board=Board(),
        )

    def retire(self, live: Iterable[Member], keep: int) -> list[Member]:
        """Mark all but the ``keep`` lowest ids to go first: ids stay dense after a scale-down."""
        current = sorted(
            (m for m in live if m.generation == self.generation and not m.retiring),
            key=lambda m: m.id,
        )
        leaving = current[keep:]
        for member in leaving:
            member.retiring = True
        return leaving

    def release(
        self, member: Member, pid: int, status: int | None, aborted: bool, reason: str | None
    ) -> Death:
        """A worker was reaped: say why it left and update its id's history."""
        now = time.time()
        snapshot = member.board.read()
        cause, code, sig = classify(
            status,
            aborted=aborted,
            old_generation=member.generation < self.generation,
            retiring=member.retiring,
            reason=reason,
        )
        death = Death(
            pid,
            member.id,
            cause,
            code,
            sig,
            now - member.started,
            snapshot.requests,
            snapshot.request,
        )
        slot = self.slots.setdefault(member.id, Slot())
        if member.generation == self.generation and not member.retiring:
            slot.pid, slot.exit_cause = pid, cause  # its replacement comes next
        if death.planned:
            slot.streak = 0
        else:
            slot.crashes += 1
            slot.last_crash, slot.last_crash_time = cause, now
            stable = death.uptime - member.restart_delay >= self.backoff.reset_after
            slot.streak = 1 if stable else slot.streak + 1
        member.board.close()
        return death

    def state(self) -> dict[str, Any]:
        """The per-id history, as heavyctl reads it from the run directory."""
        return {
            "generation": self.generation,
            "slots": {str(i): asdict(s) for i, s in sorted(self.slots.items())},
        }
