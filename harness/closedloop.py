"""A small closed-loop HTTP load generator for benchmarks and chaos tests.

Closed loop: each of ``clients`` threads sends one GET, waits for the whole answer, records it and
sends the next, so the load adapts to the server instead of piling up. Light on purpose: raw
sockets and one ``Connection: close`` request per connection (what a sync worker does anyway),
no HTTP library, so the client spends as little as possible of the CPU the server needs. On a
machine with few cores the client still competes with the server: ``Report.client_cpu_s`` says how
much it took.

    from harness.closedloop import ClosedLoop
    report = ClosedLoop("http://127.0.0.1:8000", "/heavy", clients=4, duration=10).run()
    print(report.summary())

Also a command: ``python -m harness.closedloop http://127.0.0.1:8000 --path /heavy``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import psutil

from harness.cpu import usable_cores

#: Seconds a client waits after a request that got no answer before it sends the next.
FAILURE_PAUSE = 0.01
#: A path, or a function of the request's sequence number that returns one.
PathSource = str | Callable[[int], str]


class BadResponse(OSError):
    """The connection ended before a whole HTTP response arrived."""


@dataclass(frozen=True)
class Outcome:
    """One request: when it started (monotonic clock), how long it took, what came back."""

    started: float
    latency: float
    status: int  # 0 when no complete response arrived
    worker_id: str
    error: str = ""

    @property
    def failed(self) -> bool:
        """No complete answer, or a 5xx: what a user would call a failed request."""
        return self.status == 0 or self.status >= 500

    @property
    def ended(self) -> float:
        return self.started + self.latency


def fetch(host: str, port: int, path: str, timeout: float) -> tuple[int, str]:
    """One GET on a fresh connection: (status, X-Worker-Id); raises OSError if it broke."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request.encode("latin-1"))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, sep, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not sep:
        raise BadResponse(f"connection closed after {len(head)} bytes, before the headers ended")
    status_line, *header_lines = head.split(b"\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    length = headers.get(b"content-length")
    if length is not None and len(body) < int(length):
        raise BadResponse(f"body cut short: {len(body)} of {int(length)} bytes")
    return int(status_line.split()[1]), headers.get(b"x-worker-id", b"").decode("latin-1")


def percentile(values: Iterable[float], p: float) -> float:
    """The ``p``-th percentile by nearest rank (a value that occurred); NaN when empty."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class Report:
    """What a run produced; every figure comes from ``outcomes``."""

    outcomes: list[Outcome]
    elapsed: float
    client_cpu_s: float
    clients: int
    cores: int = field(default_factory=usable_cores)

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.failed]

    @property
    def rps(self) -> float:
        """Completed (non-failed) requests per second of the run."""
        return (self.sent - len(self.failures)) / self.elapsed if self.elapsed else 0.0

    def percentile(self, p: float) -> float:
        """Latency percentile in seconds over the non-failed requests (nearest rank)."""
        return percentile([o.latency for o in self.outcomes if not o.failed], p)

    def by_worker(self) -> Counter[str]:
        return Counter(o.worker_id for o in self.outcomes if not o.failed)

    def statuses(self) -> Counter[int]:
        return Counter(o.status for o in self.outcomes)

    def client_cpu_share(self) -> float:
        """Fraction of the usable cores the client itself used during the run."""
        return self.client_cpu_s / (self.elapsed * self.cores) if self.elapsed else 0.0

    def summary(self) -> str:
        errors = Counter(o.error.split(":")[0] for o in self.failures if o.error)
        why = f" {dict(errors)}" if errors else ""
        return (
            f"{self.sent} requests in {self.elapsed:.1f}s from {self.clients} clients: "
            f"{self.rps:.1f} rps, p50 {self.percentile(50) * 1000:.0f} ms, "
            f"p99 {self.percentile(99) * 1000:.0f} ms, failed {len(self.failures)}"
            f"{why}, "
            f"statuses {dict(sorted(self.statuses().items()))}, "
            f"by worker id {dict(sorted(self.by_worker().items()))}; "
            f"client CPU {self.client_cpu_s:.1f}s = {self.client_cpu_share():.0%} of "
            f"{self.cores} cores (it competes with the server on this machine)"
        )


class ClosedLoop:
    """``clients`` threads sending GETs back to back until ``duration`` or ``max_requests``."""

    def __init__(
        self,
        url: str,
        path: PathSource = "/heavy",
        *,
        clients: int = 4,
        duration: float = 10.0,
        max_requests: int | None = None,
        timeout: float = 30.0,
    ) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = path
        self.clients = clients
        self.duration = duration
        self.max_requests = max_requests
        self.timeout = timeout
        self._tickets = itertools.count()
        self._tickets_lock = threading.Lock()
        self._stop = threading.Event()
        self._outcomes: list[Outcome] = []
        self._threads: list[threading.Thread] = []
        self._started = 0.0
        self._cpu_before = 0.0

    # -- running -----------------------------------------------------------------------------

    def start(self) -> ClosedLoop:
        self._started = time.monotonic()
        self._cpu_before = _own_cpu()
        self._threads = [
            threading.Thread(target=self._client, name=f"closedloop-{i}", daemon=True)
            for i in range(self.clients)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def wait(self) -> Report:
        """Block until the run reaches its duration or request count."""
        for thread in self._threads:
            thread.join(self.duration + self.timeout + 5)
        return self._report()

    def stop(self) -> Report:
        """End the run now: requests in flight finish, no new one starts."""
        self._stop.set()
        return self.wait()

    def run(self) -> Report:
        return self.start().wait()

    def __enter__(self) -> ClosedLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- looking at it while it runs ---------------------------------------------------------

    @property
    def outcomes(self) -> list[Outcome]:
        """A snapshot of the outcomes so far."""
        return list(self._outcomes)

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> None:
        """Poll until at least ``count`` requests have completed (successful or not)."""
        deadline = time.monotonic() + timeout
        while len(self._outcomes) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self._outcomes)}/{count} requests in {timeout}s")
            time.sleep(0.01)

    # -- inside ------------------------------------------------------------------------------

    def _next_ticket(self) -> int | None:
        """The next request's sequence number, or None once the run is over."""
        if self._stop.is_set() or time.monotonic() - self._started >= self.duration:
            return None
        with self._tickets_lock:
            ticket = next(self._tickets)
        if self.max_requests is not None and ticket >= self.max_requests:
            return None
        return ticket

    def _client(self) -> None:
        while (ticket := self._next_ticket()) is not None:
            path = self.path(ticket) if callable(self.path) else self.path
            started = time.monotonic()
            try:
                status, worker_id = fetch(self.host, self.port, path, self.timeout)
                error = ""
            except (OSError, ValueError, IndexError) as exc:
                status, worker_id, error = 0, "", f"{type(exc).__name__}: {exc}"
            self._outcomes.append(
                Outcome(started, time.monotonic() - started, status, worker_id, error)
            )
            if status == 0:
                self._stop.wait(FAILURE_PAUSE)  # no server there: do not spin on the CPU it needs

    def _report(self) -> Report:
        ends = [o.ended for o in self._outcomes]
        elapsed = (max(ends) if ends else time.monotonic()) - self._started
        return Report(
            outcomes=sorted(self._outcomes, key=lambda o: o.started),
            elapsed=elapsed,
            client_cpu_s=_own_cpu() - self._cpu_before,
            clients=self.clients,
        )


def _own_cpu() -> float:
    """CPU seconds (user + system) this process has used, all its threads together."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="e.g. http://127.0.0.1:8000")
    parser.add_argument("--path", default="/heavy")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--requests", type=int, default=None, help="stop after this many")
    args = parser.parse_args(argv)
    loop = ClosedLoop(
        args.url,
        args.path,
        clients=args.clients,
        duration=args.duration,
        max_requests=args.requests,
    )
    print(loop.run().summary())


if __name__ == "__main__":
    main()
