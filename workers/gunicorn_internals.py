"""Every place the kit reaches past Gunicorn's documented hooks and settings, in one module.

Each function names what it stands in for and why no public way exists; each is checked by
``tests/test_gunicorn_contract.py``, so a Gunicorn upgrade that moves one fails there first
(pyproject pins ``gunicorn>=27,<28``). The design notes are in ``docs/design.md``.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterable
from typing import Any

import gunicorn.arbiter
from gunicorn import util
from gunicorn.http.body import Body, LengthReader
from gunicorn.http.unreader import IterUnreader


class ExitStatuses:
    """Gunicorn reaps workers with ``os.waitpid`` but passes ``child_exit`` no exit status.

    Standing in for the ``os`` module inside ``gunicorn.arbiter`` only (``reap_workers`` calls
    ``os.waitpid(-1, WNOHANG)``), it keeps the status of each reaped *worker* until
    ``child_exit`` takes it, and changes nothing else. Other children the master reaps (as PID 1
    in a container it reaps orphans too) are not kept, so the table never grows.
    """

    def __init__(self, real_os: Any, is_worker: Callable[[int], bool]) -> None:
        self._os = real_os
        self._is_worker = is_worker
        self.statuses: dict[int, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._os, name)

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        wpid, status = self._os.waitpid(pid, options)
        if wpid and self._is_worker(wpid):
            self.statuses[wpid] = status
        return wpid, status


def record_exit_statuses(arbiter: gunicorn.arbiter.Arbiter) -> ExitStatuses:
    """Install (once per master) the waitpid stand-in; it records ``arbiter``'s workers only."""
    if not isinstance(gunicorn.arbiter.os, ExitStatuses):
        gunicorn.arbiter.os = ExitStatuses(gunicorn.arbiter.os, lambda pid: pid in arbiter.WORKERS)
    return gunicorn.arbiter.os


def exit_status(pid: int) -> int | None:
    """The ``waitpid`` status of a reaped worker, taken (each is read once, in ``child_exit``)."""
    statuses = getattr(gunicorn.arbiter.os, "statuses", {})
    return statuses.pop(pid, None)


def answer_errors_with(writer: Callable[[Any, int, str, str], None]) -> None:
    """Make ``Worker.handle_error`` write its 4xx answers with ``writer``.

    Gunicorn has no setting or method for the shape of its own error answers: ``handle_error``
    calls the module function ``util.write_error``. Called in a worker process only (after
    the fork), so the master and other servers' workers are untouched.
    """
    util.write_error = writer


def retire_first(arbiter: gunicorn.arbiter.Arbiter, leaving: Iterable[Any]) -> None:
    """On a scale-down, make ``leaving`` the workers Gunicorn stops.

    ``manage_workers`` stops the workers with the lowest ``age``; no hook chooses them, so the
    leaving ones are given ages below every other's (ages are only compared, never shown).
    """
    oldest = min((w.age for w in arbiter.WORKERS.values()), default=0)
    for rank, worker in enumerate(leaving):
        worker.age = oldest - 1 - rank


def move_control_socket(arbiter: gunicorn.arbiter.Arbiter, path: str) -> None:
    """Point the control socket at the run directory settled after binding.

    The socket is set up after ``when_ready`` from ``cfg.control_socket``; the setting is
    changed in place because the bound address is only known in the master, after binding.
    """
    arbiter.cfg.set("control_socket", path)


def stop_gracefully_with(arbiter: gunicorn.arbiter.Arbiter, stop: Callable[[], None]) -> None:
    """Make ``stop`` the master's SIGTERM handler (it ends by raising ``StopIteration``, as
    Gunicorn's own ``handle_term`` does, so the main loop halts and exits 0).

    Gunicorn's SIGTERM closes the listeners before the workers go (``Arbiter.stop``), which
    resets the accept queue; no setting or hook runs before that. The main loop finds the
    handler by name (``getattr(self, "handle_term")``), so it is set on this arbiter only.
    """
    arbiter.handle_term = stop


def keep_control_socket_file(arbiter: gunicorn.arbiter.Arbiter) -> None:
    """Stop this master's control socket server without removing the socket file.

    After a USR2 re-exec both masters were configured with the same path, and the newer one
    bound it last; Gunicorn's ``ControlSocketServer.stop`` unlinks ``socket_path`` whatever is
    there, which would leave the surviving master unreachable by heavyctl. An empty path makes
    both of its unlinks no-ops (``os.path.exists("")`` is False).
    """
    control = arbiter._control_server
    if control is not None:
        control.socket_path = ""
        arbiter._stop_control_server()


def is_reexec() -> bool:
    """Is this master the child of a USR2 re-exec? Gunicorn exports the old master's pid then."""
    return "GUNICORN_PID" in os.environ


def set_listener_options(listeners: Iterable[Any], options: Iterable[tuple[int, int, int]]) -> None:
    """``setsockopt`` each of ``options`` on each TCP listener a worker was handed.

    Gunicorn has no setting for listener socket options; ``Worker.sockets`` holds its
    ``gunicorn.sock`` objects, which pass ``setsockopt`` to the socket. The options are
    inherited by every connection accepted afterwards; setting them again is harmless.
    """
    for listener in listeners:
        if listener.family in (socket.AF_INET, socket.AF_INET6):
            for level, name, value in options:
                listener.setsockopt(level, name, value)


def accept_as(listener: Any, cls: type[socket.socket]) -> tuple[socket.socket, Any]:
    """Accept a connection on one of ``Worker.sockets`` as a ``cls`` socket, blocking.

    ``SyncWorker.accept`` accepts a plain socket and then makes it blocking and close-on-exec
    (four ``fcntl`` calls); the kit wants its own socket class, so it accepts the descriptor
    itself (``accept4`` makes it close-on-exec already). Gunicorn's listener wrappers pass
    unknown attributes to the socket and name its family in ``FAMILY``.
    """
    fd, addr = listener.sock._accept()
    client = cls(listener.FAMILY, socket.SOCK_STREAM, 0, fileno=fd)
    if not sys.platform.startswith("linux"):  # BSDs hand over the listener's non-blocking flag
        client.setblocking(True)
    return client, addr


def close_connections_with(closer: Callable[[Any], None]) -> None:
    """Make the sync worker close each connection with ``closer``.

    ``SyncWorker.handle`` ends every connection with the module function
    ``util.close_graceful``, which lingers up to 2 s on a client that does not close; no
    setting bounds it. Called in a worker process only (after the fork).
    """
    util.close_graceful = closer


def declared_length(req: Any) -> int | None:
    """The ``Content-Length`` of a parsed request (Gunicorn checked it is one number), or None."""
    for name, value in req.headers:
        if name == "CONTENT-LENGTH":
            return int(value)
    return None


def bodiless(req: Any) -> bool:
    """Has the request no body at all (neither a length nor chunked)? Gunicorn gives such a
    request a ``LengthReader`` of 0 (``Request.set_body_reader``)."""
    reader = req.body.reader
    return isinstance(reader, LengthReader) and reader.length == 0


def take_expect_continue(req: Any) -> bool:
    """Did the client ask for ``100 Continue``? Cleared, so Gunicorn does not send a second one
    (``wsgi.create`` sends it when ``_expected_100_continue`` is set)."""
    expected = bool(req._expected_100_continue)
    req._expected_100_continue = False
    return expected


def request_body(req: Any) -> Any:
    """The request's body reader (``req.body``, what Gunicorn hands the app as ``wsgi.input``)."""
    return req.body


def replace_body(req: Any, data: bytes) -> None:
    """Hand the app ``data`` (the body, read already) as ``wsgi.input``, with Gunicorn's own
    ``Body`` so ``read``, ``readline`` and iteration behave as they did."""
    req.body = Body(LengthReader(IterUnreader([data]), len(data)))


def listen_backlog(listeners: Iterable[Any]) -> int:
    """Connections waiting in the accept queues of ``listeners`` (Gunicorn's ``get_backlog``,
    which reads ``TCP_INFO``); -1 where none can tell (a unix socket, not Linux)."""
    depths = [d for d in (listener.get_backlog() for listener in listeners) if d >= 0]
    return sum(depths) if depths else -1
