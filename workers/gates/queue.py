"""The first gate: each request's queue wait, from the kernel, put to the shedding policy.

A connection waits in the kernel's accept queue until a worker is free. Past capacity that queue
only grows, every request waits longer than its client will, and the workers compute answers
for clients that have left (a "collapse": goodput falls to a few percent of capacity). So each
worker learns each request's exact queue wait and refuses, at once and cheaply, what the
shedding policy (``shedding.py``) says it could not serve in time:

- **The wait, from the kernel.** ``SO_TIMESTAMPNS`` on the listening socket (accepted sockets
  inherit it; ``HeavyWorker`` sets it) makes the kernel stamp every received segment; one
  ``recvmsg(MSG_PEEK)`` of the accepted connection (``deadline.FirstLook``) returns
  ``SCM_TIMESTAMPNS``, the receive time of the queued bytes; with ``TCP_DEFER_ACCEPT`` the
  connection's ``TCP_INFO`` age is its first byte's, however the rest trickled in. The wait is
  now minus the first byte's time: no proxy needed. ``X-Request-Start``
  is not used: behind nginx (which buffers the request and then opens one upstream connection
  per request) the kernel stamp already measures exactly this pool's queue, while nginx's
  ``t=${msec}`` adds the client's upload time and another host's clock; an operator who trusts
  it can still graph it from the access log.
- **A refusal** (what the shedding policy says cannot be served in time) is a ``503`` with
  ``Retry-After``, written here from the peeked bytes: Gunicorn never parses the request and
  the app never runs.

``/healthz`` and ``/metrics`` pass regardless (liveness must never fail because the pool is
busy, and an operator must see the overload); ``/readyz`` is shed like any request, and answers
503 while this worker is shedding (``WorkerState.ready``), so readiness takes an overloaded pod
out of rotation while liveness leaves it running.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from workers.gates import Stop, metrics
from workers.gates.deadline import LINE_PEEK, DeadlineSocket, FirstLook, request_line
from workers.gates.shedding import Shedding

#: Paths that skip the queue's refusals: liveness and the metrics that show the overload.
EXEMPT = frozenset({b"/healthz", b"/metrics"})
RETRY_AFTER = "1"


def target_path(line: str) -> bytes:
    """The path of a request line (``GET /healthz?x HTTP/1.1`` -> ``/healthz``), no parsing."""
    parts = line.split(" ", 2)
    return parts[1].split("?", 1)[0].encode("latin-1") if len(parts) > 1 else b""


class QueueWait:
    def __init__(self, shedding: Shedding, look: FirstLook, depth: Callable[[], int]) -> None:
        self.shedding = shedding
        self.look = look
        self.depth = depth
        # Requests that arrived before this worker was ready waited for a pool that was not
        # there (a start, a reload, a replaced worker), not for a slow one: the queue timeout
        # spares them (a departed client is still dropped), so a reload refuses nothing.
        self.ready_at = float("inf")
        metrics()

    def ready(self) -> None:
        """The worker has loaded its app and is about to accept: waits count from now on."""
        self.ready_at = time.monotonic()

    def check(self, client: socket.socket, addr: Any) -> Stop | None:
        """Judge the wait the first look measured (none: not judged; the head gate waits for
        the bytes). The wait stays on the connection for its access line."""
        wait = client.queue_wait if isinstance(client, DeadlineSocket) else None
        if wait is None:
            return None
        metrics().wait.observe(wait)
        if client.started < self.ready_at:
            return None
        reason = self.shedding.reason_to_shed(wait, time.monotonic(), self.depth)
        if reason is None:
            return None
        line = request_line(self.look.head(client, LINE_PEEK))
        if target_path(line) in EXEMPT:
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
