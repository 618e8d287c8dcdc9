"""Gunicorn server hooks: the master's side of the story, in the original article's words.

``gunicorn_conf.py`` wires these in. They run in the master except ``post_fork`` (the child,
just after the fork). The master logs the CPU count and its pid at start, each worker as it
starts, and for each death "worker pid=X died (signal NAME | exit code N)" with the cause, then
"Starting another worker" for the replacement; planned exits (reload, scale-down, recycling,
shutdown) are logged as such, not as deaths.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import gunicorn.arbiter

from workers import crashes
from workers.master import metrics
from workers.master.roster import Backoff, Death, Member, Roster
from workers.master.sizing import cpu_budget
from workers.settings import WORKER_ID, SettingsError, claim_run_dir, run_dir
from workers.shared import lastwords, logs, titles

ROSTER = Roster(Backoff())  # gunicorn_conf.py sets the backoff from the environment
#: The master's lock on its run directory, held until it exits.
_RUN_DIR_LOCK: int | None = None

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

HINTS = {
    "killed": "SIGKILL comes from the kernel's OOM killer (check dmesg and memory limits) "
    "or from an operator",
    "timeout": "the request ran past Gunicorn's timeout; its stack is logged above",
    "fatal-signal": "a crash in C code or the interpreter; the traceback follows",
    "exit": "the process called exit with a non-zero code",
}


class _ExitStatuses:
    """Gunicorn reaps workers with ``os.waitpid`` but passes ``child_exit`` no exit status.

    Standing in for the ``os`` module inside ``gunicorn.arbiter`` only, this keeps the status
    of each reaped pid for ``child_exit`` and changes nothing else.
    """

    def __init__(self, real_os: Any) -> None:
        self._os = real_os
        self.statuses: dict[int, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._os, name)

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        wpid, status = self._os.waitpid(pid, options)
        if wpid:
            self.statuses[wpid] = status
        return wpid, status


def _members(server: gunicorn.arbiter.Arbiter) -> dict[int, Member]:
    return {pid: w.heavy for pid, w in server.WORKERS.items() if hasattr(w, "heavy")}


def _retitle_master(server: gunicorn.arbiter.Arbiter) -> None:
    bind = ",".join(server.cfg.bind)
    titles.master(server.num_workers, bind)


def _save_state(server: gunicorn.arbiter.Arbiter) -> None:
    """Write the per-id history where heavyctl reads it (atomically: it may read at any time)."""
    state = {"master_pid": server.pid, "bind": server.cfg.bind, **ROSTER.state()}
    path = run_dir() / "roster.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def on_starting(server: gunicorn.arbiter.Arbiter) -> None:
    logs.MASTER_PID = os.getpid()
    if not isinstance(gunicorn.arbiter.os, _ExitStatuses):
        gunicorn.arbiter.os = _ExitStatuses(gunicorn.arbiter.os)
    budget = cpu_budget()
    server.log.info(
        "The total number of CPUs is %d, usable %d (%s)", budget.total, budget.usable, budget.source
    )
    server.log.info("Primary pid=%d, starting %d workers", server.pid, server.num_workers)


def when_ready(server: gunicorn.arbiter.Arbiter) -> None:
    """Bound, no worker forked yet: settle this server's run directory, then say so.

    Here and not at start, so a second master that cannot bind the same address never touches
    the running one's files, and a ``-b :0`` is known by the port it really got.
    """
    fresh = "GUNICORN_PID" not in os.environ  # a USR2 re-exec shares the old master's files
    try:
        _settle_run_dir(server, lock=fresh)
        metrics.master_starting(server.num_workers, fresh=fresh)
    except SettingsError as exc:
        raise SystemExit(f"heavyapp: refusing to start: {exc}") from None
    if fresh:
        lastwords.prepare()
    shown = " ".join(f"{name}={server.cfg.settings[name].get()!r}" for name in SHOWN_SETTINGS)
    server.log.info("effective config: %s", shown)


def _bound_address(server: gunicorn.arbiter.Arbiter) -> str:
    """The first address the master really listens on (the configured one under reuse_port)."""
    if not server.LISTENERS:
        return server.cfg.bind[0]
    name = server.LISTENERS[0].sock.getsockname()
    if isinstance(name, str):
        return f"unix:{name}"
    host, port = name[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _settle_run_dir(server: gunicorn.arbiter.Arbiter, lock: bool) -> None:
    """The run directory of the address really bound (``-b`` may override the env's), locked
    against a second master, exported so the workers agree; the control socket follows it
    unless set explicitly."""
    env_default = str(run_dir() / "gunicorn.ctl")
    named = bool(os.environ.get("HEAVYAPP_RUN_DIR"))
    where = claim_run_dir(run_dir(bind=_bound_address(server)), private=not named)
    if lock:
        _lock_run_dir(where)
    os.environ["HEAVYAPP_RUN_DIR"] = str(where)
    if server.cfg.control_socket == env_default:
        server.cfg.set("control_socket", str(where / "gunicorn.ctl"))
    server.log.info("run directory: %s (control socket, crash journal, metrics)", where)


def _lock_run_dir(where: Path) -> None:
    """Hold ``master.lock`` for the master's life: one master per run directory."""
    global _RUN_DIR_LOCK
    fd = os.open(where / "master.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SettingsError(f"another master (pid {holder}) uses run directory {where}") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _RUN_DIR_LOCK = fd


def on_reload(server: gunicorn.arbiter.Arbiter) -> None:
    """A HUP: the new generation takes ids 0..W-1 again while the old one drains."""
    ROSTER.generation += 1
    server.log.info(
        "reload: generation %d starting, the old workers finish their requests", ROSTER.generation
    )


def pre_fork(server: gunicorn.arbiter.Arbiter, worker: Any) -> None:
    member = ROSTER.admit(_members(server))
    worker.heavy = member
    metrics.worker_starting(len(server.WORKERS) + 1)
    _save_state(server)  # heavyctl's restart count includes this start
    # Set in the master just before the fork, so the child has its id from its first line of log.
    os.environ[WORKER_ID] = str(member.id)
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
    _retitle_master(server)


def post_fork(server: gunicorn.arbiter.Arbiter, worker: Any) -> None:
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


def child_exit(server: gunicorn.arbiter.Arbiter, worker: Any) -> None:
    """In the master, after the worker was reaped: why did it go, and what did it leave."""
    status = gunicorn.arbiter.os.statuses.pop(worker.pid, None)
    words, fault = lastwords.collect(worker.pid)
    death = ROSTER.release(worker.heavy, worker.pid, status, worker.aborted, words.get("cause"))
    _log_death(server, death, words, fault)
    metrics.worker_left(worker.pid, death.cause, death.planned, len(server.WORKERS))
    if not death.planned:
        crashes.record(_crash_entry(death, words, fault))
    _save_state(server)
    _retitle_master(server)


def _log_death(server: gunicorn.arbiter.Arbiter, death: Death, words: dict, fault: str) -> None:
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
    trace = f"\n{fault}" if fault and death.cause == "fatal-signal" else ""
    server.log.error(
        "worker pid=%d died (%s): %s; %s. Hint: %s%s",
        death.pid,
        death.status,
        death.cause,
        facts,
        HINTS.get(death.cause, ""),
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


def nworkers_changed(server: gunicorn.arbiter.Arbiter, new: int, old: int | None) -> None:
    """On a scale-down, make the highest ids leave first so the ids stay dense.

    Gunicorn retires the workers with the lowest ``age``; lowering the age of the leaving ones
    is what points it at them.
    """
    if old is not None and new < old:
        members = _members(server)
        leaving = ROSTER.retire(members.values(), new)
        oldest = min((w.age for w in server.WORKERS.values()), default=0)
        going = [w for w in server.WORKERS.values() if getattr(w, "heavy", None) in leaving]
        for rank, w in enumerate(going):
            w.age = oldest - 1 - rank
    metrics.target_changed(new)
    _retitle_master(server)


def on_exit(server: gunicorn.arbiter.Arbiter) -> None:
    server.log.info("Primary pid=%d exiting", server.pid)
