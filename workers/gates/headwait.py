"""A deadline for the request head, before Gunicorn's parser blocks on the socket.

The sync worker's parser reads the head with no deadline of its own, so a client that connects
and sends nothing, or half a head, would hold the worker until the master's timeout kills it —
a lost worker and a crash-journal entry for one rude client. The worker asks ``HeadWait`` first:
has the whole head arrived within ``HEAVYAPP_HEAD_TIMEOUT`` seconds? Usually it is there at
once and one non-blocking peek says so; for a slow client ``SO_RCVLOWAT`` makes ``select`` wake
only when more bytes than already seen arrive, so waiting costs no CPU.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from typing import Any

from workers.gates import Refusal

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
    def __init__(self, cfg: Any, seconds: float) -> None:
        self.seconds = seconds
        # One more byte than Gunicorn accepts: a peek that fills it is the parser's to refuse.
        self._buf = bytearray(largest_head(cfg) + 1)
        # TLS bytes and a PROXY v2 preamble (which starts with a blank line) hide the head.
        self._enabled = not cfg.is_ssl and cfg.proxy_protocol == "off"

    def check(self, client: socket.socket, addr: Any) -> Refusal | None:
        """A 408 for a client whose head is not whole within the deadline."""
        if not self.applies_to(client) or self.arrived(client):
            return None
        message = f"no complete request head within {self.seconds:g}s"
        ip = addr[0] if isinstance(addr, tuple) else addr
        return Refusal(
            408, "Request Timeout", message, warning=f"Invalid request from ip={ip}: {message}"
        )

    def applies_to(self, client: socket.socket) -> bool:
        """TCP only: a unix socket is a local proxy's, and ``SO_RCVLOWAT`` does not apply."""
        return self._enabled and client.family in (socket.AF_INET, socket.AF_INET6)

    def arrived(self, client: socket.socket) -> bool:
        """True once the head's blank line is in the kernel's buffer, or the client closed its
        side, or an error occurred (the parser knows what to do with those); False at the
        deadline."""
        deadline = time.monotonic() + self.seconds
        seen = 0
        lowered = False
        try:
            while True:
                try:
                    n = client.recv_into(self._buf, 0, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    n = seen  # nothing yet
                else:
                    if n in (0, len(self._buf)) or (lowered and n == seen) or self._ends(seen, n):
                        return True  # closed, too big, half-closed (woken, nothing new), or whole
                    seen = n
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, seen + 1)
                lowered = True
                if not select.select([client], [], [], left)[0]:
                    return False
        except OSError:
            return True
        finally:
            if lowered:  # the parser's blocking reads must not wait for that many bytes
                with contextlib.suppress(OSError):
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    def _ends(self, seen: int, n: int) -> bool:
        """Does a blank line end the head within the first ``n`` bytes? Only new bytes (and the
        three before them) are searched, so a client trickling bytes costs linear time."""
        start = max(0, seen - 3)
        return self._buf.find(b"\r\n\r\n", start, n) >= 0 or self._buf.find(b"\n\n", start, n) >= 0
