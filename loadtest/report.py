"""The experiment's results as console tables, a Markdown report and PNG charts."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

from loadtest.results import Load, Overload, OverloadResult, RunResult, Sample

if TYPE_CHECKING:
    from workers.master.sizing import CpuBudget

HEADERS = [
    "run",
    "workers",
    "requests",
    "not served in time",
    "failed",
    "refused",
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
            f"{r.not_in_time} ({r.not_in_time_ratio:.0%})",
            f"{r.failures} ({r.failure_ratio:.0%})",
            f"{r.refused} ({r.refused / r.requests if r.requests else 0:.0%})",
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


def padded(headers: list[str], body: list[list[str]]) -> str:
    """A console table: columns padded to their widest cell."""
    rows = [headers, *body]
    widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pipes(headers: list[str], body: list[list[str]]) -> str:
    """A Markdown table."""
    rows = [headers, ["---"] * len(headers), *body]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def side_by_side(results: list[RunResult]) -> str:
    return padded(HEADERS, table_rows(results))


OVERLOAD_HEADERS = [
    "pool",
    "workers",
    "offered req/s",
    "sent",
    "served in time",
    "goodput req/s",
    "goodput / capacity",
    "refused (503)",
    "timed out",
    "other",
    "median ms",
    "p95 ms",
    "recovery s",
]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def overload_rows(results: list[OverloadResult], spec: Overload) -> list[list[str]]:
    return [
        [
            r.label,
            str(r.workers),
            str(spec.rate),
            str(r.sent),
            str(r.served),
            f"{r.goodput_rps:.1f}",
            f"{r.goodput_rps / spec.capacity_rps:.2f}",
            str(r.refused),
            f"{r.timeouts} ({r.timeouts / max(1, r.sent):.0%})",
            str(r.other),
            _ms(r.p50_ms),
            _ms(r.p95_ms),
            f"> {spec.recovery_limit_s:g}" if r.recovery_s is None else f"{r.recovery_s:.1f}",
        ]
        for r in results
    ]


def overload_side_by_side(results: list[OverloadResult], spec: Overload) -> str:
    return padded(OVERLOAD_HEADERS, overload_rows(results, spec))


def comparison(single: RunResult, pool: RunResult) -> str:
    """One sentence comparing the runs, in numbers."""
    return (
        f"One worker per core answered {pool.ok_rps:.1f} requests/s correctly and in time, "
        f"a single process {single.ok_rps:.1f} (of {single.rps:.1f} requests/s sent to it); "
        f"requests not served in time went from {single.not_in_time_ratio:.0%} to "
        f"{pool.not_in_time_ratio:.0%} (failed {single.failures} -> {pool.failures}, refused "
        f"{single.refused} -> {pool.refused}) and the mean latency from {single.mean_ms:.0f} ms "
        f"to {pool.mean_ms:.0f} ms ({pool.mean_ms / single.mean_ms if single.mean_ms else 0:.2f}x)."
    )


def markdown(results: list[RunResult], load: Load, chart: str) -> str:
    """The before/after section."""
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
    sized = (
        f"One worker's capacity, measured first (`wrk`, a closed loop saturating it): "
        f"**{load.capacity_rps:.1f} requests/s**, so {load.users} users queue "
        f"{load.users / load.capacity_rps:.2f} s behind each other on one worker and "
        f"{load.users / load.capacity_rps / pool.workers:.2f} s on {pool.workers}."
        if load.capacity_rps
        else ""
    )
    return f"""## One process vs one per core

Load, the same for both runs (Locust `FastHttpUser`, closed loop, no wait between requests): \
{load.users} users started at {load.spawn_rate:g}/s, {load.duration_s} s per run, \
`GET /heavy?n={load.heavy_n}`, client timeout {load.timeout_s:g} s (a later answer is a failure, \
as with the original article's load tester). {sized}

{pipes(HEADERS, table_rows(results))}

{comparison(single, pool)}

- "not served in time" is every request a user did not get answered correctly within the
  timeout: "failed" (timeouts, errors, wrong answers) plus "refused" (the fast `503` +
  `Retry-After` answers of a kit that sheds); "ok req/s" counts the rest. Latency percentiles
  are Locust's (rounded) and include the failed requests, which end at the timeout, and the
  refusals, which end at once — so a server that refuses looks faster than one that times out
  (Little's law: in a closed loop the mean latency is users / throughput).
- Before: the article's plain single process, `gunicorn -w 1 heavyapp:app` — no kit, so
  nothing refused and no worker headers (its answers are checked for status and body only).
  After: the kit as `make run` starts it, one worker per usable core, default settings.
- "server CPU" is the CPU time the Gunicorn workers used per second of load. Meanwhile all the
  machine's CPUs were {single.machine_busy:.0%} busy during the first run and \
{pool.machine_busy:.0%} during the second (the load generator and any neighbours included): on a
  busy machine the pool cannot get the cores it was sized for.

Requests per Gunicorn worker (from the `X-Worker-Id` / `X-Worker-Pid` headers):

{balance}

![latency, throughput and balance]({chart})

Reproduce: `python -m loadtest.experiment --users {load.users} --spawn-rate {load.spawn_rate:g} \
--duration {load.duration_s} --heavy-n {load.heavy_n} --timeout {load.timeout_s:g} \
--only before-after`
"""


def overload_markdown(results: list[OverloadResult], spec: Overload, chart: str) -> str:
    """The overload section."""
    return f"""## Past capacity: stock Gunicorn's pool vs the kit's

Capacity of the kit's pool, measured first (`wrk`, a closed loop saturating it): \
**{spec.capacity_rps:.1f} requests/s**. Each pool in turn (the other one stopped) then got \
{spec.multiple:g}x that, **{spec.rate} requests/s** for {spec.duration_s} s, open loop (`hey`: \
new requests arrive whatever happened to the earlier ones, as a public service's users do), \
`GET /heavy?n={spec.heavy_n}`, client timeout {spec.timeout_s} s. Stock is \
`gunicorn -w W heavyapp:app`; the kit runs as `make run` starts it (default settings).

{pipes(OVERLOAD_HEADERS, overload_rows(results, spec))}

- Every request sent is exactly one of: served in time (2xx within the timeout: goodput is
  those per second of load), refused (`503`, the server's answer at once that it will not
  serve it), timed out (no answer within the timeout, or a connection error) or other (any
  other status, or a 2xx a few ms past hey's timer).
- Median and p95 are of the answers, served or refused: how long a client waited to hear
  anything. Recovery: from the end of the run until `/healthz` answered within \
{spec.timeout_s} s again (a server still working off a queue of requests whose clients left).

![outcomes, answer latency and recovery]({chart})

Reproduce: `python -m loadtest.experiment --multiple {spec.multiple:g} \
--overload-duration {spec.duration_s} --heavy-n {spec.heavy_n} --timeout {spec.timeout_s} \
--only overload`
"""


def per_second(history: list[Sample]) -> tuple[list[float], list[float], list[float]]:
    """From running totals: each interval's end time, answered-in-time/s and failed or
    refused/s."""
    times, answered, failed = [], [], []
    previous = Sample(0.0, 0, 0)
    for s in history:
        seconds = s.elapsed_s - previous.elapsed_s
        if seconds > 0:
            lost = s.failures + s.refused - previous.failures - previous.refused
            times.append(s.elapsed_s)
            failed.append(lost / seconds)
            answered.append((s.requests - previous.requests - lost) / seconds)
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
    refused = [r.rps * r.refused / r.requests if r.requests else 0.0 for r in results]
    failed = [r.rps - o - f for r, o, f in zip(results, ok, refused, strict=True)]
    thr.bar(labels, ok, color=colors, label="answered in time")
    thr.bar(labels, refused, bottom=ok, color="#1f77b4", label="refused (503)")
    above = [o + f for o, f in zip(ok, refused, strict=True)]
    thr.bar(labels, failed, bottom=above, color="lightgrey", hatch="//", label="failed")
    for x, r in enumerate(results):
        thr.text(
            x,
            r.rps,
            f"{r.rps:.1f} req/s\n{r.not_in_time_ratio:.0%} not served in time",
            ha="center",
            va="bottom",
        )
    thr.set_ylim(0, max(r.rps for r in results) * 1.45)
    thr.set_ylabel("requests/s")
    thr.set_title("Throughput (higher is better)")
    thr.legend(loc="upper center", ncols=3, fontsize=8)

    for i, r in enumerate(results):
        times, answered, failed = per_second(r.history)
        hist.plot(
            times, answered, color=colors[i], marker=".", label=f"{r.label}: answered in time"
        )
        hist.plot(
            times, failed, color=colors[i], linestyle=":", label=f"{r.label}: failed or refused"
        )
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


def overload_chart(results: list[OverloadResult], spec: Overload, path: Path) -> None:
    """What became of the requests, how long answers took, how long recovery took."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (outcomes, latency, recovery) = plt.subplots(1, 3, figsize=(14, 5))
    fig.suptitle(
        f"{spec.rate} req/s offered ({spec.multiple:g}x the pool's capacity of "
        f"{spec.capacity_rps:.0f}) for {spec.duration_s} s, open loop, "
        f"client timeout {spec.timeout_s} s",
        fontsize=13,
    )
    labels = [f"{r.label}\n({r.workers} workers)" for r in results]
    bottom = [0.0] * len(results)
    parts = [
        ("served in time", "served", "#2ca02c", ""),
        ("refused (503)", "refused", "#1f77b4", ""),
        ("other", "other", "#ff7f0e", ""),
        ("timed out", "timeouts", "lightgrey", "//"),
    ]
    for name, field, color, hatch in parts:
        per_s = [getattr(r, field) / spec.duration_s for r in results]
        outcomes.bar(labels, per_s, bottom=bottom, color=color, hatch=hatch, label=name)
        bottom = [b + v for b, v in zip(bottom, per_s, strict=True)]
    outcomes.axhline(spec.capacity_rps, color="black", linestyle="--", linewidth=1)
    outcomes.text(-0.4, spec.capacity_rps, " capacity", va="bottom", fontsize=8)
    outcomes.set_ylim(0, max(bottom) * 1.3)
    outcomes.set_ylabel("requests per second of load")
    outcomes.set_title("What became of the requests")
    outcomes.legend(loc="upper center", ncols=2, fontsize=8)

    width = 0.38
    for i, (name, key) in enumerate([("median", "p50_ms"), ("p95", "p95_ms")]):
        values = [getattr(r, key) or 0.0 for r in results]
        xs = [x + (i - 0.5) * width for x in range(len(results))]
        bars = latency.bar(xs, values, width, label=name, color=["#9467bd", "#c5b0d5"][i])
        latency.bar_label(bars, fmt="%.0f", fontsize=8)
    latency.axhline(spec.timeout_s * 1000, color="grey", linestyle="--", label="client timeout")
    latency.set_xticks(range(len(results)), labels)
    latency.set_ylim(0, spec.timeout_s * 1000 * 1.4)
    latency.set_ylabel("ms until any answer (served or refused)")
    latency.set_title("Answer latency (lower is better)")
    latency.legend(loc="upper center", ncols=3, fontsize=8)

    seconds = [spec.recovery_limit_s if r.recovery_s is None else r.recovery_s for r in results]
    bars = recovery.bar(labels, seconds, color="#8c564b")
    recovery.bar_label(
        bars,
        [
            f"> {s:g}" if r.recovery_s is None else f"{s:.1f}"
            for r, s in zip(results, seconds, strict=True)
        ],
        fontsize=9,
    )
    recovery.set_ylim(0, max(1.0, *seconds) * 1.25)
    recovery.set_ylabel("seconds after the load stopped")
    recovery.set_title("Until /healthz answers in time (lower is better)")

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(
    out: Path,
    budget: CpuBudget,
    *,
    load: Load | None,
    runs: list[RunResult],
    spec: Overload | None,
    overloads: list[OverloadResult],
) -> list[tuple[str, Path]]:
    """``report.md`` in ``out`` with a section and a chart per part that ran; what was
    written, by kind."""
    md = out / "report.md"
    when = f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
    sections = [
        f"""# heavyapp experiment

{when} on {platform.node()}, Python {platform.python_version()}.
Usable CPUs: **{budget.usable}** ({budget.source}; `os.cpu_count()` says {budget.total}).
Load average at the end: {" ".join(f"{x:.1f}" for x in os.getloadavg())}.
"""
    ]
    written = [("report", md)]
    if load:
        png = out / "experiment.png"
        chart(runs, load, png)
        sections.append(markdown(runs, load, png.name))
        written.append(("chart", png))
    if spec:
        png = out / "overload.png"
        overload_chart(overloads, spec, png)
        sections.append(overload_markdown(overloads, spec, png.name))
        written.append(("overload chart", png))
    md.write_text("\n".join(sections))
    return written
