"""The kit's Gunicorn against the servers a user might pick instead, same app, same process count.

Every server serves ``heavyapp:app`` with ``cores`` worker processes, each as its own defaults
have it (Granian and uWSGI log no access lines by default, the kit logs one per request). Also
measured: Gunicorn's optional C HTTP parser (``gunicorn[fast]`` installs ``gunicorn_h1c``;
``--http-parser fast`` requires it, the default ``auto`` uses it when installed) and
``--reuse-port``. The kit does not depend on ``gunicorn_h1c``; to measure it, install it beside
the venv and point ``--h1c`` at it (only that server gets it, on its ``PYTHONPATH``). All
servers run at once, idle but for the one under load; each round loads them in turn (order
reversed every other round) and the table gives the medians over the rounds.

    .venv/bin/python -m bench.peers [--rounds 3 --duration 5]
    .venv/bin/pip install --target /tmp/h1c gunicorn_h1c   # optional: the fast parser too
    .venv/bin/python -m bench.peers --h1c /tmp/h1c
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import importlib.util
from pathlib import Path

from bench.common import (
    Maker,
    Measurement,
    client_note,
    kit,
    legend,
    machine,
    measure,
    median,
    peers,
    record,
    start_all,
    table,
    warm_up,
)
from harness.closedloop import ClosedLoop
from harness.cpu import usable_cores

#: Path -> closed-loop clients: 4 on /heavy as in the original experiment; more on /healthz,
#: where the client's own per-request cost is what limits a single client.
PATHS = {"/heavy": 4, "/healthz": 8}


def fast_parser(h1c: Path | None) -> Maker | None:
    """The kit with Gunicorn's C parser, from the venv or from the ``--h1c`` folder; None if
    ``gunicorn_h1c`` is in neither."""
    if h1c is not None and importlib.machinery.PathFinder.find_spec("gunicorn_h1c", [str(h1c)]):
        return kit("--http-parser", "fast", env={"PYTHONPATH": str(h1c)})
    if importlib.util.find_spec("gunicorn_h1c"):
        return kit("--http-parser", "fast")
    return None


def candidates(
    h1c: Path | None,
) -> tuple[dict[str, Maker], list[str]]:
    """The servers this machine can run, and a line for each one it cannot."""
    servers: dict[str, Maker] = {
        "gunicorn + kit (python parser)": kit("--http-parser", "python"),
    }
    missing = []
    if fast := fast_parser(h1c):
        servers["gunicorn + kit (fast parser, gunicorn_h1c)"] = fast
    else:
        missing.append(
            f"gunicorn_h1c not in the venv{f' nor in {h1c}' if h1c else ''}: "
            "pip install --target DIR gunicorn_h1c, then --h1c DIR"
        )
    servers["gunicorn + kit (python parser, reuse_port)"] = kit(
        "--http-parser", "python", "--reuse-port"
    )
    others, not_installed = peers()
    return {**servers, **others}, missing + not_installed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument(
        "--h1c", type=Path, help="a folder holding gunicorn_h1c (pip install --target DIR ...)"
    )
    args = parser.parse_args()
    n = usable_cores()
    print(f"## Peers, {n} worker processes each, {machine()}\n")
    makers, notes = candidates(args.h1c)
    with contextlib.ExitStack() as stack:
        servers, failed = start_all(stack, makers, n)
        notes += failed
        for server in servers.values():
            warm_up(server, "/heavy", clients=2 * n)
        runs: dict[tuple[str, str], list[Measurement]] = {
            (name, path): [] for name in servers for path in PATHS
        }
        for rnd in range(args.rounds):
            order = list(servers.items())[:: 1 if rnd % 2 == 0 else -1]
            for path, clients in PATHS.items():
                for name, server in order:
                    loop = ClosedLoop(server.url, path, clients=clients, duration=args.duration)
                    runs[name, path].append(measure(server, loop))
    rows = []
    for name in servers:
        row: list[object] = [name]
        for path in PATHS:
            ms = runs[name, path]
            row += [
                f"{median([m.report.rps for m in ms]):,.0f}",
                f"{median([m.report.percentile(99) for m in ms]) * 1000:.0f}",
                f"{median([m.cpu_per_request for m in ms]) * 1e6:,.0f}",
                sum(len(m.report.failures) for m in ms),
            ]
        rows.append(row)
    headers = ["server"]
    for path, clients in PATHS.items():
        headers += [
            f"{path} rps ({clients} clients)",
            f"{path} p99 ms",
            f"{path} CPU µs/req",
            f"{path} failed",
        ]
    print(table(headers, rows))
    every = [m for ms in runs.values() for m in ms]
    legend(
        f"{args.rounds} rounds of {args.duration:.0f}s per server and path, medians. "
        f"CPU µs/req: every process under the server's master, from /proc. {client_note(every)}",
        notes,
    )


if __name__ == "__main__":
    record(main)
