"""What the kit's HeavyWorker costs over Gunicorn's stock sync worker, in CPU per request.

Both servers run the same config (hooks, logger, access log), one worker each; only the worker
class differs (``--worker-class sync``: the command line overrides the config file). The CPU
time comes from the worker processes' own /proc counters, so other load on the machine changes
the wall clock but not the figure. The two servers are loaded in turn, several rounds, their
order swapped every round; the table gives the median of the per-round ratios.

    .venv/bin/python -m bench.overhead [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib

from bench.common import Measurement, client_note, machine, measure, median, record, table, warm_up
from harness.closedloop import ClosedLoop
from harness.server import GunicornServer, serving

SERVERS = {
    "HeavyWorker": [],
    "stock sync": ["--worker-class", "sync"],
}
#: Path -> requests per round per server: enough for the 10 ms tick of the CPU counters to vanish.
PATHS = {"/healthz": 1500, "/heavy": 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"## Overhead of HeavyWorker against the stock sync worker, {machine()}\n")
    runs: dict[tuple[str, str], list[Measurement]] = {
        (name, path): [] for name in SERVERS for path in PATHS
    }
    with contextlib.ExitStack() as stack:
        servers = {
            name: stack.enter_context(serving(GunicornServer(workers=1, args=args_)))
            for name, args_ in SERVERS.items()
        }
        for server in servers.values():
            server.wait_for_log(r"worker pid=\d+ started: id 0")
            warm_up(server, "/heavy", clients=2)
        for rnd in range(args.rounds):
            order = list(servers.items())[:: 1 if rnd % 2 == 0 else -1]
            for path, count in PATHS.items():
                for name, server in order:
                    loop = ClosedLoop(server.url, path, clients=2, duration=120, max_requests=count)
                    runs[name, path].append(measure(server, loop))
    rows = []
    for path in PATHS:
        kit, stock = runs["HeavyWorker", path], runs["stock sync", path]
        ratios = [k.cpu_per_request / s.cpu_per_request for k, s in zip(kit, stock, strict=True)]
        rows.append(
            [
                path,
                f"{median([m.cpu_per_request for m in kit]) * 1e6:,.0f}",
                f"{median([m.cpu_per_request for m in stock]) * 1e6:,.0f}",
                f"{median(ratios):.3f}",
                f"{min(ratios):.3f} - {max(ratios):.3f}",
                f"{median([m.report.rps for m in kit]):.0f} / "
                f"{median([m.report.rps for m in stock]):.0f}",
            ]
        )
    headers = [
        "path",
        "HeavyWorker CPU µs/req",
        "stock sync CPU µs/req",
        "median ratio",
        "ratio range",
        "rps kit / stock",
    ]
    print(table(headers, rows))
    every = [m for ms in runs.values() for m in ms]
    print(
        f"\n{args.rounds} rounds, 1 worker each, 2 clients, {PATHS} requests per round. "
        f"{client_note(every)}"
    )


if __name__ == "__main__":
    record(main)
