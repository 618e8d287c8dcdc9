"""The master's Prometheus metrics, and the multiprocess directory every process writes into.

Gunicorn runs one process per worker, so each worker counts its own requests in its own file
(``prometheus_client``'s multiprocess mode) and ``GET /metrics`` sums the files of all of them.
The master adds what only it knows: workers started, why each one left, how many are live,
restarts held back by the crash-loop delay, the accept queue's limit. ``PoolCollector`` adds, at
scrape time, each worker's memory and threads as the kernel counts them.

``prometheus_client`` picks its storage when first imported: in-memory unless
``PROMETHEUS_MULTIPROC_DIR`` is set. So the master imports it only after ``prepare`` set the
variable (client_python #127), and the workers inherit both the variable and the choice.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import psutil

from workers.settings import METRICS_DIR, Settings, SettingsError, export
from workers.shared import titles
from workers.shared.exits import ExitCause

#: ``struct tcp_info`` up to ``tcpi_sacked`` (include/uapi/linux/tcp.h): 8 bytes, then u32s.
_TCP_INFO = struct.Struct("=8B6I")


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
        # Every cause a worker can leave by, at 0 from the start: a rule's increase() then counts
        # the first crash too (a series born at 1 has no earlier sample to rise from). EXCEPTION
        # is a journalled 500, never an exit.
        for cause in ExitCause:
            if cause is not ExitCause.EXCEPTION:
                self.exits.labels(cause=cause.value, planned=str(cause.planned).lower())
        self.delayed = Counter(
            "heavyapp_worker_restart_delays_total",
            "Worker restarts held back by the crash-loop delay (an id that crashed again soon "
            "after its restart).",
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
        # livemax: the limit is the shared socket's, so during a USR2 re-exec both masters
        # report the same one; a sum would double it and halve the accept-queue alert's ratio.
        self.backlog_limit = Gauge(
            "heavyapp_listen_backlog_limit",
            "Connections the accept queue holds before the kernel drops new ones (TCP_INFO).",
            multiprocess_mode="livemax",
        )

    @classmethod
    def prepare(
        cls, settings: Settings, target: int, listeners: Iterable[Any] = (), fresh: bool = True
    ) -> MasterMetrics:
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
        if (limit := accept_queue_limit(listeners)) >= 0:
            metrics.backlog_limit.set(limit)
        return metrics

    def worker_starting(self, live: int, restart_delay: float) -> None:
        """From ``pre_fork``: ``live`` counts the worker about to be forked."""
        self.starts.inc()
        self.live.set(live)
        if restart_delay:
            self.delayed.inc()

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


def accept_queue_limit(listeners: Iterable[Any]) -> int:
    """How many connections the accept queues of ``listeners`` hold: the kernel's own cap,
    ``min(backlog, net.core.somaxconn)``, which ``TCP_INFO`` of a listening socket reports as
    ``tcpi_sacked`` (``tcpi_unacked`` is the depth Gunicorn's ``get_backlog`` reads); -1 where
    none can tell (a unix socket, not Linux)."""
    limits = []
    for listener in listeners:
        try:
            raw = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
        except (AttributeError, OSError):
            continue
        limits.append(_TCP_INFO.unpack(raw)[13])
    return sum(limits) if limits else -1


class PoolCollector:
    """``heavyapp_worker_resident_bytes`` and ``heavyapp_worker_threads`` by worker id, read
    from /proc at scrape time by the worker answering ``/metrics`` (its parent is the master):
    exact for an idle worker too, and nothing to write per request.

    Labelled by the stable id, never the pid, so a crash loop makes no new series; while a
    reload's two generations overlap, an id shows its newest process.
    """

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        memory = GaugeMetricFamily(
            "heavyapp_worker_resident_bytes",
            "Resident memory of each worker (what HEAVYAPP_MAX_RSS_MB compares).",
            labels=["worker_id"],
        )
        threads = GaugeMetricFamily(
            "heavyapp_worker_threads",
            "OS threads of each worker (native pools such as OpenBLAS included).",
            labels=["worker_id"],
        )
        for wid, proc in sorted(_workers_by_id().items()):
            try:
                with proc.oneshot():
                    rss, count = proc.memory_info().rss, proc.num_threads()
            except psutil.NoSuchProcess:
                continue
            memory.add_metric([str(wid)], rss)
            threads.add_metric([str(wid)], count)
        yield memory
        yield threads


def _workers_by_id() -> dict[int, psutil.Process]:
    """The master's children that carry a worker title, by id (the newest process of an id)."""
    try:
        children = psutil.Process(os.getppid()).children()
    except psutil.NoSuchProcess:
        return {}
    found: dict[int, psutil.Process] = {}
    for child in sorted(children, key=_started):
        wid = titles.parse(titles.read(child.pid))["id"]
        if wid is not None:
            found[wid] = child
    return found


def _started(proc: psutil.Process) -> float:
    try:
        return proc.create_time()
    except psutil.NoSuchProcess:
        return 0.0
