"""The first gate: each request's queue wait, from the kernel, put to the shedding policy.

A connection waits in the kernel's accept queue until a worker is free. Past capacity that queue
only grows, every request waits longer than its client will, and the workers compute answers
for clients that have left (a "collapse": goodput falls to a few percent of capacity). So each
worker learns each request's exact queue wait and refuses, at once and cheaply, what the
shedding policy (``shedding.py``) says it could not serve in time:

- **The wait, from the kernel.** ``SO_TIMESTAMPNS`` on the listening socket (accepted sockets
  inherit it; ``HeavyWorker`` sets it) makes the kernel stamp every received segment; one
  ``recvmsg(MSG_PEEK)`` of the accepted connection (``deadline.peek``) returns
  ``SCM_TIMESTAMPNS``, the receive time of the request's first bytes on the ``time.time()``
  clock. The wait is now minus that: no proxy needed. ``X-Request-Start``
  is not used: behind nginx (which buffers the request and then opens one upstream connection
  per request) the kernel stamp already measures exactly this pool's queue, while nginx's
  ``t=${msec}`` adds the client's upload time and another host's clock; an operator who trusts
  it can still graph it from the access log.
- **A refusal** is a ``503`` with ``Retry-After``, written here from the peeked bytes: Gunicorn
  never parses the request and the app never runs.

``/healthz`` and ``/metrics`` pass regardless (liveness must never fail because the pool is
busy, and an operator must see the overload); ``/readyz`` is shed like any request, and answers
503 while this worker is shedding (``WorkerState.ready``), so readiness takes an overloaded pod
out of rotation while liveness leaves it running.
"""

from __future__ import annotations

import select
import socket
import time
from typing import Any

from workers.gates import Stop, metrics
from workers.gates.deadline import DeadlineSocket, peek, request_line
from workers.gates.departed import gone
from workers.gates.shedding import Codel

#: Paths that skip the queue's refusals: liveness and the metrics that show the overload.
EXEMPT = frozenset({b"/healthz", b"/metrics"})
RETRY_AFTER = "1"


def target_path(line: str) -> bytes:
    """The path of a request line (``GET /healthz?x HTTP/1.1`` -> ``/healthz``), no parsing."""
    parts = line.split(" ", 2)
    return parts[1].split("?", 1)[0].encode("latin-1") if len(parts) > 1 else b""


class QueueWait:
    def __init__(self, shedding: Codel) -> None:
        self.shedding = shedding
        # Requests that arrived before this worker was ready waited for a pool that was not
        # there (a start, a reload, a replaced worker), not for a slow one: the queue timeout
        # spares them (a departed client is still dropped), so a reload refuses nothing.
        self.ready_at = float("inf")
        self._poll = select.poll()
        metrics()

    def ready(self) -> None:
        """The worker has loaded its app and is about to accept: waits count from now on."""
        self.ready_at = time.time()

    def check(self, client: socket.socket, addr: Any) -> Stop | None:
        """Judge the wait; no bytes yet means no wait (the head gate waits for them). The wait
        is left on the connection for its access line."""
        arrived, data = peek(client)
        if arrived is None or gone(client, self._poll):  # a departed client's stamp is its FIN's
            return None
        now = time.time()
        wait = max(0.0, now - arrived)
        if isinstance(client, DeadlineSocket):
            client.queue_wait = wait
        metrics().wait.observe(wait)
        if not data:
            return None
        line = request_line(data)
        if target_path(line) in EXEMPT or arrived < self.ready_at:
            return None
        reason = self.shedding.reason_to_shed(wait, now)
        if reason is None:
            return None
        metrics().shed.labels(reason=reason).inc()
        return Stop(
            503,
            "Service Unavailable",
            f"overloaded: waited {wait:.3f}s for a worker; retry after {RETRY_AFTER}s",
            headers=(("Retry-After", RETRY_AFTER),),
            access_status=503,
            request_line=line,
        )
