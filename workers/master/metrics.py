"""The master's Prometheus metrics, and the multiprocess directory every process writes into.

Gunicorn runs one process per worker, so each worker counts its own requests in its own file
(``prometheus_client``'s multiprocess mode) and ``GET /metrics`` sums the files of all of them.
The master adds what only it knows: workers started, why each one left, how many are live.

``prometheus_client`` picks its storage when first imported: in-memory unless
``PROMETHEUS_MULTIPROC_DIR`` is set. So the master imports it only after ``master_starting`` set the
variable (client_python #127), and the workers inherit both the variable and the choice.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

from workers.settings import SettingsError, run_dir

DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
#: Set once the directory is prepared; no metric may be created (or imported) before.
_ready = threading.Event()


def metrics_dir(env: Mapping[str, str] = os.environ) -> Path:
    """``PROMETHEUS_MULTIPROC_DIR`` if the operator chose one, else ``<run dir>/metrics``."""
    return Path(env[DIR_VARIABLE]) if env.get(DIR_VARIABLE) else run_dir(env) / "metrics"


def master_starting(target: int, fresh: bool = True) -> Path:
    """From ``on_starting``: an empty directory, named in the environment the workers inherit.

    Files left by a previous run would be summed into this one's counters, so a ``fresh``
    master removes them (a USR2 re-exec is not fresh: the old master's workers still count).
    ``preload_app`` imports the app, and so ``prometheus_client``, before this runs: that only
    works when the operator named the directory beforehand.
    """
    if "prometheus_client" in sys.modules and not os.environ.get(DIR_VARIABLE):
        raise SettingsError(
            "prometheus_client was imported in the master before the metrics directory was set "
            "(by preload_app, or by gunicorn_conf.py or a module it imports), so /metrics would "
            f"see one worker only; set {DIR_VARIABLE} to an empty directory"
        )
    path = metrics_dir()
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db") if fresh else ():
        stale.unlink()
    os.environ[DIR_VARIABLE] = str(path)
    _ready.set()
    target_changed(target)
    return path


@functools.cache
def _master() -> SimpleNamespace:
    """Created on first use, after ``master_starting``: the import decides the storage."""
    from prometheus_client import Counter, Gauge

    return SimpleNamespace(
        starts=Counter("heavyapp_worker_starts_total", "Worker processes started by the master."),
        exits=Counter(
            "heavyapp_worker_exits_total",
            "Worker processes that left, by cause; planned=false are crashes.",
            ["cause", "planned"],
        ),
        # livesum: only the master sets these; forked workers hold a 0 for them, which a sum
        # ignores (liveall/all would show one 0 series per worker pid), and during a USR2
        # re-exec the old and new masters' workers add up, as they do on the socket.
        live=Gauge(
            "heavyapp_workers",
            "Worker processes alive now (twice the pool for a moment during a reload).",
            multiprocess_mode="livesum",
        ),
        target=Gauge(
            "heavyapp_workers_target",
            "Worker count the master is keeping (scaled by heavyctl, TTIN/TTOU).",
            multiprocess_mode="livesum",
        ),
    )


def worker_starting(live: int) -> None:
    """From ``pre_fork``: ``live`` counts the worker about to be forked."""
    _master().starts.inc()
    _master().live.set(live)


def worker_left(pid: int, cause: str, planned: bool, live: int) -> None:
    """From ``child_exit``: count the exit and drop the dead pid's live-gauge files."""
    from prometheus_client import multiprocess

    _master().exits.labels(cause=cause, planned=str(planned).lower()).inc()
    _master().live.set(live)
    multiprocess.mark_process_dead(pid)


def target_changed(target: int) -> None:
    """From ``nworkers_changed``, which Gunicorn also calls before ``on_starting``: not yet."""
    if _ready.is_set():
        _master().target.set(target)
