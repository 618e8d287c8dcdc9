"""Deadlines that hold for every read of a connection before the app runs.

A gate can wait for bytes without blocking (``poll``), but Gunicorn's parser then reads with
plain blocking ``recv`` calls: if the client stops half way (or the kernel woke the gate for a
reason that brought no new bytes), the worker would block until the master kills it. So each
connection is a ``DeadlineSocket``: once armed, every ``recv`` gets only the time left, and a
read that would have to wait past the deadline raises ``Stopped`` (a 408, answered by
``HeavyWorker.handle_error``) — never a blocked worker. Bytes already there are always read.

Deadlines count from the connection's first byte, as the kernel stamped it (``SO_TIMESTAMPNS``
on the listener, inherited by each connection): time a request spent in the accept queue is
time its client has had, so N slow clients on fewer workers each end within their deadline
instead of one after another.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

from workers.features import SO_TIMESTAMPNS
from workers.gates import Stop, Stopped

_TIMESPEC = struct.Struct("@ll")  # struct timespec: time_t tv_sec, long tv_nsec
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)


def peer_ip(addr: Any) -> str:
    """The client's address as the logs name it (a unix socket's peer has no ip)."""
    return addr[0] if isinstance(addr, tuple) else str(addr)


def timed_out(what: str, seconds: float, ip: str) -> Stop:
    """The 408 for a client that did not send ``what`` within ``seconds``."""
    message = f"no complete {what} within {seconds:g}s"
    return Stop(408, "Request Timeout", message, warning=f"Invalid request from ip={ip}: {message}")


class DeadlineSocket(socket.socket):
    """An accepted connection whose reads end at an armed deadline (monotonic clock)."""

    deadline: float | None = None
    missed: Stop | None = None
    #: Seconds the request waited in the accept queue (the queue gate's measure), for its
    #: access line; None when unknown.
    queue_wait: float | None = None
    #: The request's first byte (monotonic clock), or when it was adopted if none came yet.
    started: float = 0.0

    @classmethod
    def adopt(cls, client: socket.socket) -> DeadlineSocket:
        """The same connection (same file descriptor) as a ``DeadlineSocket``."""
        sock = cls(client.family, client.type, client.proto, fileno=client.detach())
        sock.settimeout(None)
        sock.started = first_byte_at(sock) or time.monotonic()
        return sock

    def arm(self, deadline: float, missed: Stop) -> None:
        """From now on a read that would wait past ``deadline`` raises ``Stopped(missed)``."""
        self.deadline, self.missed = deadline, missed

    def disarm(self) -> None:
        """Blocking reads again (the app's own time is bounded by the master's timeout)."""
        self.deadline = self.missed = None
        self.settimeout(None)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self.deadline is None:
            return super().recv(bufsize, flags)
        # 0 when the deadline passed: non-blocking, so bytes already there are still read.
        self.settimeout(max(self.deadline - time.monotonic(), 0.0))
        try:
            return super().recv(bufsize, flags)
        except (TimeoutError, BlockingIOError):
            assert self.missed is not None
            raise Stopped(self.missed) from None


#: Enough for the request line of any path worth naming in an access line.
LINE_PEEK = 1024


def request_line(data: bytes) -> str:
    """The request line among peeked bytes (all of them if no line end is there yet)."""
    return data.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")


def peek(client: socket.socket, size: int = LINE_PEEK) -> tuple[float | None, bytes]:
    """(kernel receive time of the queued bytes on the ``time.time()`` clock, up to ``size`` of
    those bytes), without waiting or consuming. The time is ``inf`` when nothing arrived yet,
    None when the kernel gave no stamp (``SO_TIMESTAMPNS`` not set on the listener) or the
    connection broke.

    TCP merges a later segment into the one queued before it and keeps the later stamp: a head
    sent in pieces reads the last piece's arrival (a shorter wait, never a longer one), and a
    client that left reads its FIN's."""
    try:
        data, ancillary, _, _ = client.recvmsg(
            size, _ANCILLARY, socket.MSG_PEEK | socket.MSG_DONTWAIT
        )
    except BlockingIOError:
        return float("inf"), b""
    except OSError:  # not ours to judge: the parser reports it
        return None, b""
    for level, kind, raw in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(raw)
            return seconds + nanoseconds / 1e9, data
    return None, data


def first_byte_at(client: socket.socket) -> float | None:
    """When the connection's first unread byte arrived, on the monotonic clock; None if no byte
    is there yet or the kernel gave no stamp."""
    arrived, _ = peek(client, 1)
    if arrived is None or arrived == float("inf"):
        return None
    return time.monotonic() - max(time.time() - arrived, 0.0)


#: How long a connection is drained after its answer while the client is still sending.
LINGER = 0.25
_MAX_DRAIN = 65536


def close_promptly(sock: socket.socket) -> None:
    """Close a connection after its answer without waiting on a client that does not close.

    Gunicorn's ``util.close_graceful`` (RFC 9112 section 9.6) sends FIN, then reads until the
    client closes, up to 2 s, so unread request bytes do not turn the close into a RST that
    truncates the answer; a client that simply keeps the connection open holds the worker those
    2 s. Here only bytes already there are drained, and only a client still sending (a refused
    body, say) gets a short, bounded linger; an idle one is closed at once (a close with nothing
    unread is a FIN, never a RST).
    """
    if isinstance(sock, DeadlineSocket):
        sock.disarm()
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER
        drained = 0
        sock.settimeout(0.0)  # first only what is there
        while drained < _MAX_DRAIN:
            data = sock.recv(4096)
            if not data:
                break
            drained += len(data)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
    except OSError:
        pass  # nothing there (BlockingIOError), the linger ended, or the client is gone
    finally:
        sock.close()
