"""Write deploy/grafana/heavyapp-dashboard.json: the pool at a glance, for Grafana to import as is.

Built with grafana-foundation-sdk (Grafana's own typed builders, generated from its schemas), so
a misspelt field fails here, not in Grafana; the JSON is committed so nobody needs the library
to import it. Run it after changing a panel: ``python deploy/grafana/dashboard.py``;
tests/test_alerts.py fails while the two differ, and checks every name the panels query.

The data source is a variable (``$datasource``, any Prometheus), and ``$job``/``$instance``
pick the servers, so the same file works wherever it is imported.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from grafana_foundation_sdk.builders import common, dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    LegendDisplayMode,
    LegendPlacement,
    SortOrder,
    TooltipDisplayMode,
)
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

TARGET = Path(__file__).resolve().parent / "heavyapp-dashboard.json"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
SERVERS = 'job=~"$job", instance=~"$instance"'
TRAFFIC = f'{SERVERS}, endpoint!~"/metrics|/healthz|/readyz"'  # probes and scrapes are not load
RATE = "$__rate_interval"
_ids = itertools.count(1)


def panel(title: str, unit: str, description: str, *queries: tuple[str, str]) -> timeseries.Panel:
    """A time series of ``queries`` (expression, legend), 12 columns wide, 8 rows high."""
    built = (
        timeseries.Panel()
        .id(next(_ids))
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .span(12)
        .height(8)
        .legend(
            common.VizLegendOptions()
            .display_mode(LegendDisplayMode.LIST)
            .placement(LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(
            common.VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING)
        )
    )
    for ref, (expr, legend) in zip("ABCDEFGH", queries, strict=False):
        built = built.with_target(
            prometheus.Dataquery()
            .expr(expr)
            .legend_format(legend)
            .ref_id(ref)
            .datasource(DATASOURCE)
        )
    return built


def quantiles(histogram: str, selector: str) -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by (instance, le) "
            f"(rate({histogram}_bucket{{{selector}}}[{RATE}])))",
            f"p{round(q * 100)} {{{{instance}}}}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


PANELS = [
    panel(
        "Pool: workers alive and target",
        "short",
        "Workers alive (twice the pool for a moment during a reload) and the count the master "
        "keeps (heavyctl scale, TTIN/TTOU).",
        (f"heavyapp_workers{{{SERVERS}}}", "alive {{instance}}"),
        (f"heavyapp_workers_target{{{SERVERS}}}", "target {{instance}}"),
    ),
    panel(
        "Requests by status",
        "reqps",
        "Answers of the app per second by status code (probes and scrapes left out).",
        (
            f"sum by (status) (rate(heavyapp_http_requests_total{{{TRAFFIC}}}[{RATE}]))",
            "{{status}}",
        ),
    ),
    panel(
        "5xx and refused share",
        "percentunit",
        "The availability objective's errors: 5xx answers as a share of the app's answers, and "
        "requests a gate refused or dropped as a share of all offered (the error-budget alerts "
        "watch their sum).",
        (
            f'sum by (instance) (rate(heavyapp_http_requests_total{{{TRAFFIC}, status=~"5.."}}'
            f"[{RATE}])) / (sum by (instance) (rate(heavyapp_http_requests_total{{{TRAFFIC}}}"
            f"[{RATE}])) > 0)",
            "5xx {{instance}}",
        ),
        (
            f"sum by (instance) (rate(heavyapp_shed_total{{{SERVERS}}}[{RATE}])) / (sum by "
            f"(instance) (rate(heavyapp_http_requests_total{{{TRAFFIC}}}[{RATE}])) + sum by "
            f"(instance) (rate(heavyapp_shed_total{{{SERVERS}}}[{RATE}])) > 0)",
            "refused {{instance}}",
        ),
    ),
    panel(
        "Latency in the app (p50, p95, p99)",
        "s",
        "Time from the app receiving a request to its response (probes and scrapes left out).",
        *quantiles("heavyapp_http_request_duration_seconds", TRAFFIC),
    ),
    panel(
        "Queue wait (p50, p95, p99)",
        "s",
        "Kernel-timed wait from a request's first bytes to a worker picking it up.",
        *quantiles("heavyapp_queue_wait_seconds", SERVERS),
    ),
    panel(
        "Refusals by reason",
        "reqps",
        "Requests refused before the app (queue-timeout, queue-growing: answered 503) or dropped "
        "(client-gone: the client left first).",
        (
            f"sum by (reason) (rate(heavyapp_shed_total{{{SERVERS}}}[{RATE}]))",
            "{{reason}}",
        ),
    ),
    panel(
        "Worker exits by cause",
        "short",
        "Workers that left per interval: planned (reload, scale-down, recycle, stopped) and "
        "crashes (killed, timeout, fatal-signal, exit); restarts the crash-loop delay held back.",
        (
            f"sum by (cause, planned) (increase(heavyapp_worker_exits_total{{{SERVERS}}}"
            f"[{RATE}])) > 0",
            "{{cause}} (planned={{planned}})",
        ),
        (
            f"sum by (instance) (increase(heavyapp_worker_restart_delays_total{{{SERVERS}}}"
            f"[{RATE}])) > 0",
            "held back by the crash-loop delay {{instance}}",
        ),
    ),
    panel(
        "Saturation: busy share and accept queue",
        "percentunit",
        "Share of the time the workers spend in the app (every route) and the accept queue's "
        "depth over its limit: the saturation alerts' two figures.",
        (
            f"sum by (instance) (rate(heavyapp_http_request_duration_seconds_sum{{{SERVERS}}}"
            f"[{RATE}])) / sum by (instance) (heavyapp_workers_target{{{SERVERS}}} > 0)",
            "busy {{instance}}",
        ),
        (
            f"heavyapp_listen_backlog{{{SERVERS}}} / (heavyapp_listen_backlog_limit"
            f"{{{SERVERS}}} > 0)",
            "accept queue {{instance}}",
        ),
    ),
    panel(
        "Native threads per worker",
        "short",
        "OS threads of each worker: 1 plus its native pools (OpenBLAS, OpenMP) within the kit's "
        "per-worker budget.",
        (f"heavyapp_worker_threads{{{SERVERS}}}", "worker {{worker_id}} {{instance}}"),
    ),
    panel(
        "Memory per worker (resident)",
        "bytes",
        "Resident memory of each worker, what HEAVYAPP_MAX_RSS_MB compares (pages shared with "
        "the master under preload count in each).",
        (f"heavyapp_worker_resident_bytes{{{SERVERS}}}", "worker {{worker_id}} {{instance}}"),
    ),
]


def build() -> dict:
    board = (
        dashboard.Dashboard("heavyapp: pool")
        .uid("heavyapp-pool")
        .description("A heavyapp (Gunicorn) pool: workers, traffic, latency, queue, refusals.")
        .tags(["heavyapp", "gunicorn"])
        .time("now-1h", "now")
        .refresh("30s")
        .with_variable(
            dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(
            dashboard.QueryVariable("job")
            .label("Job")
            .datasource(DATASOURCE)
            .query("label_values(heavyapp_workers_target, job)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .include_all(True)
            .multi(True)
        )
        .with_variable(
            dashboard.QueryVariable("instance")
            .label("Instance")
            .datasource(DATASOURCE)
            .query('label_values(heavyapp_workers_target{job=~"$job"}, instance)')
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .include_all(True)
            .multi(True)
        )
    )
    for p in PANELS:
        board = board.with_panel(p)
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    TARGET.write_text(render())
    print(f"wrote {TARGET}")
