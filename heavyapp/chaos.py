"""Chaos endpoints: ways to break a worker on purpose, for demonstrations and tests.

Registered ONLY when ``HEAVYAPP_CHAOS=1``; otherwise these paths do not exist (404). Never enable
them in production: any client could kill your workers.
"""

from __future__ import annotations

import ctypes
import os
import time

from flask import Blueprint, Response, jsonify, request

from heavyapp.work import parse_count

bp = Blueprint("chaos", __name__, url_prefix="/chaos")

#: Exit code of ``/chaos/exit``: not 3 or 4, which would make Gunicorn halt the whole server.
EXIT_CODE = 13
#: Memory kept alive by ``/chaos/leak``, as a real leak would.
_leaked: list[bytearray] = []


@bp.post("/exit")
def exit_hard() -> Response:
    """``os._exit``: no cleanup, no answer — the master sees only an exit code."""
    os._exit(EXIT_CODE)


@bp.post("/segfault")
def segfault() -> Response:
    """A real SIGSEGV from C: read address 0."""
    ctypes.string_at(0)
    return jsonify(error="still alive after a segfault?"), 500  # pragma: no cover


@bp.post("/exception")
def exception() -> Response:
    """A bug in a view: the app answers 500 JSON, logs and journals it, and the worker lives on."""
    raise RuntimeError("chaos: an exception was requested")


@bp.post("/hang")
def hang() -> Response:
    """Sleep past Gunicorn's timeout (at most ``seconds``, default 3600) so the master kills it."""
    seconds = parse_count(
        request.args.getlist("seconds"), name="seconds", default=3600, maximum=3600
    )
    time.sleep(seconds)
    return jsonify(slept=seconds)


@bp.post("/leak")
def leak() -> Response:
    """Keep ``mb`` MB (default 64) referenced forever, as a leak would."""
    mb = parse_count(request.args.getlist("mb"), name="mb", default=64, maximum=4096)
    _leaked.append(bytearray(os.urandom(1)) * (mb * 2**20))
    return jsonify(leaked_mb=mb, total_mb=sum(len(b) for b in _leaked) // 2**20)
