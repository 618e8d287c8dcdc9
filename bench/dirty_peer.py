"""Gunicorn's own answer to CPU-heavy work, a peer for ``bench/overload.py``: gthread HTTP
workers hand the count to its dirty-arbiter pool (``dirty_workers``, ``dirty_apps``), a separate
set of processes fed over Unix sockets, so the HTTP workers stay free for cheap requests.

    gunicorn -k gthread --threads 4 -w 2 --dirty-workers 2 \\
        --dirty-app bench.dirty_peer:Counter bench.dirty_peer:app
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, request
from gunicorn.dirty import DirtyApp, get_dirty_client

from heavyapp.work import count

APP = "bench.dirty_peer:Counter"


class Counter(DirtyApp):
    """The example app's count, run in a dirty worker."""

    def __call__(self, action: str, *args: Any, **kwargs: Any) -> Any:
        if action != "count":
            raise ValueError(f"unknown action {action!r}")
        return count(*args, **kwargs)

    def close(self) -> None:
        pass


app = Flask(__name__)


@app.get("/heavy")
def heavy() -> Any:
    n = int(request.args.get("n", "1000000"))
    return jsonify(result=get_dirty_client().execute(APP, "count", n), n=n)


@app.get("/healthz")
def healthz() -> Any:
    return jsonify(status="ok")
