"""What one experiment run measured: plain data, shared by the experiment and its report."""

from __future__ import annotations

import math
from dataclasses import dataclass

from harness.openloop import OpenLoopResult
from loadtest.balance import WorkerRow


@dataclass(frozen=True)
class Load:
    """The fixed load both servers get."""

    users: int
    spawn_rate: float
    duration_s: int
    heavy_n: int
    timeout_s: float
    capacity_rps: float | None = None  # one worker's, measured first; None if not measured


@dataclass(frozen=True)
class Sample:
    """Locust's running totals at one moment of the run."""

    elapsed_s: float
    requests: int
    failures: int
    refused: int = 0


@dataclass(frozen=True)
class RunResult:
    label: str
    workers: int
    requests: int
    failures: int
    rps: float
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    balance: list[WorkerRow]
    history: list[Sample]
    server_cpu: float  # CPU the server's workers used during the load, in cores (1.0 = one core)
    machine_busy: float  # how busy all the machine's CPUs were meanwhile, 0..1 (neighbours too)
    refused: int = 0  # fast 503 + Retry-After answers: neither served nor failed

    @property
    def failure_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    @property
    def not_in_time(self) -> int:
        """Requests not served in time: failed (timeouts, errors, wrong answers) or refused."""
        return self.failures + self.refused

    @property
    def not_in_time_ratio(self) -> float:
        return self.not_in_time / self.requests if self.requests else 0.0

    @property
    def ok_rps(self) -> float:
        """Requests/s that got a correct answer in time: what the users actually received."""
        served = self.requests - self.failures - self.refused
        return self.rps * served / self.requests if self.requests else 0.0

    @property
    def answered_by(self) -> list[WorkerRow]:
        return [row for row in self.balance if row.answered]


@dataclass(frozen=True)
class Overload:
    """The open-loop overload both pools get: ``multiple`` times the kit pool's measured
    capacity, new arrivals every second whatever the answers (harness/openloop.py)."""

    multiple: float
    capacity_rps: float
    rate: int
    duration_s: int
    timeout_s: int
    heavy_n: int
    recovery_limit_s: float


@dataclass(frozen=True)
class OverloadResult:
    """One pool under the overload. Every request sent is exactly one of: served (2xx within
    the client timeout), refused (503: told at once), timed out (no answer within the timeout,
    or a connection error) or other (any other status, or a 2xx a little past the timer)."""

    label: str
    workers: int
    sent: int
    served: int
    refused: int
    timeouts: int
    other: int
    goodput_rps: float
    p50_ms: float | None  # of the answers, served or refused; None: no answer at all
    p95_ms: float | None
    recovery_s: float | None  # load's end to /healthz answered in time; None: not within limit
    statuses: dict[str, int]

    @classmethod
    def of(cls, label: str, workers: int, run: OpenLoopResult, recovery: float) -> OverloadResult:
        return cls(
            label=label,
            workers=workers,
            sent=run.sent,
            served=run.ok,
            refused=run.refused,
            timeouts=run.no_answer,
            other=run.other,
            goodput_rps=run.goodput,
            p50_ms=_ms(run.latency(50)),
            p95_ms=_ms(run.latency(95)),
            recovery_s=None if math.isinf(recovery) else recovery,
            statuses={str(k): v for k, v in sorted(run.statuses.items())},
        )


def _ms(seconds: float) -> float | None:
    """Milliseconds, or None for NaN (no answers): results.json stays strict JSON."""
    return None if math.isnan(seconds) else seconds * 1000
