"""What the benchmark scripts share: the servers they compare, the servers' CPU counters, a
warm-up, markdown tables, and the copy of each script's output kept in docs/bench/.

Every figure the scripts print is measured in the same run as the figures it is compared with:
the machine is shared and noisy, so only side-by-side numbers and ratios mean anything.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import psutil

from harness.closedloop import ClosedLoop, Report
from harness.cpu import server_cpu_s, usable_cores
from harness.server import GunicornServer, ServerError, free_port, serving

#: Where each script's latest output is kept, as docs/benchmarks.md says.
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "bench"
BIN = Path(sys.executable).parent
#: Builds one server, not started yet, from its worker count.
Maker = Callable[[int], GunicornServer]


def kit(*args: str, env: dict[str, str] | None = None) -> Maker:
    """The kit as the README runs it (``-c gunicorn_conf.py``), plus ``args`` and ``env``."""
    return lambda workers: GunicornServer(workers=workers, args=list(args), env=env)


def external(build: Callable[[int, int], list[str]]) -> Maker:
    """A peer server: its command line for (port, workers), run by the kit's launcher."""

    def make(workers: int) -> GunicornServer:
        port = free_port()
        return GunicornServer(port=port, command=build(port, workers))

    return make


def dirty_arbiter(port: int, workers: int) -> list[str]:
    """Gunicorn's own answer to CPU-heavy work: gthread HTTP workers handing the count to as
    many dirty-arbiter workers (``bench/dirty_peer.py``)."""
    return [
        str(BIN / "gunicorn"), "-k", "gthread", "--threads", "4", "-w", str(workers),
        "--dirty-workers", str(workers), "--dirty-app", "bench.dirty_peer:Counter",
        "--no-control-socket", "-b", f"127.0.0.1:{port}", "bench.dirty_peer:app",
    ]  # fmt: skip


def granian(port: int, workers: int) -> list[str]:
    return [
        str(BIN / "granian"), "--interface", "wsgi", "--host", "127.0.0.1", "--port", str(port),
        "--workers", str(workers), "heavyapp:app",
    ]  # fmt: skip


def uwsgi(port: int, workers: int) -> list[str]:
    """uWSGI looks the callable up in the module's dict, where ``heavyapp.app`` is not until
    first asked for: it gets the factory, which it calls once, where it would load the app."""
    return [
        str(BIN / "uwsgi"), "--http-socket", f"127.0.0.1:{port}", "--master", "--processes",
        str(workers), "--module", "heavyapp:create_app()", "--need-app", "--die-on-term",
        "--disable-logging",
    ]  # fmt: skip


#: The non-Gunicorn servers (the ``bench`` extra): name -> command line for (port, workers).
PEERS = {"granian": granian, "uwsgi": uwsgi}


def peers() -> tuple[dict[str, Maker], list[str]]:
    """The ``PEERS`` installed here, and a line for each one that is not."""
    found, missing = {}, []
    for name, build in PEERS.items():
        if shutil.which(name, path=str(BIN)):
            found[name] = external(build)
        else:
            missing.append(f"{name} not installed: pip install -e '.[bench]'")
    return found, missing


def start_all(
    stack: contextlib.ExitStack, makers: dict[str, Maker], n: int
) -> tuple[dict[str, GunicornServer], list[str]]:
    """Start every server with ``n`` workers, stopped when ``stack`` closes; a line for each
    one that did not start (the others are still compared)."""
    started, failed = {}, []
    for name, make in makers.items():
        try:
            started[name] = stack.enter_context(serving(make(n)))
        except ServerError as exc:
            failed.append(f"{name} did not start: {str(exc).splitlines()[0]}")
    return started, failed


def machine_busy() -> float:
    """CPU seconds the whole machine has spent not idle, all processes together."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def others_share(busy_s: float, server_s: float, client_s: float, elapsed: float) -> float:
    """Share of the usable cores that processes other than the server and the client took
    during ``elapsed`` seconds in which the whole machine was busy ``busy_s`` CPU seconds."""
    others = max(0.0, busy_s - server_s - client_s)
    return others / (elapsed * usable_cores()) if elapsed else 0.0


@dataclass(frozen=True)
class Measurement:
    """One load run against one server, with the CPU the server, the client and the rest used."""

    report: Report
    server_cpu_s: float
    machine_busy_s: float

    @property
    def cpu_per_request(self) -> float:
        """Server CPU seconds per request, from the worker processes' own counters."""
        return self.server_cpu_s / max(1, self.report.sent)

    @property
    def others_share(self) -> float:
        """Share of the machine taken by processes that are neither this server nor the client:
        other people's work on a shared machine, which the figures of this run had to live with.
        """
        r = self.report
        return others_share(self.machine_busy_s, self.server_cpu_s, r.client_cpu_s, r.elapsed)


def share_of_cpu_left(m: Measurement) -> float:
    """The server's CPU use as a share of what the client and the other processes left it."""
    r = m.report
    left = r.elapsed * r.cores * (1 - m.others_share) - r.client_cpu_s
    return m.server_cpu_s / left if left > 0 else float("nan")


def measure(server: GunicornServer, loop: ClosedLoop) -> Measurement:
    """Run ``loop`` against ``server`` and read the CPU counters around it."""
    server_before, busy_before = server_cpu_s(server), machine_busy()
    report = loop.run()
    return Measurement(report, server_cpu_s(server) - server_before, machine_busy() - busy_before)


def warm_up(server: GunicornServer, path: str, clients: int, seconds: float = 1.0) -> None:
    """Load every worker once (imports, caches, first page faults) before anything is counted."""
    ClosedLoop(server.url, path, clients=clients, duration=seconds).run()


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table (it goes into docs/benchmarks.md as printed)."""
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(" --- " for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def legend(text: str, notes: Sequence[str] = ()) -> None:
    """The paragraph under a table (how to read it), then the run's notes as a list."""
    print(f"\n{text}")
    for note in notes:
        print(f"- {note}")


def machine() -> str:
    """One line that says where and when the figures were measured."""
    return (
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {platform.processor() or platform.machine()}, "
        f"{usable_cores()} usable cores of {os.cpu_count()}, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at start, Python "
        f"{platform.python_version()}"
    )


def client_note(runs: Sequence[Measurement]) -> str:
    """Say how much of the machine the load generator and everybody else took during the runs."""
    client = median([m.report.client_cpu_share() for m in runs])
    others = median([m.others_share for m in runs])
    return (
        f"The load generator ran on the same machine and used a median {client:.0%} of its "
        f"{usable_cores()} cores, other processes (a shared machine) {others:.0%}: the servers had "
        "that much less CPU than the machine has."
    )


class _Tee(io.StringIO):
    """Keeps what is printed and passes it on to the terminal as it comes."""

    def __init__(self, terminal: TextIO) -> None:
        super().__init__()
        self.terminal = terminal

    def write(self, text: str) -> int:
        self.terminal.write(text)
        self.terminal.flush()
        return super().write(text)


def record(main: Callable[[], None]) -> None:
    """Run a bench script's ``main``, printing as usual, and write what it printed to
    docs/bench/<script>.md once it completes (a failed run leaves the last good page)."""
    script = Path(sys.modules[main.__module__].__file__ or "bench").stem
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        main()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{script}.md").write_text(tee.getvalue())
