"""The graceful stop that drains: on SIGTERM, answer every connection the kernel already took.

Gunicorn's SIGTERM (``Arbiter.stop``) closes the listeners first and then retires the workers,
so every connection waiting in the kernel's accept queue is reset (Gunicorn issue 3397; the 502s
of 2409 and 2593 behind nginx and Kubernetes). The kit's master stops in three steps instead,
all within ``GRACEFUL_TIMEOUT`` of the signal:

1. **Unready, still serving** for ``HEAVYAPP_DRAIN_SECONDS``: ``/readyz`` answers 503 at once
   (``workers/shared/draining.py``), ``/healthz`` 200, and new connections are served as usual,
   for balancers that stop sending late.
2. **Door shut, queue served**: the listeners stop taking new connections without closing
   (``workers/shared/door.py``) and the workers serve what waits in the accept queue, read as
   Gunicorn's backlog metric reads it (``TCP_INFO``), until it stayed empty for ``SETTLE``
   seconds. Each request still passes the queue gate, so one that waited past
   ``HEAVYAPP_QUEUE_TIMEOUT`` gets its 503 instead of stale work; every answer carries
   ``Connection: close`` (the sync worker closes each connection).
3. **Workers retired**: SIGTERM, each finishes the request in hand; at ``GRACEFUL_TIMEOUT``
   whatever is left gets SIGKILL, as in Gunicorn. Then the listeners close and the master
   exits 0.

Where the listening socket outlives this master (a USR2 upgrade's other master, systemd's
socket), its queue is not lost on exit and is left to the process that keeps it: the master
stops as Gunicorn does, after the window. SIGINT and SIGQUIT, also during a drain, stop at once.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

from gunicorn.arbiter import Arbiter

from workers import gunicorn_internals as internals
from workers.shared import door, draining

#: Seconds the accept queue must stay empty before the workers are retired: a handshake that was
#: half done when the door shut still joins the queue (one round trip later).
SETTLE = 0.2
_TICK = 0.02


class QuickStop(Exception):
    """SIGINT or SIGQUIT arrived during the drain."""


class Drain:
    """One graceful stop of ``server``, from SIGTERM to the last worker reaped."""

    def __init__(self, server: Arbiter, window: float, run_dir: Any, requests: Callable[[], int]):
        self.server = server
        self.log = server.log
        self.window = window
        self.run_dir = run_dir
        self.requests = requests  # requests the live workers have taken so far
        self.began = time.monotonic()
        self.limit = self.began + server.cfg.graceful_timeout
        self.quiet_since: float | None = None  # since when the accept queue reads empty

    def run(self) -> None:
        """The three steps; SIGINT/SIGQUIT meanwhile end it with Gunicorn's quick stop."""
        draining.announce(self.run_dir, self.server.pid)
        try:
            if keeper := self.keeper():
                self.log.info(
                    "Stopping: the listening socket outlives this master (%s), which keeps its "
                    "queue; retiring the workers",
                    keeper,
                )
                if self.server.reexec_pid:  # the control socket's path is the new master's now
                    internals.keep_control_socket_file(self.server)
            else:
                self.unready()
                self.serve_queue()
            self.retire()
        except QuickStop:
            self.log.info("Quick shutdown requested during the drain")
            door.open_(self.server.LISTENERS)
            self.server.stop(graceful=False)
        finally:
            draining.withdraw(self.run_dir, self.server.pid)

    def unready(self) -> None:
        window = (
            f"serving new connections for {self.window:g}s, then the accept queue"
            if self.window
            else "serving the accept queue"
        )
        self.log.info(
            "Draining: /readyz answers 503 from now on; %s, all within GRACEFUL_TIMEOUT=%ds",
            window,
            self.server.cfg.graceful_timeout,
        )
        self.tend(until=self.began + self.window)

    def serve_queue(self) -> None:
        """Shut the door, then serve until the accept queue stayed empty (or time ran out)."""
        shut = door.close(self.server.LISTENERS)
        if not shut:
            self.log.warning(
                "Draining: cannot shut the listeners to new connections (not TCP, or no socket "
                "filters here); stopping as Gunicorn does, which drops the accept queue"
            )
            return
        waiting = internals.listen_backlog(shut)
        before = self.requests()
        closed_at = time.monotonic()
        self.log.info(
            "Draining: listeners closed to new connections, %d waiting in the accept queue",
            waiting,
        )
        self.tend(until=self.limit, done=lambda: self.settled(shut))
        left = max(internals.listen_backlog(shut), 0)
        self.log.info(
            "Drained the accept queue: %d were waiting, %d requests served in %.1fs%s",
            waiting,
            self.requests() - before,
            time.monotonic() - closed_at,
            f"; {left} still waiting at GRACEFUL_TIMEOUT are dropped" if left else "",
        )

    def settled(self, listeners: list[Any]) -> bool:
        """Has the accept queue of ``listeners`` been empty for ``SETTLE`` seconds?"""
        now = time.monotonic()
        if internals.listen_backlog(listeners) > 0:
            self.quiet_since = None
            return False
        self.quiet_since = self.quiet_since or now
        return now - self.quiet_since >= SETTLE

    def retire(self) -> None:
        """Gunicorn's graceful stop of the workers, bounded by what is left of the timeout."""
        self.server.kill_workers(signal.SIGTERM)
        self.tend(until=self.limit, done=lambda: not self.server.WORKERS, respawn=False)
        if self.server.WORKERS:
            self.log.warning(
                "Draining: %d workers still busy at GRACEFUL_TIMEOUT, killing them",
                len(self.server.WORKERS),
            )
            self.server.kill_workers(signal.SIGKILL)
            self.tend(
                until=time.monotonic() + 1, done=lambda: not self.server.WORKERS, respawn=False
            )
        self.log.info(
            "Drain done in %.1fs: all workers stopped, closing the listeners",
            time.monotonic() - self.began,
        )

    def tend(
        self,
        until: float,
        done: Callable[[], bool] = lambda: False,
        respawn: bool = True,
    ) -> None:
        """The master's loop while it drains: reap, time out, replace dead workers (unless
        retiring them), and answer signals, until ``done()`` or ``until``."""
        while time.monotonic() < until and not done():
            for sig in self.server.wait_for_signals(timeout=_TICK):
                if sig in (signal.SIGINT, signal.SIGQUIT):
                    raise QuickStop
                if sig != signal.SIGCHLD:
                    name = self.server.SIG_NAMES.get(sig, sig)
                    self.log.info("Ignoring signal %s: draining", name)
            self.server.reap_workers()
            self.server.murder_workers()
            if respawn:
                self.server.manage_workers()

    def keeper(self) -> str:
        """Who else holds the listening socket, so that closing it here drops nothing."""
        server = self.server
        if server.reexec_pid:
            return f"the new master pid={server.reexec_pid}"
        if server.master_pid:
            return f"the old master pid={server.master_pid}"
        if server.systemd:
            return "systemd's socket unit"
        return ""
