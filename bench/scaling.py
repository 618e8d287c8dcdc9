"""Scaling on /heavy: requests/s for 1, 2, ..., cores+1 workers, against the physical ceiling.

Each pool size gets a saturating closed-loop load (two clients per worker, so a worker never
waits for work). Efficiency = rps(W) / (min(W, cores) x rps(1)): 100 % means each added worker,
up to one per core, adds a whole single worker's throughput. The ceiling is cores / (CPU seconds
one request costs the server), the CPU cost read from the worker processes' /proc counters in the
same run: no pool of processes can serve faster than the machine has CPU for.

    .venv/bin/python -m bench.scaling [--duration 8]
"""

from __future__ import annotations

import argparse

from bench.common import (
    Measurement,
    client_note,
    legend,
    machine,
    measure,
    median,
    record,
    share_of_cpu_left,
    table,
    warm_up,
)
from harness.closedloop import ClosedLoop
from harness.cpu import usable_cores
from harness.server import GunicornServer, serving


def run_pool(workers: int, duration: float) -> Measurement:
    """A pool of ``workers`` under saturating load."""
    clients = 2 * workers
    with serving(GunicornServer(workers=workers)) as server:
        warm_up(server, "/heavy", clients)
        return measure(server, ClosedLoop(server.url, "/heavy", clients=clients, duration=duration))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per pool size")
    args = parser.parse_args()
    n_cores = usable_cores()
    print(f"## Scaling on /heavy (default n), {machine()}\n")
    results = {w: run_pool(w, args.duration) for w in range(1, n_cores + 2)}
    base_rps = results[1].report.rps
    # The CPU cost of a request drifts a little with load (caches, clock); take the median row.
    cpu_per_request = median([run.cpu_per_request for run in results.values()])
    ceiling = n_cores / cpu_per_request
    rows = []
    for w, run in results.items():
        report, cpu = run.report, run.cpu_per_request
        net_ceiling = (n_cores - report.client_cpu_s / report.elapsed) / cpu
        rows.append(
            [
                w,
                report.clients,
                f"{report.rps:.1f}",
                f"{report.rps / (min(w, n_cores) * base_rps):.0%}",
                f"{cpu * 1000:.1f}",
                f"{report.rps / ceiling:.0%}",
                f"{report.rps / net_ceiling:.0%}",
                f"{report.percentile(50) * 1000:.0f} / {report.percentile(99) * 1000:.0f}",
                len(report.failures),
                f"{run.others_share:.0%}",
                f"{share_of_cpu_left(run):.0%}",
            ]
        )
    headers = [
        "workers",
        "clients",
        "rps",
        "efficiency",
        "server CPU ms/req",
        "of ceiling",
        "of ceiling net of client",
        "p50 / p99 ms",
        "failed",
        "others' CPU",
        "server's use of the CPU left",
    ]
    print(table(headers, rows))
    legend(
        f"Ceiling: {n_cores} cores / {cpu_per_request * 1000:.1f} ms of CPU per request "
        f"(median of the rows) = {ceiling:.1f} rps. 'Net of client' subtracts the CPU the load "
        f"generator used in that row from the cores; 'others' CPU' is what other processes on the "
        "machine took during the row, and the last column the share of the CPU left by the "
        f"client and the others that the server used. {client_note(list(results.values()))}"
    )


if __name__ == "__main__":
    record(main)
