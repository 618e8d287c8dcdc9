"""The kit's Flask side, attached the way Flask extensions attach: ``init_app(app)``.

It gives any Flask app served by the kit
- ``X-Worker-Pid`` and ``X-Worker-Id`` on every response, so a client can tell who answered;
- a JSON 500 for a bug in a view, its traceback logged once and journalled as a crash
  (``workers/crashes.py``), and the worker kept (and JSON for HTTP errors the app does not
  answer itself);
- request counts and latencies by route, and ``GET /metrics`` summed over all workers;
- ``GET /readyz``, the readiness probe that fails while the worker sheds load or the server
  drains.

``HeavyWorker`` calls it on the app it loads, handing over its ``WorkerState`` (readiness and
the accept queue), so ``heavyapp`` itself never imports the kit; calling it yourself as well
changes nothing, and outside the kit (no state) the app is always ready.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from werkzeug.exceptions import HTTPException

from workers import crashes
from workers.gates.queue import RETRY_AFTER
from workers.master.metrics import PoolCollector
from workers.settings import Settings, worker_id
from workers.state import WorkerState

log = logging.getLogger("gunicorn.error")
EXTENSION = "heavyapp-kit"

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

bp = Blueprint("heavyapp_metrics", __name__)


@dataclass(frozen=True)
class Kit:
    """What ``init_app`` attached: the serving worker's state (None outside the kit), and
    whether the metrics are summed over worker processes (a metrics directory is set)."""

    state: WorkerState | None
    multiprocess: bool


def _kit() -> Kit:
    return current_app.extensions[EXTENSION]


@bp.get("/metrics")
def metrics() -> Response:
    """The Prometheus text format: reads every worker's file, does no heavy work.

    Requests are labelled by the Flask route (``/heavy``), never the raw path: a client sending
    random paths must not create random time series.
    """
    return Response(generate_latest(_registry()), mimetype=CONTENT_TYPE_LATEST)


def _registry() -> CollectorRegistry:
    kit = _kit()
    if not kit.multiprocess:  # outside the kit: this process's metrics only
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    if kit.state is not None:
        registry.register(BacklogCollector(kit.state))
    registry.register(PoolCollector())
    return registry


class BacklogCollector:
    """``heavyapp_listen_backlog``, read at scrape time by the worker answering ``/metrics``:
    the accept queue is shared by all workers, so any of them reads the same number, exactly
    when it is asked for (the master has no periodic hook to sample it)."""

    def __init__(self, state: WorkerState) -> None:
        self.state = state

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily(
            "heavyapp_listen_backlog",
            "Connections waiting in the accept queue now (Gunicorn's get_backlog, TCP_INFO).",
            value=self.state.backlog(),
        )


@bp.get("/readyz")
def readyz() -> Response | tuple[Response, int, dict[str, str]]:
    """Readiness: 503 while the worker is not ready (``WorkerState.not_ready_because``: its
    master has begun a graceful stop, ``workers/master/drain.py``, or it sheds load; and, like
    any request, when it waited past ``HEAVYAPP_QUEUE_TIMEOUT``), so a balancer or Kubernetes
    takes the instance out of rotation; ``/healthz`` (liveness) is never shed, so it never
    restarts one."""
    state = _kit().state
    if state is not None and (why := state.not_ready_because) is not None:
        return jsonify(error=why), 503, {"Retry-After": RETRY_AFTER}
    return jsonify(status="ready")


@functools.cache
def _worker_headers(pid: int, wid: str) -> tuple[tuple[str, str], ...]:
    """``X-Worker-Pid`` and ``X-Worker-Id`` (made once per process and id)."""
    return (("X-Worker-Pid", str(pid)), ("X-Worker-Id", wid))


class _Counted:
    """The app's WSGI callable, counted and timed, its answers tagged with the worker.

    A WSGI middleware rather than ``before_request``/``after_request`` hooks:
    the headers go into the plain list the server gets, the route is read from the request
    Flask made (``werkzeug.request``, while its context is still open: Flask starts the answer
    before it pops it), and the time is kept in a local, so the kit's Flask side costs a few
    microseconds a request, error answers included."""

    def __init__(self, wsgi_app: Any) -> None:
        self.wsgi_app = wsgi_app
        self._requests: dict[tuple[str, str], Any] = {}
        self._latency: dict[str, Any] = {}

    def __call__(self, wsgi: dict[str, Any], start_response: Any) -> Any:
        started = time.perf_counter()

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            # Still inside Flask's request context: the request it made names the route.
            self.count(wsgi.get("werkzeug.request"), status[:3], time.perf_counter() - started)
            headers.extend(_worker_headers(os.getpid(), worker_id()))
            return start_response(status, headers, exc_info)

        return self.wsgi_app(wsgi, start)

    def count(self, req: Any, status: str, seconds: float) -> None:
        rule = getattr(req, "url_rule", None)
        endpoint = rule.rule if rule is not None else "unmatched"
        if (counter := self._requests.get((endpoint, status))) is None:
            counter = self._requests[endpoint, status] = REQUESTS.labels(endpoint, status)
        counter.inc()
        if (latency := self._latency.get(endpoint)) is None:
            latency = self._latency[endpoint] = LATENCY.labels(endpoint)
        latency.observe(seconds)


def _unexpected(exc: Exception) -> tuple[Response, int]:
    """A bug in a view: answer 500 JSON, log and journal the traceback once, keep the worker.
    HTTP errors reach here only when the app has no handler of its own for them."""
    if isinstance(exc, HTTPException):
        return jsonify(error=f"{exc.name}: {exc.description}"), exc.code or 500
    log.exception("unhandled exception in %s %s", request.method, request.path)
    wid = worker_id()
    crashes.record(
        crashes.entry(
            "exception",
            os.getpid(),
            int(wid) if wid.isdigit() else None,
            request=f"{request.method} {request.full_path.rstrip('?')}",
            detail=repr(exc),
            traceback=traceback.format_exc(),
        )
    )
    return jsonify(error="internal error; the traceback is in the server log"), 500


def init_app(app: Flask, state: WorkerState | None = None) -> Flask:
    """Attach the kit to ``app`` (once; a second call only hands over ``state`` if given)."""
    if EXTENSION in app.extensions:
        if state is not None:
            app.extensions[EXTENSION] = Kit(state, app.extensions[EXTENSION].multiprocess)
        return app
    app.extensions[EXTENSION] = Kit(state, Settings.from_env().metrics_dir is not None)
    app.wsgi_app = _Counted(app.wsgi_app)  # type: ignore[method-assign]
    app.register_error_handler(Exception, _unexpected)
    app.register_blueprint(bp)
    return app
