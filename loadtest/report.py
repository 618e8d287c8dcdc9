"""The experiment's results as a console table, a Markdown report and a PNG chart."""

from __future__ import annotations

import datetime as dt
import platform
from pathlib import Path
from typing import TYPE_CHECKING

from loadtest.results import Load, RunResult, Sample

if TYPE_CHECKING:
    from workers.master.sizing import CpuBudget

HEADERS = [
    "run",
    "workers",
    "requests",
    "failures",
    "req/s",
    "ok req/s",
    "mean ms",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "server CPU",
    "requests per worker",
]


def _per_worker(result: RunResult) -> str:
    counts = " / ".join(str(row.requests) for row in result.answered_by) or "none"
    unanswered = sum(row.requests for row in result.balance if not row.answered)
    return counts + (f" (+{unanswered} unanswered)" if unanswered else "")


def table_rows(results: list[RunResult]) -> list[list[str]]:
    return [
        [
            r.label,
            str(r.workers),
            str(r.requests),
            f"{r.failures} ({r.failure_ratio:.0%})",
            f"{r.rps:.1f}",
            f"{r.ok_rps:.1f}",
            f"{r.mean_ms:.0f}",
            f"{r.p50_ms:.0f}",
            f"{r.p95_ms:.0f}",
            f"{r.p99_ms:.0f}",
            f"{r.server_cpu:.2f} cores",
            _per_worker(r),
        ]
        for r in results
    ]


def side_by_side(results: list[RunResult]) -> str:
    """The console table: columns padded to their widest cell."""
    rows = [HEADERS, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: list[RunResult]) -> str:
    rows = [HEADERS, ["---"] * len(HEADERS), *table_rows(results)]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def verdict(single: RunResult, pool: RunResult) -> str:
    """One sentence comparing the runs, in numbers."""
    return (
        f"One worker per core answered {pool.ok_rps:.1f} requests/s correctly and in time, "
        f"a single process {single.ok_rps:.1f} (of {single.rps:.1f} requests/s sent to it); "
        f"failures went from {single.failure_ratio:.0%} to {pool.failure_ratio:.0%} and the mean "
        f"latency from {single.mean_ms:.0f} ms to {pool.mean_ms:.0f} ms."
    )


def markdown(results: list[RunResult], load: Load, budget: CpuBudget, chart: str) -> str:
    single, pool = results
    balance = "\n".join(
        f"- {r.label}: "
        + ", ".join(
            f"worker {row.worker_id} (pid {row.pid}) {row.requests} ({row.share:.0%})"
            if row.answered
            else f"no answer {row.requests} ({row.share:.0%})"
            for row in r.balance
        )
        for r in results
    )
    when = f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
    return f"""# heavyapp experiment: one process vs one per core

{when} on {platform.node()}, Python {platform.python_version()}.
Usable CPUs: **{budget.usable}** ({budget.source}; `os.cpu_count()` says {budget.total}).

Load, the same for both runs (Locust `FastHttpUser`, closed loop, no wait between requests): \
{load.users} users started at {load.spawn_rate:g}/s, {load.duration_s} s per run, \
`GET /heavy?n={load.heavy_n}`, client timeout {load.timeout_s:g} s (a later answer is a failure, \
as with the original article's load tester).

{markdown_table(results)}

{verdict(single, pool)}

- "ok req/s" counts only correct answers in time; latency percentiles are Locust's (rounded) and
  include the failed requests, which end at the timeout.
- "server CPU" is the CPU time the Gunicorn workers used per second of load. Meanwhile all the
  machine's CPUs were {single.machine_busy:.0%} busy during the first run and \
{pool.machine_busy:.0%} during the second (the load generator and any neighbours included): on a
  busy machine the pool cannot get the cores it was sized for.

Requests per Gunicorn worker (from the `X-Worker-Id` / `X-Worker-Pid` headers):

{balance}

![latency, throughput and balance]({chart})

Reproduce: `python -m loadtest.experiment --users {load.users} --spawn-rate {load.spawn_rate:g} \
--duration {load.duration_s} --heavy-n {load.heavy_n} --timeout {load.timeout_s:g}`
"""


def per_second(history: list[Sample]) -> tuple[list[float], list[float], list[float]]:
    """From running totals: each interval's end time, answered-in-time/s and failed/s."""
    times, answered, failed = [], [], []
    previous = Sample(0.0, 0, 0)
    for s in history:
        seconds = s.elapsed_s - previous.elapsed_s
        if seconds > 0:
            fails = (s.failures - previous.failures) / seconds
            times.append(s.elapsed_s)
            failed.append(fails)
            answered.append((s.requests - previous.requests) / seconds - fails)
        previous = s
    return times, answered, failed


def chart(results: list[RunResult], load: Load, path: Path) -> None:
    """Latency, throughput, throughput over time and per-worker requests, one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ["#d62728", "#2ca02c"]
    fig, ((lat, thr), (hist, bal)) = plt.subplots(2, 2, figsize=(12, 8.5))
    fig.suptitle(
        f"{load.users} users, GET /heavy?n={load.heavy_n:,}, client timeout {load.timeout_s:g} s",
        fontsize=13,
    )
    width = 0.38

    names = ["mean", "p50", "p95", "p99"]
    for i, r in enumerate(results):
        values = [r.mean_ms, r.p50_ms, r.p95_ms, r.p99_ms]
        xs = [x + (i - 0.5) * width for x in range(len(names))]
        label = f"{r.label} ({r.workers} worker{'s' if r.workers > 1 else ''})"
        bars = lat.bar(xs, values, width, label=label, color=colors[i])
        lat.bar_label(bars, fmt="%.0f", fontsize=8)
    lat.axhline(
        load.timeout_s * 1000, color="grey", linestyle="--", linewidth=1, label="client timeout"
    )
    top = max(load.timeout_s * 1000, *(r.p99_ms for r in results), *(r.mean_ms for r in results))
    lat.set_ylim(0, top * 1.3)
    lat.set_xticks(range(len(names)), names)
    lat.set_ylabel("response time (ms)")
    lat.set_title("Latency (lower is better)")
    lat.legend(loc="upper center", ncols=3, fontsize=8)

    labels = [f"{r.label}\n({r.workers} worker{'s' if r.workers > 1 else ''})" for r in results]
    ok = [r.ok_rps for r in results]
    failed = [r.rps - r.ok_rps for r in results]
    thr.bar(labels, ok, color=colors, label="answered in time")
    thr.bar(labels, failed, bottom=ok, color="lightgrey", hatch="//", label="failed")
    for x, r in enumerate(results):
        thr.text(
            x, r.rps, f"{r.rps:.1f} req/s\n{r.failure_ratio:.0%} failed", ha="center", va="bottom"
        )
    thr.set_ylim(0, max(r.rps for r in results) * 1.45)
    thr.set_ylabel("requests/s")
    thr.set_title("Throughput (higher is better)")
    thr.legend(loc="upper center", ncols=2)

    for i, r in enumerate(results):
        times, answered, failed = per_second(r.history)
        hist.plot(
            times, answered, color=colors[i], marker=".", label=f"{r.label}: answered in time"
        )
        hist.plot(times, failed, color=colors[i], linestyle=":", label=f"{r.label}: failed")
    hist.set_ylim(0, hist.get_ylim()[1] * 1.35)
    hist.set_xlabel("seconds into the run")
    hist.set_ylabel("requests completed per second")
    hist.set_title("Over time")
    hist.legend(loc="upper center", ncols=2, fontsize=8)

    xs, heights, bar_colors, ticks = [], [], [], []
    x = 0
    for i, r in enumerate(results):
        for row in r.balance:
            xs.append(x)
            heights.append(row.requests)
            bar_colors.append(colors[i] if row.answered else "lightgrey")
            ticks.append(
                f"{'single' if i == 0 else 'per core'}\n"
                + (f"worker {row.worker_id}" if row.answered else "no answer")
            )
            x += 1
        x += 0.5
    bars = bal.bar(xs, heights, color=bar_colors)
    bal.bar_label(bars, fontsize=8)
    bal.set_xticks(xs, ticks, fontsize=8)
    bal.set_ylabel("requests")
    bal.set_title("Requests per Gunicorn worker")

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(out: Path, results: list[RunResult], load: Load, budget: CpuBudget) -> tuple[Path, Path]:
    """``report.md`` and ``experiment.png`` in ``out``; their paths."""
    png, md = out / "experiment.png", out / "report.md"
    chart(results, load, png)
    md.write_text(markdown(results, load, budget, png.name))
    return md, png
