"""Heavy work in native code: numpy, whose BLAS releases the GIL and runs its own threads.

``GET /matmul?size=N`` multiplies two NxN float64 matrices; ``GET /predict?seed=S&k=K`` scores
every row of a read-only model (``HEAVYAPP_MODEL_MB``, built when the app is created, no
download) against a query vector and answers the best ``k``. Both answer the size of the BLAS
thread pool that ran them, as ``threadpoolctl`` sees it in this process.

The model is one numpy array: its data has no per-element reference counts, so under
``preload_app`` the workers share its pages with the master for as long as nobody writes them.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import numpy as np
from flask import Blueprint, Flask, Response, current_app, jsonify, request

from heavyapp.settings import Settings, worker_id
from heavyapp.work import parse_count

bp = Blueprint("native", __name__)

DEFAULT_SIZE = 400
#: Floats per model row: one row is 1 KB of float32.
DIM = 256
DEFAULT_K = 5
MAX_K = 100
MAX_SEED = 2**32 - 1
MODEL = "heavyapp-model"


def build_model(mb: int) -> np.ndarray | None:
    """``mb`` MB of float32 rows, the same on every run (seeded), read-only; None for 0."""
    if mb == 0:
        return None
    rows = mb * 2**20 // (DIM * 4)
    model = np.random.default_rng(0).random((rows, DIM), dtype=np.float32)
    model.flags.writeable = False
    return model


@functools.lru_cache(maxsize=2)
def _operands(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two seeded ``size``x``size`` matrices, kept for the next request of the same size:
    drawing them costs half as much as multiplying them, and the product is the work."""
    rng = np.random.default_rng(size)
    a, b = rng.random((size, size)), rng.random((size, size))
    a.flags.writeable = b.flags.writeable = False
    return a, b


def multiply(size: int) -> float:
    """The checksum of the product of two seeded ``size``x``size`` matrices."""
    a, b = _operands(size)
    return float((a @ b).sum())


@functools.cache
def _blas_pools(pid: int) -> list[Any]:
    """threadpoolctl's handles on this process's BLAS libraries (scanning for them takes a
    millisecond, asking one its size a microsecond); per pid, as a forked worker has its own."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas").lib_controllers


def blas_threads() -> int | None:
    """Threads of this process's BLAS pool, as the library itself reports them now."""
    pools = [lib.num_threads for lib in _blas_pools(os.getpid())]
    return max(pools) if pools else None


def init_app(app: Flask, settings: Settings) -> None:
    """Build the model (once: in the master under ``preload_app``) and add the routes."""
    app.extensions[MODEL] = build_model(settings.model_mb)
    app.register_blueprint(bp)


def _answer(started: float, **facts: object) -> Response:
    return jsonify(
        **facts,
        pid=os.getpid(),
        worker_id=worker_id(),
        blas_threads=blas_threads(),
        elapsed_ms=round((time.perf_counter() - started) * 1000, 3),
    )


@bp.get("/matmul")
def matmul() -> Response:
    settings: Settings = current_app.config["HEAVYAPP"]
    size = parse_count(
        request.args.getlist("size"),
        name="size",
        default=DEFAULT_SIZE,
        maximum=settings.max_matmul_size,
        bound_by="HEAVYAPP_MAX_MATMUL_SIZE",
    )
    started = time.perf_counter()
    checksum = multiply(size)
    return _answer(
        started,
        message=f"The checksum of the {size}x{size} product is {checksum:.6g}",
        result=checksum,
        size=size,
    )


@bp.get("/predict")
def predict() -> Response | tuple[Response, int]:
    model: np.ndarray | None = current_app.extensions[MODEL]
    seed = parse_count(request.args.getlist("seed"), name="seed", default=0, maximum=MAX_SEED)
    k = parse_count(request.args.getlist("k"), name="k", default=DEFAULT_K, maximum=MAX_K)
    if model is None:
        return jsonify(error="no model is loaded: start the server with HEAVYAPP_MODEL_MB > 0"), 503
    started = time.perf_counter()
    query = np.random.default_rng(seed).random(DIM, dtype=np.float32)
    scores = model @ query
    k = min(k, len(scores))
    best = np.argpartition(scores, -k)[-k:] if k else np.empty(0, dtype=np.intp)
    best = best[np.argsort(scores[best])[::-1]]
    return _answer(
        started,
        rows=[int(i) for i in best],
        scores=[float(scores[i]) for i in best],
        seed=seed,
        k=k,
        model_rows=len(model),
    )
