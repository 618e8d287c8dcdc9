"""What one experiment run measured: plain data, shared by the experiment and its report."""

from __future__ import annotations

from dataclasses import dataclass

from loadtest.balance import WorkerRow


@dataclass(frozen=True)
class Load:
    """The fixed load both servers get."""

    users: int
    spawn_rate: float
    duration_s: int
    heavy_n: int
    timeout_s: float


@dataclass(frozen=True)
class Sample:
    """Locust's running totals at one moment of the run."""

    elapsed_s: float
    requests: int
    failures: int


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

    @property
    def failure_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    @property
    def ok_rps(self) -> float:
        """Requests/s that got a correct answer in time: what the users actually received."""
        return self.rps * (1 - self.failure_ratio)

    @property
    def answered_by(self) -> list[WorkerRow]:
        return [row for row in self.balance if row.answered]
