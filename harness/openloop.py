"""Open-loop load: requests arrive at a set rate whether or not the earlier ones were answered,
as a public service's users do. A closed loop (harness/closedloop.py) waits for each answer, so
it can never offer more than the server lets it: overload needs an open loop.

Built on Debian's ``hey`` (``apt-get install hey``): ``-c C -q 1`` is C workers each sending one
request a second, each with a client timeout (``-t``, whole seconds: an answer later than that is
no answer to a user). hey's workers tick together, so one process sends its C requests in one
burst a second and the server idles in between: the rate is split over ``processes`` hey
processes started 1/K s apart. Every request comes on a new connection
(``-disable-keepalive``), as independent users arrive: with keep-alive, each hey worker's
connection stays with one server process: Granian (which keeps connections open) served 63 of
120 requests at 40 rps, near a 2-worker pool's capacity, and 104 without. Two facts about hey
0.1.4 (Debian's) shape the rest:

- ``-o csv`` has one row per HTTP response (response time, status, offset from hey's start) and
  none for a request that got no response: a client timeout (the summary output would count it
  as "context deadline exceeded (Client.Timeout exceeded while awaiting headers)") or a refused
  connection. So the count sent must be known, and no answer = sent - rows.
- ``-z`` does not give that count (a worker already waiting for its next tick when the duration
  ends sends once more); ``-n C*D`` does: each worker sends exactly D requests, one per tick.

Also ``measure_capacity`` (a closed-loop saturation run with ``wrk``) and ``recovery_seconds``
(how long after the load until ``/healthz`` answers in time again). Targets are 127.0.0.1 only,
every run is bounded, and only the processes started here are ever killed.

    .venv/bin/python -m harness.openloop http://127.0.0.1:8000/heavy --rate 200 --duration 10
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import re
import resource
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import IO
from urllib.parse import SplitResult, urlsplit

from harness.closedloop import fetch, percentile

LOOPBACK = "127.0.0.1"
#: Bounds that keep a typo from turning into a machine-wide flood or an endless run.
MAX_RATE = 5000
MAX_SECONDS = 600
#: Seconds a hey process may take beyond its ticks and its last timeout before it is killed.
SLACK = 10.0


def loopback(url: str) -> SplitResult:
    """``url`` split, if it targets 127.0.0.1: this load must never leave the machine."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname != LOOPBACK:
        raise ValueError(f"{url}: only http://{LOOPBACK}/... targets are allowed")
    return parts


def tool(name: str) -> str:
    """The path of a load tool (a Debian package of the same name)."""
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} not installed: apt-get install {name}")
    return path


def split(total: int, parts: int) -> list[int]:
    """``total`` as near-equal positive shares, ``parts`` of them or fewer if ``total`` is less."""
    parts = max(1, min(parts, total))
    quotient, remainder = divmod(total, parts)
    return [quotient + (i < remainder) for i in range(parts)]


@dataclass(frozen=True)
class Answer:
    """One HTTP response: which hey process sent the request, when (seconds from the start of
    the first hey process), how long the answer took and its status."""

    process: int
    sent_at: float
    latency: float
    status: int


def parse_csv(text: str, process: int, started: float) -> list[Answer]:
    """hey's ``-o csv`` rows as answers; ``started``: when that hey process started."""
    return [
        Answer(
            process,
            sent_at=started + float(row["offset"]),
            latency=float(row["response-time"]),
            status=int(row["status-code"]),
        )
        for row in csv.DictReader(text.splitlines())
    ]


@dataclass(frozen=True)
class OpenLoopResult:
    """What one open-loop run offered and what came back; every figure from ``answers``.
    ``elapsed``: wall seconds of the run; ``client_cpu_s``: CPU seconds the hey processes used
    (they share the machine with the server)."""

    rate: int
    duration: int
    timeout: int
    processes: int
    sent: int
    answers: tuple[Answer, ...]
    elapsed: float
    client_cpu_s: float

    @property
    def statuses(self) -> Counter[int]:
        return Counter(a.status for a in self.answers)

    @property
    def ok(self) -> int:
        """2xx answers within the client timeout: the requests a user got served."""
        return sum(200 <= a.status < 300 and a.latency <= self.timeout for a in self.answers)

    @property
    def refused(self) -> int:
        """503s: the server said at once it would not serve them (what shedding should give)."""
        return self.statuses[503]

    @property
    def other(self) -> int:
        """Answers neither served in time nor refused: other statuses, and 2xx that came after
        the timeout (hey's timer fires a few milliseconds late)."""
        return len(self.answers) - self.ok - self.refused

    @property
    def no_answer(self) -> int:
        """Requests with no HTTP response: client timeouts and connection errors."""
        return self.sent - len(self.answers)

    @property
    def goodput(self) -> float:
        """Requests served in time per second of offered load."""
        return self.ok / self.duration

    def latency(self, p: float) -> float:
        """Percentile of the answers' latency in seconds, served or refused alike."""
        return percentile((a.latency for a in self.answers), p)

    def summary(self) -> str:
        return (
            f"{self.rate} rps offered for {self.duration}s by {self.processes} hey processes: "
            f"sent {self.sent}, served in time {self.ok} ({self.goodput:.1f}/s), refused "
            f"{self.refused}, other {self.other}, no answer within {self.timeout}s "
            f"{self.no_answer} ({self.no_answer / max(1, self.sent):.0%}); answer latency p50 "
            f"{self.latency(50) * 1000:.0f} ms, p95 {self.latency(95) * 1000:.0f} ms; statuses "
            f"{dict(sorted(self.statuses.items()))}"
        )


def open_loop(
    url: str, rate: float, duration: float, *, processes: int = 10, timeout: int = 1
) -> OpenLoopResult:
    """Send ``rate`` GETs a second to ``url`` for ``duration`` seconds (both rounded to whole
    numbers: hey's workers send once a second) whatever the answers, and read every response.

    Takes about ``duration`` + 1 + ``timeout`` seconds: hey's first tick is a second after its
    start, and the last requests may wait ``timeout``.
    """
    loopback(url)
    rate, seconds = round(rate), round(duration)
    if not (0 < rate <= MAX_RATE and 0 < seconds <= MAX_SECONDS and 0 < timeout <= 60):
        raise ValueError(f"rate 1..{MAX_RATE}, duration 1..{MAX_SECONDS}s, timeout 1..60s")
    hey, shares = tool("hey"), split(rate, processes)
    running: list[tuple[subprocess.Popen[bytes], float, IO[str], IO[str]]] = []
    answers: list[Answer] = []
    cpu_before = _children_cpu()
    with contextlib.ExitStack() as files:
        start = time.monotonic()
        try:
            for i, workers in enumerate(shares):
                time.sleep(max(0.0, start + i / len(shares) - time.monotonic()))
                out = files.enter_context(tempfile.TemporaryFile("w+"))
                err = files.enter_context(tempfile.TemporaryFile("w+"))
                command = [
                    hey, "-n", str(workers * seconds), "-c", str(workers), "-q", "1",
                    "-t", str(timeout), "-disable-keepalive", "-o", "csv", url,
                ]  # fmt: skip
                started = time.monotonic() - start
                proc = subprocess.Popen(command, stdout=out, stderr=err)
                running.append((proc, started, out, err))
            deadline = start + 1 + seconds + timeout + SLACK
            for i, (proc, started, out, err) in enumerate(running):
                proc.wait(max(0.0, deadline - time.monotonic()))
                out.seek(0)
                err.seek(0)
                if proc.returncode != 0:
                    raise RuntimeError(f"hey exited with {proc.returncode}: {err.read()[-2000:]}")
                answers += parse_csv(out.read(), i, started)
        finally:
            for proc, *_ in running:  # only ours, and only if something above went wrong
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    elapsed, client_cpu_s = time.monotonic() - start, _children_cpu() - cpu_before
    answers.sort(key=lambda a: a.sent_at)
    return OpenLoopResult(
        rate, seconds, timeout, len(shares), rate * seconds, tuple(answers), elapsed, client_cpu_s
    )


def _children_cpu() -> float:
    """CPU seconds used by this process's children that have been waited for (the hey runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_capacity(url: str, *, seconds: int = 5, connections: int = 8) -> float:
    """2xx answers a second when ``connections`` closed-loop clients keep the server saturated
    (``wrk``, a light C client: little of the CPU it measures goes to the client itself)."""
    loopback(url)
    if not 0 < seconds < 60:
        raise ValueError("1..59 seconds")  # wrk prints longer runs in minutes
    out = subprocess.run(
        [tool("wrk"), "-t", "1", "-c", str(connections), "-d", f"{seconds}s", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + SLACK,
    ).stdout
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s)\b", out)
    if done is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1.0}[done.group(3)]
    failed = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    served = int(done.group(1)) - (int(failed.group(1)) if failed else 0)
    return served / (float(done.group(2)) * unit)


def recovery_seconds(
    url: str, *, within: float = 1.0, limit: float = 60.0, every: float = 0.1
) -> float:
    """Seconds from now until a GET of ``url`` (a health check) is answered 200 within
    ``within`` seconds: how long a server stays unusable after a load stops, while it works off
    what queued up. Polled every ``every`` s; ``math.inf`` if not within ``limit`` s."""
    parts = loopback(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    start = time.monotonic()
    while time.monotonic() - start < limit:
        asked = time.monotonic()
        try:
            status, _ = fetch(LOOPBACK, parts.port or 80, target or "/", within)
        except (OSError, ValueError, IndexError):
            status = 0
        answered = time.monotonic()
        if status == 200 and answered - asked <= within:
            return answered - start
        time.sleep(every)
    return math.inf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="e.g. http://127.0.0.1:8000/heavy")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--processes", type=int, default=10, help="hey processes")
    parser.add_argument("--timeout", type=int, default=1, help="client timeout, seconds")
    args = parser.parse_args(argv)
    result = open_loop(
        args.url, args.rate, args.duration, processes=args.processes, timeout=args.timeout
    )
    print(result.summary())
    health = loopback(args.url)._replace(path="/healthz", query="").geturl()
    print(f"{health} answered within 1 s {recovery_seconds(health):.1f} s after the load")


if __name__ == "__main__":
    main()
