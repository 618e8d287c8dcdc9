"""The last gate: a client that closed its side before its turn came is dropped.

``POLLRDHUP`` (Linux) reports a peer that closed its side even while its request bytes are still
unread; such a request is closed without an answer and without running the app, access-logged
499 as nginx does. A half-closing client that still reads its answer is rare over HTTP/1.1.
"""

from __future__ import annotations

import select
import socket
from typing import Any

from workers.gates import Stop, metrics
from workers.gates.deadline import peek, request_line

#: Absent off Linux: ``features.probe`` then switches this gate off (``HeavyWorker``).
POLLRDHUP = getattr(select, "POLLRDHUP", 0)


def gone(client: socket.socket, poller: select.poll) -> bool:
    """Has the peer closed its side (or the connection failed)? One poll, no wait."""
    fd = client.fileno()
    poller.register(fd, POLLRDHUP)
    try:
        events = poller.poll(0)
    finally:
        poller.unregister(fd)
    return any(mask & (POLLRDHUP | select.POLLHUP | select.POLLERR) for _, mask in events)


class ClientGone:
    def __init__(self) -> None:
        self._poll = select.poll()

    def check(self, client: socket.socket, addr: Any) -> Stop | None:
        if not gone(client, self._poll):
            return None
        metrics().shed.labels(reason="client-gone").inc()
        data = peek(client)
        return Stop(
            0,
            "Client Closed Request",
            "the client left before its turn",
            access_status=499,
            request_line=request_line(data),
        )
