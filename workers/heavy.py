"""HeavyWorker: Gunicorn's sync worker, made to explain itself.

Sync, because one request at a time per process is right for CPU-bound work: a second request in
the same process could only wait for the GIL, while a queued connection stays in the kernel's
accept queue for whichever worker is free next; and a request that hangs holds exactly one
process, which the master's timeout can kill without touching anyone else's request.

On top of the sync worker, each worker
- titles itself ``heavyapp: worker <id> [pid <pid>] <n> requests`` (``ps -eo pid,args``);
- notes the request in flight on its board, so the master can name it if the worker dies;
- has ``faulthandler`` write the traceback of a fatal signal where the master will find it;
- logs the stack of a request killed by Gunicorn's timeout, before it goes;
- recycles itself after a request that left it above ``HEAVYAPP_MAX_RSS_MB``;
- lets a connection reach the app only through its gates (``workers/gates/``): a queue wait
  within ``HEAVYAPP_QUEUE_TIMEOUT`` (and the cut of a growing queue), the request head
  within ``HEAVYAPP_HEAD_TIMEOUT`` seconds, a client still there, then the whole body read into
  memory within ``HEAVYAPP_BODY_TIMEOUT`` (no read before the app can block past a deadline);
- keeps idle connections away from it (``TCP_DEFER_ACCEPT``) and closes each connection after
  its answer without lingering on a client that does not close;
- answers Gunicorn's own errors (bad request line, URI too long, ...) in the app's JSON shape.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import socket
import sys
import time
import traceback
from types import FrameType
from typing import Any

from gunicorn import util
from gunicorn.http.errors import InvalidProxyHeader
from gunicorn.workers.sync import SyncWorker

from workers import gunicorn_internals as internals
from workers.features import COSTS, DEFER_ACCEPT, Features, listener_options, probe
from workers.gates import Gate, Stop, Stopped, log_access
from workers.gates.body import BodyRead
from workers.gates.deadline import DeadlineSocket, FirstLook, close_promptly, peer_ip
from workers.gates.departed import ClientGone
from workers.gates.headwait import HeadWait, largest_head
from workers.gates.queue import QueueWait
from workers.gates.shedding import Shedding
from workers.settings import Settings, worker_id
from workers.shared import lastwords, titles
from workers.shared.exits import ExitCause
from workers.state import WorkerState

_PAGE = os.sysconf("SC_PAGE_SIZE")
#: Seconds a gate or the body may take before the worker tells the master it still lives.
_NOTIFY_AFTER = 1.0
_STACK_FRAMES = 12


def resident_mb() -> float:
    """This process's resident memory, read from /proc (a few microseconds)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE / 2**20


def write_json_error(
    sock: socket.socket,
    status: int,
    reason: str,
    mesg: str,
    headers: tuple[tuple[str, str], ...] = (),
) -> None:
    """``gunicorn.util.write_error`` with a JSON body and the worker headers, like the app's.

    Gunicorn answers an unknown transfer coding with 501 and a ``SCRIPT_NAME`` header that does
    not prefix the path with 500 "Bad Request"; both are the client's input, so 400.
    """
    if status == 501 or (status == 500 and reason == "Bad Request"):
        status, reason = 400, "Bad Request"
    body = json.dumps({"error": f"{reason}: {mesg}" if mesg else reason}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"X-Worker-Pid: {os.getpid()}\r\n"
        f"X-Worker-Id: {worker_id()}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in headers)
        + "\r\n"
    )
    util.write_nonblock(sock, head.encode("latin1") + body)


class HeavyWorker(SyncWorker):
    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """In the master, once at start (and on reload): name each platform feature that is
        missing here and what is off without it; the workers inherit the probe's answer."""
        for line in probe().missing():
            log.warning("heavyapp: %s", line)

    def init_process(self) -> None:
        """Runs in the child, after ``post_fork``: set up the forensics, then serve."""
        internals.answer_errors_with(write_json_error)
        internals.close_connections_with(close_promptly)
        self.settings = Settings.from_env()
        self.features = self.set_listener_options(probe())
        self.init_gates()
        self.exit_reason = "asked to stop"
        self.retitle()
        try:
            super().init_process()
        finally:
            # Leaving: Gunicorn's master repeats SIGTERM every second until it reaps a retired
            # worker, and Python's shutdown drops the handler, so a repeat would end exit 0 as a
            # death by signal. SIGKILL still ends a worker that overstays the graceful timeout.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.log.info(
                "worker %s pid=%s exiting after %d requests (%s)",
                self.heavy.id,
                self.pid,
                self.nr,
                self.exit_reason,
            )
        if self.exit_reason == ExitCause.TIMEOUT:
            # Gunicorn's handle_abort exits 1, but the request's error handler catches that
            # SystemExit to answer the client; keep the exit code an operator expects.
            sys.exit(1)

    def set_listener_options(self, features: Features) -> Features:
        """Set each listener option that works here; one the listener itself refuses is named
        in the log and switched off like a missing one (the worker serves without it)."""
        for feature, level, name, value in listener_options(features):
            try:
                internals.set_listener_options(self.sockets, [(level, name, value)])
            except OSError as exc:
                features = features.without(feature)
                self.log.warning(
                    "worker %s pid=%s: the listener refused an option (%s); %s",
                    self.heavy.id,
                    self.pid,
                    exc,
                    COSTS[feature],
                )
        return features

    def init_gates(self) -> None:
        """The gates, in order, and the state they share with the app side: the queue first
        (a request that already waited too long is refused before any wait for its head), the
        departed-client check last, just before the app."""
        features = self.features
        self.shedding = Shedding(self.settings.queue_deadline, self.cfg.workers)
        self.state = WorkerState(self.shedding, self.sockets, self.settings.run_dir())
        self.look = FirstLook(largest_head(self.cfg) + 1, features)
        self.queue = QueueWait(self.shedding, self.look, self.state.backlog)
        head = HeadWait(
            self.cfg,
            self.look,
            self.settings.head_deadline,
            deferred=DEFER_ACCEPT if features.defer_accept else 0,
            rdhup=features.rdhup,
        )
        measured = features.timestamps or (features.defer_accept and features.tcp_info)
        self.gates: list[Gate] = [
            *([self.queue] if measured else []),
            head,
            *([ClientGone()] if features.rdhup else []),
        ]
        self.body = BodyRead(self.settings.max_body_bytes, self.settings.body_deadline)

    def init_signals(self) -> None:
        """Gunicorn's handlers first, then ``faulthandler`` on top: it dumps the traceback of a
        fatal signal (SIGABRT included) and then chains to the handler that was there before."""
        super().init_signals()
        self._fault_file = lastwords.fault_file(self.settings.run_dir(), self.pid)
        faulthandler.enable(file=self._fault_file, all_threads=True)

    def load_wsgi(self) -> None:
        """Load the app, and attach the kit's Flask side to it if it is a Flask app.

        Imported here, in the worker: ``prometheus_client`` must not be imported in the master
        before the metrics directory is set (``workers/master/metrics.py``)."""
        super().load_wsgi()
        from flask import Flask

        from workers import flask_ext

        if isinstance(self.wsgi, Flask):
            flask_ext.init_app(self.wsgi, self.state)
        self.queue.ready()

    def retitle(self) -> None:
        titles.serving(self.heavy.id, self.pid, self.nr)

    def accept(self, listener: Any) -> None:
        """``SyncWorker.accept``, the connection made a ``DeadlineSocket`` as it is accepted."""
        client, addr = internals.accept_as(listener, DeadlineSocket)
        self.handle(listener, client, addr)

    def handle(self, listener: socket.socket, client: DeadlineSocket, addr: Any) -> None:
        """Serve a connection once it has passed every gate (``workers/gates/``)."""
        picked = self.look.take(client)
        for gate in self.gates:
            stop = gate.check(client, addr)
            if stop is not None:
                self.stop_at_gate(client, addr, stop, picked)
                return
        self.notify_if_waited(picked)  # a slow head must not eat into the request's time
        super().handle(listener, client, addr)
        self.shedding.served(time.monotonic() - picked)

    def notify_if_waited(self, since: float) -> None:
        """Tell the master this worker lives, if a gate waited (else the loop just did)."""
        if time.monotonic() - since > _NOTIFY_AFTER:
            self.notify()

    def stop_at_gate(self, client: socket.socket, addr: Any, stop: Stop, picked: float) -> None:
        """Refuse or drop for a gate, close without lingering, and give the request its
        access line."""
        self.answer(client, stop)
        close_promptly(client)
        if stop.access_status:
            log_access(self.log, stop, client, addr, time.monotonic() - picked)

    def answer(self, client: socket.socket, stop: Stop) -> None:
        """Write a gate's refusal, if it is one (the client may be gone already: no error of
        its costs anything)."""
        if stop.warning:
            self.log.warning("%s", stop.warning)
        if stop.status:
            with contextlib.suppress(OSError):
                write_json_error(client, stop.status, stop.reason, stop.message, stop.headers)

    def handle_error(self, req, client, addr, exc) -> None:
        """A missed deadline or a refused body, raised from Gunicorn's reads: the gate's
        answer, not a 500 (Gunicorn closes the connection after). A bad PROXY v2 header is
        the one parse error Gunicorn 27 answers with a 500: it is the sender's, so a 400."""
        if isinstance(exc, Stopped):
            self.answer(client, exc.stop)
        elif isinstance(exc, InvalidProxyHeader):
            message = f"Invalid PROXY protocol header: {exc}"
            warning = f"Invalid request from ip={peer_ip(addr)}: {message}"
            self.answer(client, Stop(400, "Bad Request", message, warning=warning))
        else:
            super().handle_error(req, client, addr, exc)

    def handle_request(self, listener, req, client, addr) -> None:
        self.heavy.board.request_started(self.nr + 1, req.method, req.uri)
        try:
            self.body.read(req, client, peer_ip(addr))  # disarms the head deadline
            self.notify_if_waited(client.started)  # a slow body must not eat into its time
            super().handle_request(listener, req, client, addr)
        finally:
            self.heavy.board.request_finished(self.nr)
            self.retitle()
        self.after_request()  # not after a timeout's SystemExit: that exit is not a recycle

    def after_request(self) -> None:
        """Leave gracefully, after the answer is sent, when a recycle is due."""
        if not self.alive and self.nr >= self.max_requests:
            self.recycle(f"max_requests {self.max_requests} reached")
        elif (
            (cap := self.settings.max_rss_mb)
            and self.features.proc
            and (rss := resident_mb()) > cap
        ):
            self.recycle(f"rss {rss:.0f} MB above HEAVYAPP_MAX_RSS_MB={cap}")

    def recycle(self, detail: str) -> None:
        self.alive = False
        self.exit_reason = f"recycle: {detail}"
        self.log.info("worker %s pid=%s recycling: %s", self.heavy.id, self.pid, detail)
        lastwords.leave(self.settings.run_dir(), self.pid, cause=ExitCause.RECYCLE, detail=detail)

    def handle_abort(self, sig: int, frame: FrameType | None) -> None:
        """Gunicorn's timeout (SIGABRT from the master): log the stuck request's stack, then go."""
        snapshot = self.heavy.board.read()
        ran = time.time() - snapshot.busy_since if snapshot.busy_since else 0.0
        # The innermost frames: the request's own code, not Gunicorn's way down to it.
        stack = "".join(traceback.format_stack(frame, _STACK_FRAMES)) if frame else "(no frame)"
        where = (
            f"{frame.f_code.co_name}() at {frame.f_code.co_filename}:{frame.f_lineno}"
            if frame
            else "?"
        )
        self.log.critical(
            "worker %s pid=%s timed out after %.1fs serving %s, in %s; stack:\n%s",
            self.heavy.id,
            self.pid,
            ran,
            snapshot.request or "(no request)",
            where,
            stack,
        )
        self.exit_reason = ExitCause.TIMEOUT
        lastwords.leave(
            self.settings.run_dir(),
            self.pid,
            cause=ExitCause.TIMEOUT,
            detail=f"in {where} after {ran:.1f}s",
            request=snapshot.request,
            traceback=stack,
        )
        super().handle_abort(sig, frame)
