"""Native work: the thread budget's throughput and preload's memory, each side by side.

1. ``/matmul?size=400`` (and 800: 8x the work per request) with 4 clients: the kit (one
   worker per core, one BLAS thread each) against stock ``gunicorn -w W heavyapp:app``
   (W = cores, OpenBLAS at its default of one thread per core in every worker), and the
   ceiling: cores x the rate of one thread multiplying the same matrices in a bare loop, and
   W such loops run at once (what a shared machine leaves them), measured in the same run.
2. Fewer workers with more threads: the kit at W workers x 1 thread against 1 worker x W
   threads, for small and large matrices, at 1 client and at 4.
3. Memory: the total PSS (master and workers) of the kit with a 256 MB model
   (``HEAVYAPP_MODEL_MB=256``) at W = 2 and 4, without and with ``HEAVYAPP_PRELOAD=1``, after
   every worker has searched the whole model.

This machine sets ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` for older OpenBLAS builds; they
slow a current numpy, so this script unsets both for the servers and the loop it starts (the
kernel that then runs is printed). Tests and CI leave them as they are.

    .venv/bin/python -m bench.native [--duration 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import psutil

from bench.common import Measurement, client_note, machine, measure, record, table, warm_up
from harness.closedloop import ClosedLoop, fetch
from harness.cpu import usable_cores
from harness.server import GunicornServer, free_port, serving, stock_gunicorn
from workers.settings import NATIVE_THREADS
from workers.shared.threads import VARIABLES

#: Set on some machines for old OpenBLAS builds; unset for this script's own commands only.
OPENBLAS_TUNING = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
MODEL_MB = 256
#: One thread's loop: the rate of multiply(size) and the BLAS kernel it ran, as JSON.
ONE_THREAD = """
import json, sys, time
from threadpoolctl import threadpool_info
from heavyapp.native import multiply
size, seconds = int(sys.argv[1]), float(sys.argv[2])
multiply(size)
done, started = 0, time.perf_counter()
while time.perf_counter() - started < seconds:
    multiply(size)
    done += 1
blas = [p for p in threadpool_info() if p["user_api"] == "blas"][0]
print(json.dumps({"rate": done / (time.perf_counter() - started), "kernel": blas["architecture"],
                  "threads": blas["num_threads"], "library": blas["internal_api"]}))
"""


def clean_env() -> None:
    """Drop the OpenBLAS tuning and any thread variables from this process (so from all it
    starts): stock Gunicorn runs with the library's defaults, the kit sets its own."""
    for name in (*OPENBLAS_TUNING, *VARIABLES, NATIVE_THREADS):
        os.environ.pop(name, None)


def one_thread(size: int, seconds: float, copies: int = 1, threads: int = 1) -> list[dict]:
    """Run ``copies`` loops at once, each in its own process with ``threads`` BLAS threads
    (one by default); their results."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads)}
    command = [sys.executable, "-c", ONE_THREAD, str(size), str(seconds)]
    procs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(copies)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"the one-thread loop failed with {proc.returncode}")
        results.append(json.loads(out))
    return results


def kit(workers: int, env: dict[str, str] | None = None) -> GunicornServer:
    return GunicornServer(workers=workers, env=env)


def stock(workers: int) -> GunicornServer:
    port = free_port()
    return GunicornServer(port=port, command=stock_gunicorn(port, workers))


def load(server: GunicornServer, path: str, clients: int, seconds: float) -> Measurement:
    warm_up(server, path, clients=clients)
    return measure(server, ClosedLoop(server.url, path, clients=clients, duration=seconds))


def throughput(cores: int, seconds: float, size: int) -> list[Measurement]:
    path = f"/matmul?size={size}"
    (alone,) = one_thread(size, seconds)
    runs = {}
    for name, make in (("gunicorn + kit", kit), ("stock gunicorn", stock)):
        with serving(make(cores)) as server:
            runs[name] = load(server, path, 4, seconds)
    side_by_side = sum(r["rate"] for r in one_thread(size, seconds, copies=cores))
    rate = alone["rate"]
    kit_rps, stock_rps = runs["gunicorn + kit"].report.rps, runs["stock gunicorn"].report.rps
    print(f"### `{path}`, {cores} workers, 4 clients, {seconds:.0f}s\n")
    print(
        table(
            ["server", "products/s", "CPU ms/product", "p50 ms", "p99 ms", "failed"],
            [
                [
                    name,
                    f"{m.report.rps:,.0f}",
                    f"{m.cpu_per_request * 1000:.2f}",
                    f"{m.report.percentile(50) * 1000:.1f}",
                    f"{m.report.percentile(99) * 1000:.1f}",
                    len(m.report.failures),
                ]
                for name, m in runs.items()
            ]
            + [
                [
                    f"ceiling: {cores} x one thread's loop",
                    f"{cores * rate:,.0f}",
                    f"{1000 / rate:.2f}",
                    *"---",
                ],
                [f"{cores} one-thread loops at once", f"{side_by_side:,.0f}", "-", *"---"],
            ],
        )
    )
    print(
        f"\nkit / stock = **{kit_rps / stock_rps:.2f}x**; kit / ceiling = "
        f"**{kit_rps / (cores * rate):.2f}**, kit / {cores} loops at once = "
        f"**{kit_rps / side_by_side:.2f}** ({alone['library']} kernel {alone['kernel']}; the "
        f"loop alone before the servers, the {cores} loops after them). "
        f"{client_note(list(runs.values()))}\n"
    )
    return list(runs.values())


def shapes(cores: int, seconds: float) -> list[Measurement]:
    """W workers x 1 thread against 1 worker x W threads (the kit's budget either way)."""
    layouts = {f"{cores} workers x 1 thread": cores, f"1 worker x {cores} threads": 1}
    cases = [(400, 1), (400, 4), (1500, 1), (1500, 4)]
    results: dict[tuple[str, int, int], Measurement] = {}
    for name, workers in layouts.items():
        with serving(kit(workers)) as server:
            for size, clients in cases:
                results[name, size, clients] = load(
                    server, f"/matmul?size={size}", clients, seconds / 2
                )
    rows = []
    for size, clients in cases:
        row: list[object] = [f"{size}x{size}, {clients} client{'s' if clients > 1 else ''}"]
        for name in layouts:
            m = results[name, size, clients]
            row += [f"{m.report.rps:,.1f}", f"{m.report.percentile(50) * 1000:.0f}"]
        rows.append(row)
    headers = ["matrices, clients"]
    for name in layouts:
        headers += [f"{name}: products/s", "p50 ms"]
    print(f"### Fewer workers, more threads ({seconds / 2:.0f}s each)\n")
    print(table(headers, rows))
    bare = {n: one_thread(1500, seconds / 2, threads=n)[0]["rate"] for n in (1, cores)}
    print(
        f"\nA bare loop, one 1500x1500 product at a time: {bare[1]:.2f}/s with 1 thread, "
        f"{bare[cores]:.2f}/s with {cores} ({bare[cores] / bare[1]:.2f}x).\n"
    )
    return list(results.values())


def touch_every_worker(server: GunicornServer, limit: float = 60.0) -> None:
    """/predict until each worker has answered once (each has then read the whole model)."""
    host, port = "127.0.0.1", server.port
    seen: set[str] = set()
    deadline = time.monotonic() + limit
    while len(seen) < server.expected_workers():
        if time.monotonic() > deadline:
            raise RuntimeError(f"only workers {sorted(seen)} answered /predict in {limit:.0f}s")
        status, worker = fetch(host, port, "/predict", 30)
        if status != 200:
            raise RuntimeError(f"/predict answered {status}")
        seen.add(worker)


def total_pss_mb(server: GunicornServer) -> float:
    master = psutil.Process(server.master_pid)
    procs = [master, *master.children(recursive=True)]
    return sum(p.memory_full_info().pss for p in procs) / 2**20


def memory() -> dict[tuple[int, str], float]:
    found: dict[tuple[int, str], float] = {}
    for workers in (2, 4):
        for preload in ("0", "1"):
            env = {"HEAVYAPP_MODEL_MB": str(MODEL_MB), "HEAVYAPP_PRELOAD": preload}
            with serving(kit(workers, env)) as server:
                touch_every_worker(server)
                found[workers, preload] = total_pss_mb(server)
    rows = [
        [
            workers,
            f"{found[workers, '0']:,.0f}",
            f"{found[workers, '1']:,.0f}",
            f"**{found[workers, '1'] / found[workers, '0']:.2f}**",
        ]
        for workers in (2, 4)
    ]
    print(f"### Memory with a {MODEL_MB} MB model (total PSS, master + workers)\n")
    print(table(["workers", "MB without preload", "MB with preload", "with / without"], rows))
    print()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[400, 800],
        help="matrix sizes of the throughput runs (400: the issue's; 800: 8x the work per request)",
    )
    args = parser.parse_args()
    clean_env()
    cores = usable_cores()
    print(f"## Native work, {machine()}\n")
    for size in args.sizes:
        throughput(cores, args.duration, size)
    shapes(cores, args.duration)
    memory()


if __name__ == "__main__":
    record(main)
