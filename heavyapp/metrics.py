"""The app's Prometheus metrics and ``GET /metrics``, summed across all workers.

Each worker counts in its own file of the multiprocess directory the master prepared
(``workers/metrics.py``); whichever worker answers ``/metrics`` reads every file, so any scrape
sees the whole server. Outside Gunicorn (tests, the Flask dev server) the directory is unset and
the metrics live in this process only.

Requests are labelled by the Flask route (``/heavy``), never the raw path: a client sending
random paths must not create random time series.
"""

from __future__ import annotations

import os
import time

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter(
    "heavyapp_http_requests_total",
    "HTTP requests answered, by route and status code.",
    ["endpoint", "status"],
)
LATENCY = Histogram(
    "heavyapp_http_request_duration_seconds",
    "Time from the app receiving a request to its response, by route.",
    ["endpoint"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
WORK_SIZE = Histogram(
    "heavyapp_heavy_work_size",
    "n counted by GET /heavy (loop iterations).",
    buckets=(1e3, 1e4, 1e5, 1e6, 5e6, 1e7, 2.5e7, 5e7),
)

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    """The Prometheus text format: reads the workers' files, does no heavy work."""
    return Response(generate_latest(_registry()), mimetype=CONTENT_TYPE_LATEST)


def _registry() -> CollectorRegistry:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def _request_started() -> None:
    g.metrics_started = time.perf_counter()


def _request_finished(response: Response) -> Response:
    endpoint = request.url_rule.rule if request.url_rule else "unmatched"
    REQUESTS.labels(endpoint=endpoint, status=str(response.status_code)).inc()
    if "metrics_started" in g:
        LATENCY.labels(endpoint=endpoint).observe(time.perf_counter() - g.metrics_started)
    return response


def instrument(app: Flask) -> None:
    """Count and time every request of ``app`` and serve ``GET /metrics``."""
    app.before_request(_request_started)
    app.after_request(_request_finished)
    app.register_blueprint(bp)


def observe_work(n: int) -> None:
    WORK_SIZE.observe(n)
