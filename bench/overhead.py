"""What the kit's HeavyWorker costs over Gunicorn's stock sync worker, per request: CPU time,
instructions (callgrind), and where the kit's share goes, gate by gate.

Both servers run the same config (hooks, logger, access log), one worker each; only the worker
class differs (``--worker-class sync``: the command line overrides the config file).

- **CPU time** comes from the worker processes' own /proc counters, so other load on the
  machine changes the wall clock but not the figure. The two servers are loaded in turn,
  several rounds, their order swapped every round; the table gives the median of the per-round
  ratios.
- **Instructions** (``valgrind --tool=callgrind``) repeat exactly for the same code and input,
  however busy the machine. Each server runs under callgrind with the app preloaded in the
  master; one worker serves ``FEW`` requests and is stopped, the next one ``MANY`` and is
  stopped: the difference of their instruction counts over ``MANY - FEW`` requests is the cost
  of one request, start and exit cancelling out.
- **Per gate**: each gate's check run in this process on a real loopback connection holding a
  ``/healthz`` request, many times (peeks consume nothing), in CPU microseconds a call.

    .venv/bin/python -m bench.overhead [--rounds 5] [--no-callgrind]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

from bench.common import Measurement, client_note, machine, measure, median, record, table, warm_up
from harness.closedloop import ClosedLoop
from harness.server import GunicornServer, serving

SERVERS = {
    "HeavyWorker": [],
    "stock sync": ["--worker-class", "sync"],
}
#: Path -> requests per round per server: enough for the 10 ms tick of the CPU counters to vanish.
PATHS = {"/healthz": 1500, "/heavy": 60}
#: Requests served by the two workers whose instruction counts are subtracted.
FEW, MANY = 20, 120
#: Calls of each gate in the per-gate measure.
CALLS = 20000


def request(port: int, path: str) -> None:
    """One ``Connection: close`` GET, read to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        while sock.recv(65536):
            pass


def next_worker(server: GunicornServer, old: int | None, limit: float = 240.0) -> int:
    """The live worker's pid once it is not ``old`` (the master replaced it)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        pids = [pid for pid in server.worker_pids() if pid != old]
        if pids:
            return pids[0]
        time.sleep(0.1)
    raise RuntimeError(f"no new worker within {limit:.0f}s:\n{server.tail()}")


def retire(server: GunicornServer, pid: int) -> int:
    """Stop worker ``pid`` gracefully (it writes its callgrind file) and wait for the next."""
    os.kill(pid, signal.SIGTERM)
    return next_worker(server, pid)


def instructions(path: Path) -> int:
    match = re.search(rb"^(?:summary|totals): (\d+)", path.read_bytes(), re.M)
    if not match:
        raise RuntimeError(f"no instruction count in {path}")
    return int(match.group(1))


def callgrind_per_request(args: list[str], path: str) -> float:
    """Instructions one worker spends per request on ``path`` (see the module's docstring)."""
    out = Path(tempfile.mkdtemp(prefix="heavyapp-callgrind-"))
    server = GunicornServer(workers=1, args=args, env={"HEAVYAPP_PRELOAD": "1"})
    server.command = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/%p.out", sys.executable,
        *server.command,
    ]  # fmt: skip
    try:
        server.start(timeout=240.0)
        # The first worker answered the harness's readiness probes: not counted.
        worker = retire(server, server.worker_pids()[0])
        counted = []
        for count in (FEW, MANY):
            for _ in range(count):
                request(server.port, path)
            counted.append(worker)
            worker = retire(server, worker)
        server.stop()
        few, many = (instructions(out / f"{pid}.out") for pid in counted)
        return (many - few) / (MANY - FEW)
    finally:
        server.stop()
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(server.run_dir, ignore_errors=True)


def per_gate() -> list[tuple[str, float]]:
    """CPU microseconds per call of each step the kit adds before the app, on a real
    connection holding a ``/healthz`` request (nothing is consumed, so every call sees the same
    bytes)."""
    from workers.features import listener_options, probe
    from workers.gates.deadline import DeadlineSocket, FirstLook
    from workers.gates.departed import ClientGone
    from workers.gates.headwait import HeadWait, largest_head
    from workers.gates.queue import QueueWait
    from workers.gates.shedding import Shedding

    features = probe()
    cfg = SimpleNamespace(
        limit_request_fields=50, limit_request_field_size=8190, limit_request_line=4094,
        is_ssl=False, proxy_protocol="off",
    )  # fmt: skip
    with socket.socket() as listener:
        for _, level, name, value in listener_options(features):
            listener.setsockopt(level, name, value)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n")
        fd, addr = listener._accept()
        conn = DeadlineSocket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)
        look = FirstLook(largest_head(cfg) + 1, features)
        look.take(conn)
        shedding = Shedding(2.0, 1)
        queue = QueueWait(shedding, look, lambda: 0)
        queue.ready_at = float("-inf")
        head = HeadWait(cfg, look, 5.0, deferred=30)
        gone = ClientGone()
        steps = {
            "first look (one peek, the TCP age)": lambda: look.take(conn),
            "queue wait (QueueWait)": lambda: queue.check(conn, addr),
            "head deadline (HeadWait)": lambda: head.check(conn, addr),
            "departed client (ClientGone)": lambda: gone.check(conn, addr),
        }
        costs = []
        for name, step in steps.items():
            start = time.process_time()
            for _ in range(CALLS):
                step()
            costs.append((name, (time.process_time() - start) / CALLS * 1e6))
        conn.close()
        client.close()
    return costs


def cpu_rounds(rounds: int) -> dict[tuple[str, str], list[Measurement]]:
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
        for rnd in range(rounds):
            order = list(servers.items())[:: 1 if rnd % 2 == 0 else -1]
            for path, count in PATHS.items():
                for name, server in order:
                    loop = ClosedLoop(server.url, path, clients=2, duration=120, max_requests=count)
                    runs[name, path].append(measure(server, loop))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-callgrind", action="store_true", help="CPU time only")
    args = parser.parse_args()
    print(f"## Overhead of HeavyWorker against the stock sync worker, {machine()}\n")
    counts: dict[str, float] = {}
    if not args.no_callgrind and shutil.which("valgrind"):
        with ThreadPoolExecutor(len(SERVERS)) as pool:
            futures = {
                name: pool.submit(callgrind_per_request, args_, "/healthz")
                for name, args_ in SERVERS.items()
            }
            counts = {name: future.result() for name, future in futures.items()}
    runs = cpu_rounds(args.rounds)
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
    if counts:
        kit, stock = counts["HeavyWorker"], counts["stock sync"]
        print(
            "\n"
            + table(
                ["path", "HeavyWorker instructions/req", "stock sync instructions/req", "ratio"],
                [["/healthz", f"{kit:,.0f}", f"{stock:,.0f}", f"{kit / stock:.3f}"]],
            )
        )
        print(
            f"\ncallgrind: workers {MANY} and {FEW} requests long, differenced; exact on any "
            "machine, however loaded."
        )
    else:
        print("\n(instruction counts skipped: --no-callgrind, or valgrind not installed)")
    gates = per_gate()
    print("\n" + table(["step before the app", "CPU µs/call"], [[n, f"{c:.1f}"] for n, c in gates]))
    print(
        f"\nEach step {CALLS} times in this process on one loopback connection holding a "
        "/healthz request; the rest of the kit's cost is its Flask side (metrics, worker "
        "headers), the board, the title and the prompt close."
    )


if __name__ == "__main__":
    record(main)
