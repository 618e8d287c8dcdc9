"""Gunicorn server hooks: the master's side of the story, in the original article's words.

``gunicorn_conf.py`` wires these in. They run in the master except ``post_fork`` (the child,
just after the fork). The master logs the CPU count and its pid at start, each worker as it
starts, and for each death "worker pid=X died (signal NAME | exit code N)" with the cause, then
"Starting another worker" for the replacement; planned exits (reload, scale-down, recycling,
shutdown) are logged as such, not as deaths.

The master's state (the roster of ids, the run directory's lock, its metrics) is one ``Master``
object kept on Gunicorn's arbiter, so it outlives a HUP, which re-reads this configuration.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import signal
import time
from typing import Any

from gunicorn.arbiter import Arbiter

from workers import crashes
from workers import gunicorn_internals as internals
from workers.master import rundir
from workers.master.drain import Drain
from workers.master.metrics import MasterMetrics
from workers.master.roster import Backoff, Death, Member, Roster
from workers.master.sizing import cpu_budget
from workers.settings import METRICS_DIR, RUN_DIR, WORKER_ID, Settings, SettingsError, export
from workers.shared import draining, lastwords, threads, titles
from workers.shared.exits import ExitCause

#: Settings shown in the one-line effective configuration at start.
SHOWN_SETTINGS = (
    "bind",
    "workers",
    "worker_class",
    "timeout",
    "graceful_timeout",
    "max_requests",
    "max_requests_jitter",
    "worker_tmp_dir",
    "control_socket",
    "accesslog",
    "errorlog",
    "loglevel",
    "limit_request_line",
    "preload_app",
    "reuse_port",
)


class Master:
    """What the master keeps between hooks: settings, the roster, its lock, its metrics, the
    crash hooks it hands each death to."""

    def __init__(self, settings: Settings, crash_hooks: crashes.CrashHooks = crashes.hooks) -> None:
        self.settings = settings
        self.crash_hooks = crash_hooks
        self.roster = Roster(Backoff.from_settings(settings))
        self.run_dir_lock: int | None = None  # fd of master.lock, held until the master exits
        self.metrics: MasterMetrics | None = None  # once the metrics directory is ready
        self.threads: threads.ThreadBudget | None = None  # each worker's native threads

    @classmethod
    def of(cls, server: Arbiter) -> Master:
        """The arbiter's ``Master``, made on first use."""
        if not hasattr(server, "heavy"):
            server.heavy = cls(Settings.from_env())
        return server.heavy

    def members(self, server: Arbiter) -> dict[int, Member]:
        return {pid: w.heavy for pid, w in server.WORKERS.items() if hasattr(w, "heavy")}

    def retitle(self, server: Arbiter) -> None:
        titles.master(server.num_workers, ",".join(server.cfg.bind))

    def save_state(self, server: Arbiter) -> None:
        """Write the per-id history where heavyctl reads it (atomically: it may read any time)."""
        state = {
            "master_pid": server.pid,
            "bind": server.cfg.bind,
            "native_threads": self.threads.threads if self.threads else None,
            "native_threads_detail": self.threads.describe() if self.threads else None,
            **self.roster.state(),
        }
        path = self.settings.run_dir() / "roster.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)


def on_starting(server: Arbiter) -> None:
    master = Master.of(server)
    internals.record_exit_statuses(server)
    internals.stop_gracefully_with(server, lambda: graceful_stop(server))
    budget = cpu_budget()
    server.log.info(
        "The total number of CPUs is %d, usable %d (%s)", budget.total, budget.usable, budget.source
    )
    server.log.info("Primary pid=%d, starting %d workers", server.pid, server.num_workers)
    if master.threads:
        server.log.info("native threads per worker: %s", master.threads.describe())


def when_ready(server: Arbiter) -> None:
    """Bound, no worker forked yet: settle this server's run directory, then say so.

    Here and not at start, so a second master that cannot bind the same address never touches
    the running one's files, and a ``-b :0`` is known by the port it really got.
    """
    master = Master.of(server)
    fresh = not internals.is_reexec()  # a USR2 re-exec shares the old master's files
    try:
        _check_drain(server, master.settings)
        _settle_run_dir(server, master, lock=fresh)
        master.metrics = MasterMetrics.prepare(
            master.settings, server.num_workers, server.LISTENERS, fresh=fresh
        )
    except SettingsError as exc:
        raise SystemExit(f"heavyapp: refusing to start: {exc}") from None
    if fresh:
        lastwords.prepare(master.settings.run_dir())
        draining.clear(master.settings.run_dir())
    shown = " ".join(f"{name}={server.cfg.settings[name].get()!r}" for name in SHOWN_SETTINGS)
    server.log.info("effective config: %s", shown)


def _check_drain(server: Arbiter, settings: Settings) -> None:
    """The drain window against the graceful timeout Gunicorn really uses (a flag may set it)."""
    if settings.drain_seconds >= server.cfg.graceful_timeout:
        raise SettingsError(
            f"HEAVYAPP_DRAIN_SECONDS={settings.drain_seconds:g} must be below the graceful "
            f"timeout ({server.cfg.graceful_timeout}s), which bounds the whole stop"
        )


def graceful_stop(server: Arbiter) -> None:
    """SIGTERM: drain (``workers/master/drain.py``), then halt as Gunicorn does (exit 0)."""
    master = Master.of(server)

    def requests_taken() -> int:
        return sum(m.board.read().requests for m in master.members(server).values())

    Drain(server, master.settings.drain_seconds, master.settings.run_dir(), requests_taken).run()
    raise StopIteration


def _bound_address(server: Arbiter) -> str:
    """The first address the master really listens on (the configured one under reuse_port)."""
    if not server.LISTENERS:
        return server.cfg.bind[0]
    name = server.LISTENERS[0].sock.getsockname()
    if isinstance(name, str):
        return f"unix:{name}"
    host, port = name[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _settle_run_dir(server: Arbiter, master: Master, lock: bool) -> None:
    """The run directory of the address really bound (``-b`` may override the env's), locked
    against a second master, exported so the workers agree; the control socket follows it
    unless set explicitly."""
    settings = master.settings
    env_default = str(settings.run_dir() / "gunicorn.ctl")
    named = settings.run_dir_path is not None
    where = rundir.claim(settings.run_dir(bind=_bound_address(server)), private=not named)
    if lock:
        master.run_dir_lock = rundir.lock(where)
    export(RUN_DIR, str(where))
    master.settings = dataclasses.replace(settings, run_dir_path=where)  # the one now settled
    if server.cfg.control_socket == env_default:
        internals.move_control_socket(server, str(where / "gunicorn.ctl"))
    server.log.info("run directory: %s (control socket, crash journal, metrics)", where)


def on_reload(server: Arbiter) -> None:
    """A HUP: the new generation takes ids 0..W-1 again while the old one drains, with the
    native thread budget of the new configuration."""
    master = Master.of(server)
    master.settings = Settings.from_env()
    _budget_threads(server, master)
    server.log.info("native threads per worker: %s", master.threads.describe())
    master.roster.backoff = Backoff.from_settings(master.settings)
    master.roster.generation += 1
    server.log.info(
        "reload: generation %d starting, the old workers finish their requests",
        master.roster.generation,
    )
    if server.cfg.preload_app:
        server.log.warning(
            "reload: the app was preloaded in the master (HEAVYAPP_PRELOAD=1), so the new "
            "workers run the code loaded at start; only the configuration is read again. To "
            "load new code: heavyctl upgrade (USR2) or a restart"
        )


def pre_fork(server: Arbiter, worker: Any) -> None:
    # Keep the collector off every object the master holds (a preloaded app and its model):
    # a collection in the child would write to their headers and unshare the pages.
    gc.freeze()
    master = Master.of(server)
    member = master.roster.admit(master.members(server))
    worker.heavy = member
    if master.metrics:
        master.metrics.worker_starting(len(server.WORKERS) + 1, member.restart_delay)
    master.save_state(server)  # heavyctl's restart count includes this start
    # Set in the master just before the fork, so the child has its id from its first line of log.
    export(WORKER_ID, str(member.id))
    if member.replaces:
        delay = (
            f", after a {member.restart_delay:.1f}s crash-loop delay"
            if member.restart_delay
            else ""
        )
        server.log.info(
            "Starting another worker for id %d (replaces pid=%s: %s)%s",
            member.id,
            member.replaces,
            member.replaced_because,
            delay,
        )
    master.retitle(server)


def post_fork(server: Arbiter, worker: Any) -> None:
    """In the child: say who it is, then sit out a crash-loop delay before serving."""
    member: Member = worker.heavy
    replaces = (
        f", replaces pid={member.replaces} ({member.replaced_because})" if member.replaces else ""
    )
    server.log.info(
        "worker pid=%d started: id %d, booted %s%s",
        worker.pid,
        member.id,
        time.strftime("%H:%M:%S", time.localtime(member.started)),
        replaces,
    )
    if member.restart_delay:
        _sit_out(worker, member)
    if limited := threads.limit_loaded_pools():
        worker.log.info("native threads: %s (loaded before the fork)", ", ".join(limited))
    titles.serving(member.id, worker.pid, 0)  # the kit's title, whatever the worker class


def _sit_out(worker: Any, member: Member) -> None:
    """Wait without accepting: the other workers keep serving and the master is never blocked."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)  # a shutdown during the wait ends it at once
    titles.waiting(member.id, worker.pid, member.restart_delay)
    worker.log.warning(
        "worker %d pid=%d is crash-looping: waiting %.1fs before serving",
        member.id,
        worker.pid,
        member.restart_delay,
    )
    deadline = time.monotonic() + member.restart_delay
    while (left := deadline - time.monotonic()) > 0:
        worker.notify()  # the heartbeat: the master's timeout must not take the wait for a hang
        time.sleep(min(left, 0.5))


def child_exit(server: Arbiter, worker: Any) -> None:
    """In the master, after the worker was reaped: why did it go, and what did it leave."""
    master = Master.of(server)
    status = internals.exit_status(worker.pid)
    words, fault = lastwords.collect(master.settings.run_dir(), worker.pid)
    death = master.roster.release(
        worker.heavy, worker.pid, status, worker.aborted, words.get("cause")
    )
    _log_death(server, death, words, fault)
    if master.metrics:
        master.metrics.worker_left(
            worker.pid, death.cause, len(server.WORKERS), death.request or ""
        )
    if not death.planned:
        entry = _crash_entry(death, words, fault)
        crashes.record(entry, master.settings.crash_log_path(), master.crash_hooks)
    master.save_state(server)
    master.retitle(server)


def _log_death(server: Arbiter, death: Death, words: dict, fault: str) -> None:
    where = f", serving {death.request}" if death.request else ""
    facts = f"worker id {death.worker_id}, up {death.uptime:.1f}s, {death.requests} requests{where}"
    if death.planned:
        detail = f" ({words['detail']})" if words.get("detail") else ""
        server.log.info(
            "worker pid=%d exited (%s): %s%s; %s",
            death.pid,
            death.status,
            death.cause,
            detail,
            facts,
        )
        return
    trace = f"\n{fault}" if fault and death.cause == ExitCause.FATAL_SIGNAL else ""
    server.log.error(
        "worker pid=%d died (%s): %s; %s. Hint: %s%s",
        death.pid,
        death.status,
        death.cause,
        facts,
        death.cause.hint,
        trace,
    )


def _crash_entry(death: Death, words: dict, fault: str) -> crashes.Crash:
    return crashes.entry(
        death.cause,
        death.pid,
        death.worker_id,
        signal=death.signal,
        exit_code=death.exit_code,
        request=death.request or words.get("request") or None,
        detail=words.get("detail"),
        traceback=words.get("traceback") or fault or None,
        uptime_s=round(death.uptime, 3),
        requests=death.requests,
    )


def nworkers_changed(server: Arbiter, new: int, old: int | None) -> None:
    """On a scale-down, make the highest ids leave first so the ids stay dense.

    Gunicorn first calls this with the first count (``old`` None) while it sets up, before
    ``on_starting`` and before ``preload_app`` loads the app: the one moment, with the final
    worker count and bind, to set what the app's libraries read when they are imported.
    """
    master = Master.of(server)
    if old is None:
        _before_the_app(server, master)
        return
    if old is not None and new < old:
        leaving = master.roster.retire(master.members(server).values(), new)
        going = [w for w in server.WORKERS.values() if getattr(w, "heavy", None) in leaving]
        internals.retire_first(server, going)
    if master.metrics:
        master.metrics.target_changed(new)
    master.retitle(server)


def _before_the_app(server: Arbiter, master: Master) -> None:
    """The native thread budget, and under preload the metrics directory: both are read when
    the app's libraries are imported (``prometheus_client`` picks its storage then)."""
    _budget_threads(server, master)
    if server.cfg.preload_app and master.settings.metrics_dir is None:
        settings = master.settings
        try:
            where = rundir.claim(
                settings.run_dir(bind=server.cfg.bind[0]),
                private=settings.run_dir_path is None,
            )
        except SettingsError as exc:
            raise SystemExit(f"heavyapp: refusing to start: {exc}") from None
        (where / "metrics").mkdir(exist_ok=True)
        export(METRICS_DIR, str(where / "metrics"))
        master.settings = dataclasses.replace(settings, metrics_dir=where / "metrics")


def _budget_threads(server: Arbiter, master: Master) -> None:
    master.threads = threads.ThreadBudget.of(
        cpu_budget().usable, server.cfg.workers, master.settings.threads_per_worker
    )
    threads.export_budget(master.threads, warn=server.log.warning)


def on_exit(server: Arbiter) -> None:
    server.log.info("Primary pid=%d exiting", server.pid)
