"""A deadline for the request head, before Gunicorn's parser blocks on the socket.

The sync worker's parser reads the head with no deadline of its own, so a client that connects
and sends nothing, or half a head, would hold the worker until the master's timeout kills it —
a lost worker and a crash-journal entry for one rude client. The worker asks ``HeadWait`` first:
has the whole head arrived within ``HEAVYAPP_HEAD_TIMEOUT`` seconds? Usually it is there at
once and one non-blocking peek says so; for a slow client ``SO_RCVLOWAT`` makes ``poll`` wake
only when more bytes than already seen arrive, so waiting costs no CPU.

The deadline is airtight: the gate then arms the connection (``DeadlineSocket``) so the parser's
own reads end at the same deadline. That matters when the gate is woken with nothing new to
see: urgent data (``MSG_OOB``; ``SO_OOBINLINE`` on the listener makes it ordinary data, which
the parser refuses), or a head bigger than the receive window, which the kernel will not let in
until someone reads (``tcp_poll`` reports a closed window as readable). Only ``POLLRDHUP``
means the client closed its side.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from typing import Any

from workers.gates import Stop
from workers.gates.deadline import DeadlineSocket, FirstLook, missed, peer_ip, timed_out

# Gunicorn's own defaults for a limit set to 0 (gunicorn/http/message.py).
_MAX_HEADERS, _FIELD_SIZE, _UNLIMITED_LINE = 32768, 8190, 1024 * 1024


def largest_head(cfg: Any) -> int:
    """The most bytes of head Gunicorn's parser accepts under ``cfg``'s limits."""
    fields = (
        cfg.limit_request_fields if 0 < cfg.limit_request_fields <= _MAX_HEADERS else _MAX_HEADERS
    )
    size = cfg.limit_request_field_size if cfg.limit_request_field_size > 0 else _FIELD_SIZE
    line = cfg.limit_request_line if cfg.limit_request_line > 0 else _UNLIMITED_LINE
    return line + 2 + fields * (size + 2) + 4


class HeadWait:
    def __init__(
        self, cfg: Any, look: FirstLook, seconds: float, deferred: float = 0, rdhup: bool = True
    ) -> None:
        """``deferred``: the listener's ``TCP_DEFER_ACCEPT`` seconds (0 if none). The kernel
        hands over a connection that sent nothing only after that long, so with a deferral
        past the deadline, a silent connection has missed it already and goes at once.
        ``rdhup``: ``POLLRDHUP`` exists (without it a half-closed client is seen by the parser
        at the deadline)."""
        self.seconds = seconds
        self.deferred = deferred
        self._events = select.POLLIN | (select.POLLRDHUP if rdhup else 0)
        self._closed = select.POLLHUP | select.POLLERR | (select.POLLRDHUP if rdhup else 0)
        # One more byte than Gunicorn accepts (``largest_head``): a peek that fills it is the
        # parser's to refuse. The first look filled it already; a wait peeks into it again.
        self._buf = look.buf
        self._poll = select.poll()
        # TLS bytes and a PROXY v2 preamble (which starts with a blank line) hide the head.
        self._enabled = not cfg.is_ssl and cfg.proxy_protocol == "off"

    def check(self, client: socket.socket, addr: Any) -> Stop | None:
        """A 408 for a client whose head is not whole within the deadline, counted from its
        first byte; else arm the connection so the parser's reads keep to that deadline (also
        where the wait does not apply: a unix socket, a PROXY protocol preamble) — unless the
        whole head was there at the first look, the usual case: reading bytes already there
        never blocks, and the body has a deadline of its own."""
        if not isinstance(client, DeadlineSocket):
            return None
        deadline = client.started + self.seconds
        if self.applies_to(addr):
            seen = client.seen
            if self.deferred >= self.seconds and seen == 0:  # silent for the whole deferral
                return timed_out("request head", self.deferred, peer_ip(addr))
            if seen < 0 or seen == len(self._buf) or self._ends(0, seen):
                return None  # all there (or the parser's to refuse): its reads cannot block
            if not self.arrived(client, deadline, seen):
                return timed_out("request head", self.seconds, peer_ip(addr))
        client.arm(deadline, missed("request head", self.seconds, peer_ip(addr)))
        return None

    def applies_to(self, addr: Any) -> bool:
        """Does the wait apply? TCP only (``SO_RCVLOWAT`` and ``TCP_DEFER_ACCEPT`` are TCP's;
        a TCP peer's address is a tuple, a unix socket's a string), and only where the plain
        head is what arrives first."""
        return self._enabled and isinstance(addr, tuple)

    def arrived(self, client: socket.socket, deadline: float, seen: int) -> bool:
        """True once the head's blank line is in the kernel's buffer, or the parser must read
        to see more (the client closed its side, the head fills what the kernel will take, an
        error); False at the deadline. ``seen``: bytes already looked at."""
        lowered = False
        poller = self._poll
        poller.register(client, self._events)
        try:
            while True:
                try:
                    n = client.recv_into(self._buf, 0, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    n = seen  # nothing yet
                else:
                    if n in (0, len(self._buf)) or (lowered and n == seen) or self._ends(seen, n):
                        return True  # closed, too big, nothing more will come in, or whole
                    seen = n
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, seen + 1)
                lowered = True
                events = poller.poll(max(left * 1000, 1))
                if not events:
                    return False
                if events[0][1] & self._closed:
                    return True  # the parser reads what is there, then sees the end
        except OSError:
            return True
        finally:
            poller.unregister(client)
            if lowered:  # the parser's reads must not wait for that many bytes
                with contextlib.suppress(OSError):
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    def _ends(self, seen: int, n: int) -> bool:
        """Does a blank line end the head within the first ``n`` bytes? Only new bytes (and the
        three before them) are searched, so a client trickling bytes costs linear time."""
        start = max(0, seen - 3)
        return self._buf.find(b"\r\n\r\n", start, n) >= 0 or self._buf.find(b"\n\n", start, n) >= 0
