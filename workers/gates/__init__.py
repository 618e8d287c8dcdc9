"""What a connection must pass in the worker before the app runs, one gate per module.

``HeavyWorker.handle`` asks each gate in turn; the first that stops a connection deals with the
client itself (a ``Stop``), so the app never runs for a request that could not be served well.
One vocabulary throughout: a gate **refuses** a request when it answers it instead of the app
(503, 408, 413, ...), and **drops** it when it closes the connection without an answer (the
client has left); **shedding** is the policy that decides which queued requests to refuse
under overload (``shedding.py``). A gate costs the usual request one cheap look at the socket.

- ``queue.py``: the queue wait, measured from the kernel; the shedding policy's question.
- ``headwait.py``: the request head, whole within its deadline.
- ``departed.py``: a client that left before its turn.
- ``body.py``: the body, read into memory within its deadline (after the parser).
- ``deadline.py``: the connection whose every read keeps to the deadline of the moment.
"""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace
from typing import Any, Protocol


@dataclass(frozen=True)
class Stop:
    """What a gate does instead of the app: refuse with ``status``, or drop (``status`` 0)."""

    status: int
    reason: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()
    warning: str | None = None  # one line for the error log, if an operator should hear of it
    #: The status of the one access line this stop gets (499: the client left), 0 for none;
    #: ``request_line`` is what the client asked, as peeked (Gunicorn never parsed it).
    access_status: int = 0
    request_line: str = ""


class Stopped(Exception):
    """Raised inside Gunicorn's request handling to answer with ``stop`` instead of the app.

    Not an ``OSError``: the sync worker swallows those; this reaches ``handle_error``."""

    def __init__(self, stop: Stop) -> None:
        super().__init__(stop.message)
        self.stop = stop


class Gate(Protocol):
    def check(self, client: socket.socket, addr: Any) -> Stop | None:
        """None to let the connection through to the next gate (and then the app)."""


def log_access(log: Any, stop: Stop, client: socket.socket, addr: Any, took: float) -> None:
    """The one access line of a request a gate refused or dropped, from its peeked line, in
    the server's own access format (the connection carries its queue wait to the logger)."""
    method, target, protocol = ([*stop.request_line.split(" ", 2), "-", "-", "-"])[:3]
    path, _, query = target.partition("?")
    environ = {
        "REMOTE_ADDR": addr[0] if isinstance(addr, tuple) else str(addr),
        "REQUEST_METHOD": method,
        "RAW_URI": target,
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_PROTOCOL": protocol,
        "gunicorn.socket": client,
    }
    response = SimpleNamespace(status=stop.access_status, sent=None, headers=())
    log.access(response, (), environ, timedelta(seconds=took))


#: Why a request was stopped before the app (``heavyapp_shed_total{reason}``): the shedding
#: policy's two refusals (``workers/gates/shedding.py``) and the departed client's drop.
SHED_REASONS = ("queue-timeout", "queue-growing", "client-gone")


@functools.cache
def metrics() -> SimpleNamespace:
    """The gates' metrics, made on first use in the worker: ``prometheus_client`` must not be
    imported in the master before the metrics directory is set (``workers/master/metrics.py``)."""
    from prometheus_client import Counter, Histogram

    shed = Counter(
        "heavyapp_shed_total",
        "Requests refused or dropped before the app ran, by reason "
        "(queue-timeout, queue-growing, client-gone).",
        ["reason"],
    )
    # Every reason at 0 from the start: an alert's rate() then counts the first refusal too.
    for reason in SHED_REASONS:
        shed.labels(reason=reason)
    return SimpleNamespace(
        shed=shed,
        wait=Histogram(
            "heavyapp_queue_wait_seconds",
            "Time from a request's first bytes reaching this host to a worker picking it up.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        ),
    )
