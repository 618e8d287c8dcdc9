"""The application factory: the routes and the app's own JSON errors.

The app knows nothing of the kit: any WSGI server runs it. Served by the kit, it also gets the
worker headers, a journalled JSON 500 for a bug in a view and ``/metrics``
(``workers/flask_ext.py`` attaches them to the loaded app).
"""

from __future__ import annotations

import logging
import os
import time

from flask import Flask, Response, jsonify, request
from prometheus_client import Histogram
from werkzeug.exceptions import BadRequest, HTTPException, UnsupportedMediaType

from heavyapp import chaos, native
from heavyapp.settings import Settings, worker_id
from heavyapp.work import BadParameter, count, json_count, parse_count

log = logging.getLogger("gunicorn.error")

WORK_SIZE = Histogram(
    "heavyapp_heavy_work_size",
    "n counted by /heavy (loop iterations).",
    buckets=(1e3, 1e4, 1e5, 1e6, 5e6, 1e7, 2.5e7, 5e7),
)


def create_app(settings: Settings | None = None) -> Flask:
    app = Flask(__name__)
    app.config["HEAVYAPP"] = settings = settings or Settings.from_env()

    if settings.chaos:
        log.warning("HEAVYAPP_CHAOS=1: /chaos/* endpoints are enabled; never do this in production")
        app.register_blueprint(chaos.bp)
    native.init_app(app, settings)  # /matmul, /predict, and the model if there is one

    def work(n: int) -> Response:
        started = time.perf_counter()
        total = count(n)
        WORK_SIZE.observe(n)
        return jsonify(
            message=f"The result of the CPU intensive task is {total}",
            result=total,
            n=n,
            pid=os.getpid(),
            worker_id=worker_id(),
            elapsed_ms=round((time.perf_counter() - started) * 1000, 3),
        )

    bounds = {"name": "n", "default": settings.default_n, "maximum": settings.max_n}

    @app.get("/heavy")
    def heavy() -> Response:
        return work(parse_count(request.args.getlist("n"), bound_by="HEAVYAPP_MAX_N", **bounds))

    @app.post("/heavy")
    def heavy_json() -> Response:
        """The same work for a JSON body ``{"n": N}``: how a service takes real input."""
        if not request.is_json:
            raise UnsupportedMediaType("send the body as application/json")
        payload = request.get_json(silent=True)
        if payload is None:
            raise BadRequest("the body is not valid JSON")
        return work(json_count(payload, bound_by="HEAVYAPP_MAX_N", **bounds))

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok", pid=os.getpid(), worker_id=worker_id())

    @app.errorhandler(BadParameter)
    def bad_parameter(exc: BadParameter) -> tuple[Response, int]:
        return jsonify(error=str(exc)), 400

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        return jsonify(error=f"{exc.name}: {exc.description}"), exc.code or 500

    return app
