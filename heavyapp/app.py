"""The application factory: routes, JSON errors and the worker headers on every response."""

from __future__ import annotations

import logging
import os
import time
import traceback

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from heavyapp import chaos, metrics
from heavyapp.settings import Settings
from heavyapp.work import BadParameter, count, parse_count
from workers import crashes
from workers.settings import worker_id

log = logging.getLogger("gunicorn.error")


def create_app(settings: Settings | None = None) -> Flask:
    app = Flask(__name__)
    app.config["HEAVYAPP"] = settings = settings or Settings.from_env()

    if settings.chaos:
        log.warning("HEAVYAPP_CHAOS=1: /chaos/* endpoints are enabled; never do this in production")
        app.register_blueprint(chaos.bp)
    metrics.instrument(app)

    @app.get("/heavy")
    def heavy() -> Response:
        n = parse_count(
            request.args.getlist("n"),
            name="n",
            default=settings.default_n,
            maximum=settings.max_n,
            bound_by="HEAVYAPP_MAX_N",
        )
        started = time.perf_counter()
        total = count(n)
        metrics.observe_work(n)
        return jsonify(
            message=f"The result of the CPU intensive task is {total}",
            result=total,
            n=n,
            pid=os.getpid(),
            worker_id=worker_id(),
            elapsed_ms=round((time.perf_counter() - started) * 1000, 3),
        )

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok", pid=os.getpid(), worker_id=worker_id())

    @app.errorhandler(BadParameter)
    def bad_parameter(exc: BadParameter) -> tuple[Response, int]:
        return jsonify(error=str(exc)), 400

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        return jsonify(error=f"{exc.name}: {exc.description}"), exc.code or 500

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        """A bug in a view: answer 500 JSON, log and journal the traceback once, keep the worker."""
        log.exception("unhandled exception in %s %s", request.method, request.path)
        crashes.record(
            crashes.entry(
                "exception",
                os.getpid(),
                int(worker_id()) if worker_id().isdigit() else None,
                request=f"{request.method} {request.full_path.rstrip('?')}",
                detail=repr(exc),
                traceback=traceback.format_exc(),
            )
        )
        return jsonify(error="internal error; the traceback is in the server log"), 500

    @app.after_request
    def worker_headers(response: Response) -> Response:
        response.headers["X-Worker-Pid"] = str(os.getpid())
        response.headers["X-Worker-Id"] = worker_id()
        return response

    return app
