"""The article's experiment in one command: the same Locust load against one worker, then against
one worker per usable core; a side-by-side table, a Markdown report and a PNG chart.

    python -m loadtest.experiment            # or: make experiment / heavyapp-experiment

Locust runs as a library in this process (``Environment`` + ``create_local_runner``) with the
kit's own ``HeavyUser`` from ``locustfile.py`` (its answer checks and per-worker tally): progress
is read live from Locust's statistics, and the final numbers are taken after the runner has
stopped, so none of the last second's requests is lost (the ``--csv`` writer flushes once a
second and does not write again at exit). Importing Locust monkey-patches this process with
gevent: the servers are still real ``gunicorn`` processes started by ``GunicornServer``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from types import ModuleType

import locust  # before anything imports ssl: Locust monkey-patches the standard library
import psutil
from locust.env import Environment

from harness.server import REPO, GunicornServer, ServerError, serving
from loadtest import report
from loadtest.cpu import server_cpu_s
from loadtest.results import Load, RunResult, Sample
from workers.master.sizing import CpuBudget, cpu_budget

LOCUSTFILE = REPO / "locustfile.py"
SAMPLE_EVERY_S = 1.0
PROGRESS_EVERY_S = 5
BUSY_WARNING_PERCENT = 25.0


def load_locustfile() -> ModuleType:
    """The kit's locustfile as a module: its user class and its event listeners (on
    ``locust.events``, which every Environment here shares)."""
    spec = importlib.util.spec_from_file_location("heavyapp_locustfile", LOCUSTFILE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def say(message: str) -> None:
    print(message, flush=True)


def sample(env: Environment, started: float) -> Sample:
    total = env.stats.total
    return Sample(round(time.monotonic() - started, 1), total.num_requests, total.num_failures)


def recent_rps(history: list[Sample], window: int) -> float:
    """Requests completed per second over the last ``window`` samples."""
    first, last = history[max(0, len(history) - 1 - window)], history[-1]
    seconds = last.elapsed_s - first.elapsed_s
    return (last.requests - first.requests) / seconds if seconds > 0 else 0.0


def drive_load(
    label: str, url: str, load: Load, kit: ModuleType
) -> tuple[Environment, list[Sample]]:
    """Run the fixed load for its duration, printing progress; Locust's stats after it stopped."""
    options = argparse.Namespace(heavy_n=load.heavy_n, heavy_timeout=load.timeout_s)
    env = Environment(
        user_classes=[kit.HeavyUser], host=url, events=locust.events, parsed_options=options
    )
    runner = env.create_local_runner()
    history: list[Sample] = []
    started = time.monotonic()
    runner.start(load.users, spawn_rate=load.spawn_rate)
    try:
        for tick in range(1, int(load.duration_s / SAMPLE_EVERY_S) + 1):
            time.sleep(max(0.0, started + tick * SAMPLE_EVERY_S - time.monotonic()))
            history.append(now := sample(env, started))
            if tick % PROGRESS_EVERY_S == 0 or tick == load.duration_s:
                say(
                    f"  [{label}] {now.elapsed_s:>3.0f}/{load.duration_s}s"
                    f"  {runner.user_count} users  {now.requests} requests"
                    f"  {now.failures} failed"
                    f"  now {recent_rps(history, PROGRESS_EVERY_S):.1f} req/s"
                )
    finally:
        runner.quit()  # stops the users and fires test_stop: the tally is final after this
    return env, history


def result_of(
    label: str,
    workers: int,
    env: Environment,
    history: list[Sample],
    kit: ModuleType,
    *,
    server_cpu: float,
    machine_busy: float,
) -> RunResult:
    total = env.stats.total
    return RunResult(
        label=label,
        workers=workers,
        requests=total.num_requests,
        failures=total.num_failures,
        rps=total.total_rps,
        mean_ms=total.avg_response_time,
        p50_ms=total.get_response_time_percentile(0.50),
        p95_ms=total.get_response_time_percentile(0.95),
        p99_ms=total.get_response_time_percentile(0.99),
        balance=kit.tally.rows(),
        history=history,
        server_cpu=server_cpu,
        machine_busy=machine_busy,
    )


def measure(
    label: str, workers: int | None, load: Load, out: Path, port: int | None, kit: ModuleType
) -> RunResult:
    """Start a server (``workers=None``: the kit's own sizing), load it, always stop it."""
    log_dir = out / label.replace(" ", "-")
    log_dir.mkdir(parents=True, exist_ok=True)
    server = GunicornServer(workers=workers, port=port, log_dir=log_dir)
    say(f"{label}: starting the server ({'auto-sized' if workers is None else workers} workers)")
    with serving(server):
        pool = len(server.worker_pids())
        say(f"{label}: {pool} worker(s) at {server.url}; {load.users} users for {load.duration_s}s")
        cpu_before, started = server_cpu_s(server), time.monotonic()
        psutil.cpu_percent()  # starts the machine-wide measurement
        env, history = drive_load(label, server.url, load, kit)
        machine_busy = psutil.cpu_percent() / 100
        server_cpu = (server_cpu_s(server) - cpu_before) / (time.monotonic() - started)
        return result_of(
            label, pool, env, history, kit, server_cpu=server_cpu, machine_busy=machine_busy
        )


# -- the command -------------------------------------------------------------------------------

#: Chosen on 2 cores so that one worker falls behind the 1 s timeout and one per core does not;
#: The arithmetic is in docs/loadtesting.md, "The experiment in one command" (one statement).
#: The short mode (10 users) only checks the machinery.
DEFAULTS = Load(users=32, spawn_rate=8, duration_s=30, heavy_n=1_000_000, timeout_s=1.0)
SHORT = replace(DEFAULTS, users=10, spawn_rate=10, duration_s=4)


def positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse type that refuses zero and negative numbers with a clear message."""

    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="heavyapp-experiment",
        description="One worker vs one worker per core under the same Locust load.",
    )
    p.add_argument(
        "--users", type=positive(int), help=f"concurrent users (default {DEFAULTS.users})"
    )
    p.add_argument(
        "--spawn-rate",
        type=positive(float),
        help=f"users started per second (default {DEFAULTS.spawn_rate:g})",
    )
    p.add_argument(
        "--duration", type=positive(int), help=f"seconds per run (default {DEFAULTS.duration_s})"
    )
    p.add_argument(
        "--heavy-n", type=positive(int), help=f"work size per request (default {DEFAULTS.heavy_n})"
    )
    p.add_argument(
        "--timeout",
        type=positive(float),
        help=f"client timeout in seconds (default {DEFAULTS.timeout_s})",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("out/experiment"),
        help="output folder (default out/experiment)",
    )
    p.add_argument(
        "--port", type=positive(int), help="serve on this 127.0.0.1 port (default: a free one)"
    )
    p.add_argument(
        "--short",
        action="store_true",
        help=f"a quick check: {SHORT.users} users, {SHORT.duration_s}s",
    )
    return p.parse_args(argv)


def load_from(args: argparse.Namespace) -> Load:
    base = SHORT if args.short else DEFAULTS
    return Load(
        users=args.users or base.users,
        spawn_rate=args.spawn_rate or base.spawn_rate,
        duration_s=args.duration or base.duration_s,
        heavy_n=args.heavy_n or base.heavy_n,
        timeout_s=args.timeout or base.timeout_s,
    )


def run(load: Load, out: Path, port: int | None, budget: CpuBudget) -> list[RunResult]:
    out.mkdir(parents=True, exist_ok=True)
    say(f"usable CPUs: {budget.usable} ({budget.source}); os.cpu_count() says {budget.total}")
    if (busy := psutil.cpu_percent(interval=1.0)) > BUSY_WARNING_PERCENT:
        say(
            f"warning: the CPUs are already {busy:.0f}% busy before the experiment: other processes"
        )
        say("  will take cores from the pool and blur the comparison; an idle machine measures it")
    kit = load_locustfile()
    return [
        measure("single process", 1, load, out, port, kit),
        measure("one per core", None, load, out, port, kit),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load, budget = load_from(args), cpu_budget()
    try:
        results = run(load, args.out, args.port, budget)
    except ServerError as exc:
        print(f"heavyapp-experiment: {exc}", file=sys.stderr)
        return 2
    say("")
    say(report.side_by_side(results))
    md, png = report.write(args.out, results, load, budget)
    (args.out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    say(f"\nreport: {md}\nchart:  {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
