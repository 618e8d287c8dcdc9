"""Queue wait, shedding and departed clients: answer what the pool can, in time, refuse the rest.

A connection waits in the kernel's accept queue until a worker is free. Past capacity that queue
only grows, every request waits longer than its client will, and the workers compute answers
for clients that have left (a "collapse": goodput falls to a few percent of capacity). So each
worker learns each request's exact queue wait and refuses, at once and cheaply, what it could
not serve in time:

- **The wait, from the kernel.** ``SO_TIMESTAMPNS`` on the listening socket (accepted sockets
  inherit it; ``HeavyWorker`` sets it) makes the kernel stamp every received segment; one
  ``recvmsg(MSG_PEEK)`` of the accepted connection (``deadline.peek``) returns
  ``SCM_TIMESTAMPNS``, the receive time of the request's first bytes on the ``time.time()``
  clock. The wait is now minus that: no proxy needed. ``X-Request-Start``
  is not used: behind nginx (which buffers the request and then opens one upstream connection
  per request) the kernel stamp already measures exactly this pool's queue, while nginx's
  ``t=${msec}`` adds the client's upload time and another host's clock; an operator who trusts
  it can still graph it from the access log.
- **A hard cap** (``HEAVYAPP_QUEUE_TIMEOUT``): a request that waited longer is answered
  ``503`` with ``Retry-After``, written here from the peeked bytes: Gunicorn never parses it and
  the app never runs.
- **A standing queue is cut short** (``Codel``), so what is served under overload is served fast.
- **A departed client** (``ClientGone``, the last gate): a peer that closed its side before its
  turn is dropped without running the app and access-logged 499, as nginx does.

``/healthz`` and ``/metrics`` pass regardless (liveness must never fail because the pool is
busy, and an operator must see the overload); ``/readyz`` is shed like any request, and answers
503 while this worker is cutting a standing queue (``shedding``), so readiness takes an
overloaded pod out of rotation while liveness leaves it running.
"""

from __future__ import annotations

import functools
import select
import socket
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

from workers import gunicorn_internals as internals
from workers.gates import Refusal
from workers.gates.deadline import peek

POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)
#: Enough for the request line of any path worth naming in an access line.
_PEEK = 1024
#: Paths that skip the queue's refusals: liveness and the metrics that show the overload.
EXEMPT = frozenset({b"/healthz", b"/metrics"})
RETRY_AFTER = "1"

_gate: QueueWait | None = None  # this worker's queue gate (one per worker process)


def gone(client: socket.socket, poller: select.poll) -> bool:
    """Has the peer closed its side (or the connection failed)? One poll, no wait."""
    fd = client.fileno()
    poller.register(fd, POLLRDHUP)
    try:
        events = poller.poll(0)
    finally:
        poller.unregister(fd)
    return any(mask & (POLLRDHUP | select.POLLHUP | select.POLLERR) for _, mask in events)


def request_line(data: bytes) -> bytes:
    return data.split(b"\n", 1)[0].rstrip(b"\r")


def target_path(line: bytes) -> bytes:
    """The path of a request line (``GET /healthz?x HTTP/1.1`` -> ``/healthz``), no parsing."""
    parts = line.split(b" ", 2)
    return parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""


class Codel:
    """When to refuse, per worker: CoDel's idea (Nichols & Jacobson) on the accept queue.

    A burst makes a queue that drains by itself; a *standing* queue does not. CoDel tells them
    apart by the minimum wait over an interval: if even the luckiest request of a whole
    ``interval`` waited more than ``target``, the queue is standing, and the worker then refuses
    every request that waited more than ``shed_above``, so the queue drains to that and what is
    served is served well within clients' timeouts. A request that waited more than ``cap`` is
    refused always. All three follow the one setting (``cap``), so a service with slower
    requests scales them with its queue timeout.
    """

    def __init__(self, cap: float) -> None:
        self.cap = cap
        # Measured (docs/benchmarks.md, bench/overload.py): with an interval of two caps, a
        # moment of empty queue switched dropping off for a whole second, the queue grew back
        # to the cap and the median answer took 0.31 s at 4x; half a cap keeps it near 0.16 s
        # with the same goodput. A target near ``shed_above`` flapped in and out of dropping.
        self.target = cap / 10
        self.shed_above = cap / 4
        self.interval = cap / 2
        self.dropping = False
        self._window_end = float("-inf")  # before the first request: idle
        self._window_min = float("inf")

    def verdict(self, wait: float, now: float) -> str | None:
        """The shed reason for a request that waited ``wait`` s, picked up at ``now``; or None."""
        if now >= self._window_end:
            # A window with no request at all (now past its end by a whole interval): idle.
            idle = now >= self._window_end + self.interval
            self.dropping = not idle and self._window_min > self.target
            self._window_end, self._window_min = now + self.interval, float("inf")
        self._window_min = min(self._window_min, wait)
        if wait > self.cap:
            return "queue-timeout"
        if self.dropping and wait > self.shed_above:
            return "codel"
        return None


@functools.cache
def _metrics() -> SimpleNamespace:
    """Made on first use, in the worker: ``prometheus_client`` must not be imported in the
    master before the metrics directory is set (``workers/master/metrics.py``)."""
    from prometheus_client import Counter, Histogram

    return SimpleNamespace(
        shed=Counter(
            "heavyapp_shed_total",
            "Requests refused or dropped before the app ran, by reason "
            "(queue-timeout, codel, client-gone).",
            ["reason"],
        ),
        wait=Histogram(
            "heavyapp_queue_wait_seconds",
            "Time from a request's first bytes reaching this host to a worker picking it up.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        ),
    )


class QueueWait:
    """The first gate: measure the wait, refuse a request that waited too long."""

    def __init__(self, cap: float, log: Any, listeners: Sequence[Any]) -> None:
        global _gate
        self.codel = Codel(cap)
        self.log = log  # the worker's HeavyLogger: its access lines carry the wait
        self.listeners = listeners
        # Requests that arrived before this worker was ready waited for a pool that was not
        # there (a start, a reload, a replaced worker), not for a slow one: the queue timeout
        # spares them (a departed client is still dropped), so a reload refuses nothing.
        self.ready_at = float("inf")
        self._poll = select.poll()
        _metrics()
        _gate = self

    def ready(self) -> None:
        """The worker has loaded its app and is about to accept: waits count from now on."""
        self.ready_at = time.time()

    def check(self, client: socket.socket, addr: Any) -> Refusal | None:
        """Judge the wait; no bytes yet means no wait (the head gate waits for them)."""
        arrived, data = peek(client, _PEEK)
        self.log.queue_wait = None
        if arrived is None or gone(client, self._poll):  # a departed client's stamp is its FIN's
            return None
        now = time.time()
        wait = max(0.0, now - arrived)
        self.log.queue_wait = wait
        _metrics().wait.observe(wait)
        if not data:
            return None
        line = request_line(data)
        if target_path(line) in EXEMPT or arrived < self.ready_at:
            return None
        reason = self.codel.verdict(wait, now)
        if reason is None:
            return None
        _metrics().shed.labels(reason=reason).inc()
        return Refusal(
            503,
            "Service Unavailable",
            f"overloaded: waited {wait:.3f}s for a worker; retry after {RETRY_AFTER}s",
            headers=(("Retry-After", RETRY_AFTER),),
            logged=503,
            request_line=line.decode("latin-1"),
        )


class ClientGone:
    """The last gate: a client that closed its side (``POLLRDHUP``) before its turn came."""

    def __init__(self) -> None:
        self._poll = select.poll()

    def check(self, client: socket.socket, addr: Any) -> Refusal | None:
        if not gone(client, self._poll):
            return None
        _metrics().shed.labels(reason="client-gone").inc()
        _, data = peek(client, _PEEK)
        return Refusal(
            0,
            "Client Closed Request",
            "the client left before its turn",
            logged=499,
            request_line=request_line(data).decode("latin-1"),
        )


def shedding() -> bool:
    """Is this worker cutting a standing queue now? (``/readyz`` answers 503 while it is.)"""
    return _gate is not None and _gate.codel.dropping


def log_refusal(log: Any, refusal: Refusal, addr: Any, took: float) -> None:
    """One access line for a request answered (or dropped) by a gate, from its peeked line."""
    method, target, protocol = ([*refusal.request_line.split(" ", 2), "-", "-", "-"])[:3]
    path, _, query = target.partition("?")
    environ = {
        "REMOTE_ADDR": addr[0] if isinstance(addr, tuple) else str(addr),
        "REQUEST_METHOD": method,
        "RAW_URI": target,
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_PROTOCOL": protocol,
    }
    response = SimpleNamespace(status=refusal.logged, sent=None, headers=())
    log.access(response, (), environ, timedelta(seconds=took))


class BacklogCollector:
    """``heavyapp_listen_backlog``, read at scrape time by the worker answering ``/metrics``:
    the accept queue is shared by all workers, so any of them reads the same number, exactly
    when it is asked for (the master has no periodic hook to sample it)."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        if _gate is None:
            return
        yield GaugeMetricFamily(
            "heavyapp_listen_backlog",
            "Connections waiting in the accept queue now (Gunicorn's get_backlog, TCP_INFO).",
            value=internals.listen_backlog(_gate.listeners),
        )
