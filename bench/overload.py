"""Overload: each server under open-loop load at multiples of one pool's capacity: how much is
still served in time, how much is refused or never answered, and how long the server stays
unusable after the load stops; then closed loops at multiples of the pool's reach, where a
server must refuse nothing it can serve in time.

A closed loop cannot overload a server (each client waits for its answer); this bench offers
requests at a fixed rate with ``hey`` (harness/openloop.py: staggered processes, 1 s client
timeout). Capacity is measured first, once, on the kit (``wrk``, a closed loop saturating it;
the best of a few short runs, as other people's work on a shared machine only ever lowers it)
and is the base for every server's multiples; each run's goodput is set against the kit's
capacity measured again just before and just after it, as the machine's speed drifts. Servers,
each with one worker per usable core: the kit with ``HEAVYAPP_QUEUE_TIMEOUT`` set (requests that
waited longer get a 503; a kit without that setting ignores it), stock Gunicorn (no config, sync
worker), Gunicorn's dirty arbiters (gthread HTTP workers handing the count to a dirty pool of as
many processes: ``bench/dirty_peer.py``), Granian and uWSGI (the ``bench`` extra). All run at
once, idle but for the one under load; for each multiple the servers are loaded in turn (order
reversed every other multiple), and each must drain its queue before the next one is loaded.

Closed loops: ``reach`` = capacity x client timeout is how many callers, each sending its next
request when its answer comes, the pool can serve within their timeout (a queue of ``reach``
requests drains in exactly one timeout). At 0.5x-1x of it every request can be served in time
and nothing should be refused; at 1.5x a third cannot.

    .venv/bin/python -m bench.overload [--duration 15 --multiples 1,2,4,10 --servers kit,stock]
        [--closed 0.5,0.6,1,1.5]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from dataclasses import dataclass

from bench.common import (
    PEERS,
    Maker,
    dirty_arbiter,
    external,
    kit,
    machine,
    machine_busy,
    others_share,
    peers,
    record,
    start_all,
    table,
    warm_up,
)
from harness.closedloop import ClosedLoop, Report
from harness.cpu import server_cpu_s, usable_cores
from harness.openloop import OpenLoopResult, measure_capacity, open_loop, recovery_seconds
from harness.server import GunicornServer, stock_gunicorn

PATH = "/heavy?n=1000000"
HEALTH = "/healthz"
#: The clients' patience (hey's ``-t`` and the closed loops' socket timeout), seconds.
CLIENT_TIMEOUT = 1
#: The kit's queue timeout: the clients' patience less about three requests' service.
QUEUE_TIMEOUT = "0.9"
#: Seconds a recovery is waited for before it is reported as "more than that".
RECOVERY_LIMIT = 90.0
#: A server has drained its queue when /healthz answers this fast (seconds) again.
DRAINED = 0.05
#: Capacity: the best of this many wrk runs of this many seconds.
CAPACITY_RUNS, CAPACITY_SECONDS = 3, 3


def makers() -> tuple[dict[str, Maker], list[str]]:
    """Every server this bench knows, by its short name; a line for each one not installed."""
    others, missing = peers()
    servers = {
        "kit": kit(env={"HEAVYAPP_QUEUE_TIMEOUT": QUEUE_TIMEOUT}),
        "stock": external(stock_gunicorn),
        "dirty": external(dirty_arbiter),
        **others,
    }
    return servers, missing


@dataclass(frozen=True)
class Run:
    """One server at one multiple of capacity: the load's result, the share of the machine
    other processes took meanwhile, and the recovery after it."""

    server: str
    multiple: float
    result: OpenLoopResult
    others: float
    recovery: float
    #: The base's capacity measured just before and just after this run (rps, their mean).
    capacity: float


def load(
    name: str, server: GunicornServer, multiple: float, rate: float, seconds: float, base: str
) -> Run:
    """Offer ``rate`` to ``server`` for ``seconds``, then wait until it has drained its queue;
    the capacity of ``base`` (a URL) is measured just before and just after."""
    before = measure_capacity(base, seconds=CAPACITY_SECONDS)
    busy, cpu = machine_busy(), server_cpu_s(server)
    result = open_loop(server.url + PATH, rate, seconds)
    busy, cpu = machine_busy() - busy, server_cpu_s(server) - cpu
    health = server.url + HEALTH
    recovery = recovery_seconds(health, limit=RECOVERY_LIMIT)
    recovery_seconds(health, within=DRAINED, limit=RECOVERY_LIMIT)
    others = others_share(busy, cpu, result.client_cpu_s, result.elapsed)
    after = measure_capacity(base, seconds=CAPACITY_SECONDS)
    return Run(name, multiple, result, others, recovery, (before + after) / 2)


@dataclass(frozen=True)
class ClosedRun:
    """One server under a closed loop of ``users`` callers at ``multiple`` of the pool's reach."""

    server: str
    multiple: float
    users: int
    report: Report

    def in_time(self) -> int:
        return sum(
            o.status == 200 and o.latency <= CLIENT_TIMEOUT and not o.failed
            for o in self.report.outcomes
        )

    def refused(self) -> int:
        return sum(o.status == 503 for o in self.report.outcomes)


def closed(
    name: str, server: GunicornServer, multiple: float, users: int, secs: float
) -> ClosedRun:
    """``users`` callers, each waiting at most the client timeout, for ``secs``; then drained."""
    loop = ClosedLoop(server.url, PATH, clients=users, duration=secs, timeout=CLIENT_TIMEOUT)
    report = loop.run()
    recovery_seconds(server.url + HEALTH, within=DRAINED, limit=RECOVERY_LIMIT)
    return ClosedRun(name, multiple, users, report)


def closed_rows(runs: list[ClosedRun], order: list[str]) -> list[list[object]]:
    out: list[list[object]] = []
    for run in sorted(runs, key=lambda r: (order.index(r.server), r.multiple)):
        r = run.report
        out.append(
            [
                run.server,
                f"{run.multiple:g}x",
                run.users,
                r.sent,
                f"{run.in_time() / r.sent:.1%}" if r.sent else "-",
                run.refused(),
                sum(o.status == 0 for o in r.outcomes),
                milliseconds(r.percentile(50)),
                milliseconds(r.percentile(95)),
            ]
        )
    return out


def milliseconds(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:,.0f}"


def rows(runs: list[Run], order: list[str]) -> list[list[object]]:
    """The table's rows, server by server in ``order``; "vs kit": goodput over the kit's at the
    same multiple (a ratio from the same run, which a noisy machine leaves meaningful)."""
    kit_goodput = {r.multiple: r.result.goodput for r in runs if r.server == "kit"}
    out: list[list[object]] = []
    for run in sorted(runs, key=lambda r: (order.index(r.server), r.multiple)):
        r, base = run.result, kit_goodput.get(run.multiple)
        out.append(
            [
                run.server,
                f"{run.multiple:g}x",
                r.rate,
                f"{r.goodput:.1f}",
                f"{run.capacity:.1f}",
                f"{r.goodput / run.capacity:.2f}",
                f"{r.goodput / base:.2f}" if base else "-",
                r.refused,
                r.other,
                f"{r.no_answer / r.sent:.0%}",
                milliseconds(r.latency(50)),
                milliseconds(r.latency(95)),
                f"> {RECOVERY_LIMIT:.0f}" if math.isinf(run.recovery) else f"{run.recovery:.1f}",
                f"{run.others:.0%}",
            ]
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of load per run")
    parser.add_argument("--multiples", default="1,2,4,10", help="of capacity, comma-separated")
    parser.add_argument(
        "--servers", default="kit,stock,dirty,granian,uwsgi", help="comma-separated"
    )
    parser.add_argument(
        "--closed", default="0.5,0.6,1,1.5", help="closed loops, multiples of the reach ('' none)"
    )
    args = parser.parse_args()
    multiples = [float(m) for m in args.multiples.split(",") if m]
    closed_multiples = [float(m) for m in args.closed.split(",") if m]
    available, notes = makers()
    wanted = args.servers.split(",")
    if unknown := set(wanted) - set(available) - set(PEERS):
        parser.error(f"unknown servers {sorted(unknown)}: choose from {[*available, *PEERS]}")
    n = usable_cores()
    print(f"## Overload, {n} worker processes each, {machine()}\n")
    runs: list[Run] = []
    closed_runs: list[ClosedRun] = []
    with contextlib.ExitStack() as stack:
        servers, failed = start_all(
            stack, {name: available[name] for name in wanted if name in available}, n
        )
        notes += failed
        if not servers:
            raise SystemExit("no server started:\n" + "\n".join(notes))
        for server in servers.values():
            warm_up(server, "/heavy", clients=2 * n)
        base = servers.get("kit") or next(iter(servers.values()))
        capacities = [
            measure_capacity(base.url + PATH, seconds=CAPACITY_SECONDS)
            for _ in range(CAPACITY_RUNS)
        ]
        capacity = max(capacities)
        for i, multiple in enumerate(multiples):
            for name, server in list(servers.items())[:: 1 if i % 2 == 0 else -1]:
                rate = multiple * capacity
                runs.append(load(name, server, multiple, rate, args.duration, base.url + PATH))
        reach = capacity * CLIENT_TIMEOUT
        for i, multiple in enumerate(closed_multiples):
            users = max(1, round(multiple * reach))
            for name, server in list(servers.items())[:: 1 if i % 2 == 0 else -1]:
                closed_runs.append(closed(name, server, multiple, users, args.duration))
    if runs:
        print(open_table(runs, capacity, capacities, list(servers), args.duration))
    if closed_runs:
        print("\n" + closed_table(closed_runs, capacity, list(servers), args.duration))
    for run in runs:
        if run.result.other:
            statuses = dict(sorted(run.result.statuses.items()))
            notes.append(
                f"{run.server} at {run.multiple:g}x: {run.result.other} answers neither served "
                f"within the timeout nor refused; statuses of all answers {statuses}"
            )
    for note in notes:
        print(f"- {note}")


def open_table(
    runs: list[Run], capacity: float, capacities: list[float], order: list[str], duration: float
) -> str:
    """The open-loop table and its legend."""
    n = usable_cores()
    first = runs[0].result
    headers = [
        "server", "multiple", "offered rps", "goodput rps", "capacity then", "goodput / capacity",
        "goodput vs kit", "refused (503)", "other status", "no answer", "median ms", "p95 ms",
        "recovery s", "others' CPU",
    ]  # fmt: skip
    return table(headers, rows(runs, order)) + (
        f"\n\nCapacity {capacity:.1f} rps: the best of `wrk -c 8` for {CAPACITY_SECONDS} s "
        f"({', '.join(f'{c:.1f}' for c in capacities)} rps) against "
        f"{'the kit' if 'kit' in order else order[0]} ({n} workers), the base of "
        f"every multiple. A shared machine's speed drifts, so each run's goodput is set "
        f"against the capacity measured the same way just before and just after it (capacity "
        f"then, their mean). Each run: {duration:g} s of arrivals from {first.processes} hey "
        f"processes started 1/{first.processes} s apart, client timeout {first.timeout} s. "
        f"Goodput: 2xx answered within the timeout per second. No answer: requests with no "
        f"response within the timeout (client timeouts and connection errors). Median and p95: "
        f"of the answers, served or refused. Recovery: from the end of the load until "
        f"{HEALTH} answered within 1 s. Others' CPU: share of the {n} cores that processes "
        f"other than the server and hey took during the run (a shared machine). The kit ran "
        f"with HEAVYAPP_QUEUE_TIMEOUT={QUEUE_TIMEOUT}. Load average at the end: "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}."
    )


def closed_table(runs: list[ClosedRun], capacity: float, order: list[str], duration: float) -> str:
    """The closed-loop table and its legend."""
    headers = [
        "server", "of reach", "users", "requests", "answered in time", "refused (503)",
        "no answer (timeout, error)", "median ms", "p95 ms",
    ]  # fmt: skip
    return table(headers, closed_rows(runs, order)) + (
        f"\n\nClosed loops: reach = capacity {capacity:.1f} rps x {CLIENT_TIMEOUT} s client "
        f"timeout = {capacity * CLIENT_TIMEOUT:.0f} callers; each caller sends its next "
        f"request as soon as its answer (or its {CLIENT_TIMEOUT} s timeout) comes, for "
        f"{duration:g} s. In time: a 200 within the timeout."
    )


if __name__ == "__main__":
    record(main)
