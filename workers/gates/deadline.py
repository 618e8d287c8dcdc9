"""Deadlines that hold for every read of a connection before the app runs, and the clock they
count on: when the request's first byte arrived.

A gate can wait for bytes without blocking (``poll``), but Gunicorn's parser then reads with
plain blocking ``recv`` calls: if the client stops half way (or the kernel woke the gate for a
reason that brought no new bytes), the worker would block until the master kills it. So each
connection is a ``DeadlineSocket``: once armed, every ``recv`` gets only the time left, and a
read that would have to wait past the deadline raises ``Stopped`` (a 408, answered by
``HeavyWorker.handle_error``) — never a blocked worker. Bytes already there are always read.

**The first byte's time** (``FirstLook``, one look at each accepted connection that serves every
gate). Time a request spent in the accept queue is time its client has had, so deadlines and the
queue wait count from its first byte, known the first of three ways that works here:

- with ``TCP_DEFER_ACCEPT`` the kernel creates the connection only when its first data segment
  arrives, and stamps that moment as the connection's last send time (no data has been sent on
  it yet): ``TCP_INFO``'s ``tcpi_last_data_sent`` is the first byte's age, to the millisecond,
  however the rest trickled in;
- ``SO_TIMESTAMPNS`` (set on the listener, inherited by each connection) stamps the queued bytes;
  but TCP merges a later segment into the one queued before it and keeps the *later* stamp, so
  this bounds the first byte from above only (a request whose bytes came with gaps looks
  younger), exact for the usual one-segment request;
- neither (no bytes yet, or the platform has neither): the gate's own clock, from this look.
"""

from __future__ import annotations

import functools
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from workers.features import SO_TIMESTAMPNS, Features
from workers.gates import Stop, Stopped

_TIMESPEC = struct.Struct("@ll")  # struct timespec: time_t tv_sec, long tv_nsec
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)
#: ``struct tcp_info`` up to ``tcpi_last_data_sent`` (u32, milliseconds), at byte 44.
_TCP_INFO_LEN, _LAST_DATA_SENT = 48, struct.Struct("=I")
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


def peer_ip(addr: Any) -> str:
    """The client's address as the logs name it (a unix socket's peer has no ip)."""
    return addr[0] if isinstance(addr, tuple) else str(addr)


def timed_out(what: str, seconds: float, ip: str) -> Stop:
    """The 408 for a client that did not send ``what`` within ``seconds``."""
    message = f"no complete {what} within {seconds:g}s"
    return Stop(408, "Request Timeout", message, warning=f"Invalid request from ip={ip}: {message}")


def missed(what: str, seconds: float, ip: str) -> Callable[[], Stop]:
    """``timed_out``, made only if the deadline is missed (most requests never need it)."""
    return functools.partial(timed_out, what, seconds, ip)


class DeadlineSocket(socket.socket):
    """An accepted connection whose reads end at an armed deadline (monotonic clock)."""

    deadline: float | None = None
    missed: Callable[[], Stop] | None = None
    #: Bytes already queued at the first look (0: none yet; -1: closed or broken).
    seen: int = 0
    #: Seconds since the request's first byte, at the first look; None when unknown.
    queue_wait: float | None = None
    #: The request's first byte (monotonic clock), or the first look if unknown.
    started: float = 0.0

    def arm(self, deadline: float, missed: Callable[[], Stop]) -> None:
        """From now on a read that would wait past ``deadline`` raises ``Stopped(missed())``."""
        self.deadline, self.missed = deadline, missed

    def disarm(self) -> None:
        """Blocking reads again (the app's own time is bounded by the master's timeout)."""
        if self.deadline is not None:
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
            raise Stopped(self.missed()) from None


class FirstLook:
    """One non-blocking peek at a newly accepted connection that serves every gate: the bytes
    already queued (into ``buf``, as many as the parser accepts, + 1), and their first byte's
    time, left on the connection (``seen``, ``queue_wait``, ``started``)."""

    def __init__(self, size: int, features: Features) -> None:
        self.buf = bytearray(size)
        self._view = [memoryview(self.buf)]
        self._tcp_age = features.defer_accept and features.tcp_info
        # The TCP age is the first byte's time exactly: the receive stamp only where it is not.
        self._ancillary = _ANCILLARY if features.timestamps and not self._tcp_age else 0

    def take(self, sock: DeadlineSocket) -> float:
        """Look; the monotonic time of the look."""
        ancillary: list[tuple[int, int, bytes]] = []
        try:
            if self._ancillary:
                seen, ancillary, _, _ = sock.recvmsg_into(self._view, self._ancillary, _PEEK)
            else:
                seen = sock.recv_into(self.buf, 0, _PEEK)
        except BlockingIOError:
            seen, ancillary = 0, []
        except OSError:  # not ours to judge: the parser reports it
            seen, ancillary = -1, []
        else:
            seen = seen or -1  # the client closed without a byte: the parser sees the end
        sock.seen = seen
        now = time.monotonic()
        sock.started = now
        if seen > 0 and (age := self.age(sock, ancillary)) is not None:
            sock.queue_wait = age
            sock.started = now - age
        return now

    def age(self, sock: socket.socket, ancillary: list[tuple[int, int, bytes]]) -> float | None:
        """Seconds since the first queued byte arrived: the connection's TCP age where it is
        the first byte's, else the receive stamp's bound."""
        age = None
        for level, kind, raw in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = _TIMESPEC.unpack_from(raw)
                age = max(time.time() - seconds - nanoseconds / 1e9, 0.0)
        if self._tcp_age:
            try:
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
            except OSError:
                return age
            if len(info) == _TCP_INFO_LEN:
                return _LAST_DATA_SENT.unpack_from(info, 44)[0] / 1000
        return age

    def head(self, sock: DeadlineSocket, limit: int) -> bytes:
        """Up to ``limit`` of the bytes seen at the look (what names the request in a log)."""
        return bytes(self.buf[: min(max(sock.seen, 0), limit)])


#: Enough for the request line of any path worth naming in an access line.
LINE_PEEK = 1024


def request_line(data: bytes) -> str:
    """The request line among peeked bytes (all of them if no line end is there yet)."""
    return data.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")


def peek(client: socket.socket, size: int = LINE_PEEK) -> bytes:
    """Up to ``size`` queued bytes, without waiting or consuming (b"" if none or broken)."""
    try:
        return client.recv(size, _PEEK)
    except OSError:
        return b""


#: How long a connection is drained after its answer while the client is still sending.
LINGER = 0.25
_MAX_DRAIN = 65536


def declares_body(head: bytes) -> bool:
    """Does a request head announce a body (a non-zero length, or chunks)?"""
    lowered = head.lower()
    if b"transfer-encoding:" in lowered:
        return True
    _, found, rest = lowered.partition(b"content-length:")
    return bool(found) and rest.split(b"\n", 1)[0].strip() not in (b"", b"0")


def close_promptly(sock: socket.socket) -> None:
    """Close a connection after its answer without waiting on a client that does not close.

    Gunicorn's ``util.close_graceful`` (RFC 9112 section 9.6) sends FIN, then reads until the
    client closes, up to 2 s, so unread request bytes do not turn the close into a RST that
    truncates the answer; a client that simply keeps the connection open holds the worker those
    2 s. Here only bytes already there are drained, and only a client that may still be sending
    (a refused request that declared a body) gets a short, bounded linger; any other is closed
    at once (a close with nothing unread is a FIN, never a RST). Under overload most refusals
    are bodiless GETs: waiting for each such client's FIN would cost the workers more than the
    refusals themselves.
    """
    if isinstance(sock, DeadlineSocket):
        sock.disarm()
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER
        drained = 0
        linger = False
        sock.settimeout(0.0)  # first only what is there
        while drained < _MAX_DRAIN:
            data = sock.recv(4096)
            if not data:
                break
            if not drained:  # the unread head of a request a gate refused
                linger = declares_body(data)
            drained += len(data)
            left = deadline - time.monotonic()
            if linger and left > 0:
                sock.settimeout(left)
            elif linger:
                break
    except OSError:
        pass  # nothing there (BlockingIOError), the linger ended, or the client is gone
    finally:
        sock.close()
