"""The article's experiment in one command: the same Locust load against one worker, then against
one worker per usable core; then the overload run, stock Gunicorn's pool against the kit's at 4x
the pool's capacity, open loop; side-by-side tables, a Markdown report and PNG charts.

    python -m loadtest.experiment            # or: make experiment

The loads are sized from capacities measured first on this machine (``measure_capacity``, a
short ``wrk`` saturation run), so the story does not depend on the machine: the Locust load puts
the single worker past what it can answer within the client timeout, and the overload run offers
each pool four times what it can serve (``open_loop``, Debian's ``hey``).

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
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import locust  # before anything imports ssl: Locust monkey-patches the standard library
import psutil
from locust.env import Environment

from harness.cpu import server_cpu_s
from harness.openloop import MAX_RATE, measure_capacity, open_loop, recovery_seconds, tool
from harness.server import REPO, GunicornServer, ServerError, free_port, serving, stock_gunicorn
from loadtest import report
from loadtest.results import Load, Overload, OverloadResult, RunResult, Sample
from workers.master.sizing import CpuBudget, cpu_budget

LOCUSTFILE = REPO / "locustfile.py"
HEAVY_NAME = "/heavy"  # the locustfile's name for served (or failed) requests; refusals differ
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


def refused(env: Environment) -> int:
    """Requests Locust recorded under another name than ``/heavy``: the locustfile names the
    kit's fast refusals (503 + Retry-After) apart, as answers that are neither served nor failed."""
    heavy = env.stats.entries.get((HEAVY_NAME, "GET"))
    return env.stats.total.num_requests - (heavy.num_requests if heavy else 0)


def sample(env: Environment, started: float) -> Sample:
    total = env.stats.total
    elapsed = round(time.monotonic() - started, 1)
    return Sample(elapsed, total.num_requests, total.num_failures, refused(env))


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
        refused=refused(env),
    )


def make_server(
    label: str,
    out: Path,
    port: int | None,
    *,
    workers: int | None = None,
    stock: int = 0,
    env: dict[str, str] | None = None,
) -> GunicornServer:
    """The kit (``workers=None``: its own sizing, as ``make run`` starts it), or with ``stock``
    workers plain ``gunicorn -w N heavyapp:app``; logs under ``out/<label>/``."""
    log_dir = out / label.replace(" ", "-")
    log_dir.mkdir(parents=True, exist_ok=True)
    if stock:
        port = port or free_port()
        return GunicornServer(port=port, command=stock_gunicorn(port, stock), log_dir=log_dir)
    return GunicornServer(workers=workers, port=port, log_dir=log_dir, env=env)


def capacity(server: GunicornServer, path: str, plan: Plan) -> float:
    """Requests/s the server answers when saturated by a closed loop: the best of a few short
    ``wrk`` runs, as other people's work on a shared machine only ever lowers it."""
    runs = [
        measure_capacity(server.url + path, seconds=plan.capacity_seconds)
        for _ in range(plan.capacity_runs)
    ]
    say(f"  capacity: {', '.join(f'{c:.1f}' for c in runs)} rps; the best, {max(runs):.1f}")
    return max(runs)


def measure(label: str, server: GunicornServer, load: Load, kit: ModuleType) -> RunResult:
    """Put the Locust load on a running server; its figures and the CPU it took."""
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


def overload(label: str, server: GunicornServer, spec: Overload) -> OverloadResult:
    """Offer ``spec.rate`` requests/s for ``spec.duration_s``, then time the recovery."""
    workers = len(server.worker_pids())
    say(f"{label}: {workers} workers at {server.url}; {spec.rate} rps offered")
    run = open_loop(
        f"{server.url}/heavy?n={spec.heavy_n}", spec.rate, spec.duration_s, timeout=spec.timeout_s
    )
    say(f"  {run.summary()}")
    recovery = recovery_seconds(
        f"{server.url}/healthz", within=spec.timeout_s, limit=spec.recovery_limit_s
    )
    say(f"  /healthz answered in time {recovery:.1f} s after the load")
    return OverloadResult.of(label, workers, run, recovery)


# -- the command -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How long each step runs; the loads themselves are sized from measured capacities."""

    duration_s: int  # Locust seconds per run
    ramp_s: float  # Locust starts its users over this many seconds
    capacity_runs: int
    capacity_seconds: int
    overload_s: int
    recovery_limit_s: float


#: The short mode only checks the machinery (the tests use it).
FULL = Plan(duration_s=30, ramp_s=4, capacity_runs=3, capacity_seconds=3, overload_s=15,
            recovery_limit_s=90)  # fmt: skip
SHORT = Plan(duration_s=4, ramp_s=1, capacity_runs=1, capacity_seconds=1, overload_s=1,
             recovery_limit_s=10)  # fmt: skip
HEAVY_N, TIMEOUT_S, MULTIPLE = 1_000_000, 1.0, 4.0
PARTS = ("before-after", "overload")


#: How far past one worker's capacity the Locust load goes (docs/loadtesting.md, "How the
#: Locust load is sized").
PAST = 1.2


def users_for(capacity_rps: float, timeout_s: float) -> int:
    """Closed-loop users whose requests queue ``PAST`` times the timeout on one worker: past it,
    where a single process collapses, while a pool of W shares the queue (0.6 of it on 2)."""
    return max(1, math.ceil(PAST * capacity_rps * timeout_s))


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
        description="One worker vs one worker per core under the same Locust load; "
        "stock Gunicorn's pool vs the kit's past capacity, open loop.",
    )
    p.add_argument(
        "--users",
        type=positive(int),
        help="concurrent users (default: sized from one worker's measured capacity)",
    )
    p.add_argument(
        "--spawn-rate",
        type=positive(float),
        help=f"users started per second (default: all of them in {FULL.ramp_s:g}s)",
    )
    p.add_argument(
        "--duration",
        type=positive(int),
        help=f"seconds per Locust run (default {FULL.duration_s})",
    )
    p.add_argument(
        "--heavy-n", type=positive(int), help=f"work size per request (default {HEAVY_N})"
    )
    p.add_argument(
        "--timeout",
        type=positive(float),
        help=f"client timeout in seconds (default {TIMEOUT_S:g}; whole seconds for the overload)",
    )
    p.add_argument(
        "--multiple",
        type=positive(float),
        default=MULTIPLE,
        help=f"overload: offered rate as a multiple of the pool's capacity (default {MULTIPLE:g})",
    )
    p.add_argument(
        "--overload-duration",
        type=positive(int),
        help=f"seconds of overload arrivals per pool (default {FULL.overload_s})",
    )
    p.add_argument(
        "--only", choices=PARTS, help="run one part: the Locust before/after or the overload"
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
        help=f"a quick check: {SHORT.duration_s}s per Locust run, {SHORT.overload_s}s of "
        "overload (the tests use it)",
    )
    return p.parse_args(argv)


def load_from(args: argparse.Namespace, plan: Plan, capacity_rps: float) -> Load:
    """The Locust load: the options given, the rest sized from one worker's capacity."""
    timeout = args.timeout or TIMEOUT_S
    users = args.users or users_for(capacity_rps, timeout)
    return Load(
        users=users,
        spawn_rate=args.spawn_rate or max(1.0, users / plan.ramp_s),
        duration_s=args.duration or plan.duration_s,
        heavy_n=args.heavy_n or HEAVY_N,
        timeout_s=timeout,
        capacity_rps=capacity_rps,
    )


def before_after(
    args: argparse.Namespace, plan: Plan, budget: CpuBudget
) -> tuple[Load, list[RunResult]]:
    """One worker's capacity, then the Locust load sized from it on one worker and on the
    kit's pool in turn.

    Before is the article's plain single process (stock ``gunicorn -w 1``), not the kit's single
    worker: the article compares a process as a newcomer runs it against the pool, and the kit's
    gates would blur it (a single worker that drops departed clients and refuses what waited too
    long turns timeouts into fast answers, and by Little's law a lower mean latency)."""
    kit, heavy = load_locustfile(), f"/heavy?n={args.heavy_n or HEAVY_N}"
    say("single process: starting gunicorn -w 1 heavyapp:app (the article's plain process)")
    with serving(make_server("single process", args.out, args.port, stock=1)) as single:
        load = load_from(args, plan, capacity(single, heavy, plan))
        say(
            f"  {load.users} users: {load.users / load.capacity_rps:.2f} s of queue for one "
            f"worker, {load.users / load.capacity_rps / budget.usable:.2f} s for "
            f"{budget.usable}, client timeout {load.timeout_s:g} s"
        )
        results = [measure("single process", single, load, kit)]
    say("one per core: starting the server (auto-sized)")
    with serving(make_server("one per core", args.out, args.port)) as pool:
        results.append(measure("one per core", pool, load, kit))
    return load, results


def overload_runs(
    args: argparse.Namespace, plan: Plan, workers: int
) -> tuple[Overload, list[OverloadResult]]:
    """The kit's pool as ``make run`` starts it (its capacity measured first: the base of the
    rate), then stock Gunicorn with as many workers, each under the same open-loop overload.

    The kit is told how long its clients wait, as an operator would: ``HEAVYAPP_QUEUE_TIMEOUT``
    at half the clients' timeout (its default, 2 s, is for clients more patient than 1 s)."""
    heavy_n = args.heavy_n or HEAVY_N
    timeout_s = max(1, round(args.timeout or TIMEOUT_S))
    queue_timeout = {"HEAVYAPP_QUEUE_TIMEOUT": f"{timeout_s / 2:g}"}
    say(f"overload, kit: starting the server (auto-sized, defaults but {queue_timeout})")
    with serving(make_server("overload kit", args.out, args.port, env=queue_timeout)) as kit_pool:
        pool_capacity = capacity(kit_pool, f"/heavy?n={heavy_n}", plan)
        rate = min(MAX_RATE, round(args.multiple * pool_capacity))
        spec = Overload(
            multiple=args.multiple,
            capacity_rps=pool_capacity,
            rate=rate,
            duration_s=args.overload_duration or plan.overload_s,
            timeout_s=timeout_s,
            heavy_n=heavy_n,
            recovery_limit_s=plan.recovery_limit_s,
        )
        results = [overload("kit", kit_pool, spec)]
    say(f"overload, stock Gunicorn: starting gunicorn -w {workers} heavyapp:app")
    with serving(make_server("overload stock", args.out, args.port, stock=workers)) as stock:
        results.insert(0, overload("stock Gunicorn", stock, spec))
    return spec, results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan, budget = SHORT if args.short else FULL, cpu_budget()
    parts = [args.only] if args.only else list(PARTS)
    args.out.mkdir(parents=True, exist_ok=True)
    say(f"usable CPUs: {budget.usable} ({budget.source}); os.cpu_count() says {budget.total}")
    if (busy := psutil.cpu_percent(interval=1.0)) > BUSY_WARNING_PERCENT:
        say(f"warning: the CPUs are already {busy:.0f}% busy before the experiment: other")
        say("  processes will take cores from the pool and blur the comparison; an idle")
        say("  machine measures it")
    load = spec = None
    runs: list[RunResult] = []
    overloads: list[OverloadResult] = []
    try:
        tool("wrk")  # both parts start with a capacity; fail before any server starts
        if "overload" in parts:
            tool("hey")
        if "before-after" in parts:
            load, runs = before_after(args, plan, budget)
        if "overload" in parts:
            spec, overloads = overload_runs(args, plan, budget.usable)
    except (ServerError, FileNotFoundError) as exc:
        print(f"heavyapp-experiment: {exc}", file=sys.stderr)
        return 2
    say("")
    if load:
        say(report.side_by_side(runs))
    if spec:
        say(report.overload_side_by_side(overloads, spec))
    written = report.write(args.out, budget, load=load, runs=runs, spec=spec, overloads=overloads)
    results = {
        "load": load and asdict(load),
        "runs": [asdict(r) for r in runs],
        "overload": spec and asdict(spec),
        "overload_runs": [asdict(r) for r in overloads],
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    say("\n" + "\n".join(f"{kind}: {path}" for kind, path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
