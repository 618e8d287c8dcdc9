"""The master's Prometheus metrics, and the multiprocess directory every process writes into.

Gunicorn runs one process per worker, so each worker counts its own requests in its own file
(``prometheus_client``'s multiprocess mode) and ``GET /metrics`` sums the files of all of them.
The master adds what only it knows: workers started, why each one left, how many are live.

``prometheus_client`` picks its storage when first imported: in-memory unless
``PROMETHEUS_MULTIPROC_DIR`` is set. So the master imports it only after ``prepare`` set the
variable (client_python #127), and the workers inherit both the variable and the choice.
"""

from __future__ import annotations

import sys

from workers.settings import METRICS_DIR, Settings, SettingsError, export
from workers.shared.exits import ExitCause


class MasterMetrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge  # only now: the import picks the storage

        self.starts = Counter(
            "heavyapp_worker_starts_total", "Worker processes started by the master."
        )
        self.exits = Counter(
            "heavyapp_worker_exits_total",
            "Worker processes that left, by cause; planned=false are crashes.",
            ["cause", "planned"],
        )
        self.interrupted = Counter(
            "heavyapp_requests_interrupted_total",
            "Requests a worker was serving when it died, by method: behind the shipped nginx a "
            "GET among them is retried once on another worker, a POST is answered 502.",
            ["method"],
        )
        # livesum: only the master sets these; forked workers hold a 0 for them, which a sum
        # ignores (liveall/all would show one 0 series per worker pid), and during a USR2
        # re-exec the old and new masters' workers add up, as they do on the socket.
        self.live = Gauge(
            "heavyapp_workers",
            "Worker processes alive now (twice the pool for a moment during a reload).",
            multiprocess_mode="livesum",
        )
        self.target = Gauge(
            "heavyapp_workers_target",
            "Worker count the master is keeping (scaled by heavyctl, TTIN/TTOU).",
            multiprocess_mode="livesum",
        )

    @classmethod
    def prepare(cls, settings: Settings, target: int, fresh: bool = True) -> MasterMetrics:
        """From ``when_ready``: an empty directory, named in the environment the workers inherit.

        Files left by a previous run would be summed into this one's counters, so a ``fresh``
        master removes them (a USR2 re-exec is not fresh: the old master's workers still count).
        ``preload_app`` imports the app, and so ``prometheus_client``, before this runs: the
        ``nworkers_changed`` hook names the directory before that (``workers/master/hooks.py``).
        Anything else that imports it first (the config file, a module it imports) is refused.
        """
        if "prometheus_client" in sys.modules and settings.metrics_dir is None:
            raise SettingsError(
                "prometheus_client was imported in the master before the metrics directory was "
                "set (by gunicorn_conf.py or a module it imports), so /metrics would see one "
                f"worker only; set {METRICS_DIR} to an empty directory"
            )
        path = settings.metrics_path()
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db") if fresh else ():
            stale.unlink()
        export(METRICS_DIR, str(path))
        metrics = cls()
        metrics.target_changed(target)
        return metrics

    def worker_starting(self, live: int) -> None:
        """From ``pre_fork``: ``live`` counts the worker about to be forked."""
        self.starts.inc()
        self.live.set(live)

    def worker_left(self, pid: int, cause: ExitCause, live: int, serving: str = "") -> None:
        """From ``child_exit``: count the exit (and the request it was ``serving``, "GET /x",
        if it died with one) and drop the dead pid's live-gauge files."""
        from prometheus_client import multiprocess

        self.exits.labels(cause=cause.value, planned=str(cause.planned).lower()).inc()
        if serving and not cause.planned:
            self.interrupted.labels(method=serving.split(" ", 1)[0]).inc()
        self.live.set(live)
        multiprocess.mark_process_dead(pid)

    def target_changed(self, target: int) -> None:
        self.target.set(target)
