"""The listener's door: stop the kernel taking new connections without dropping the queued ones.

Closing a listening socket resets every connection waiting in its accept queue (Gunicorn issue
3397), and ``shutdown()`` on it does the same. What keeps the queue is a socket filter
(``SO_ATTACH_FILTER``, classic BPF) that drops a bare SYN: the kernel runs a listener's filter
on each packet that reaches it, so new handshakes never start (the client's SYN is retried in
about a second, and is refused once the listener is closed), while the connections already in
the queue keep their own sockets and are accepted and served as usual. A handshake that was half
done when the door closed still completes (its ACK is let through), and joins the queue.

The filter is on the kernel's socket, which the master and every worker share: set once, it
holds for all of them; ``open_`` takes it off again (systemd's or a re-exec'd master's socket
outlives this process and must not keep it).
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Iterable
from typing import Any

SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)  # asm-generic/socket.h
SO_DETACH_FILTER = getattr(socket, "SO_DETACH_FILTER", 27)
_SYN, _ACK = 0x02, 0x10
#: Classic BPF over the TCP header (the kernel hands a TCP socket's filter the segment from its
#: TCP header on): load the flags byte, keep SYN and ACK, a bare SYN -> drop, anything else ->
#: keep all of it.
_DROP_BARE_SYN = (
    (0x30, 0, 0, 13),  # ldb [13]
    (0x54, 0, 0, _SYN | _ACK),  # and #0x12
    (0x15, 0, 1, _SYN),  # jeq #0x02, next, skip one
    (0x06, 0, 0, 0),  # ret #0: drop
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1: keep
)
_PROGRAM = ctypes.create_string_buffer(
    b"".join(struct.pack("HBBI", *instruction) for instruction in _DROP_BARE_SYN)
)
#: ``struct sock_fprog``: the instruction count, then a pointer to them (kept alive above).
_FPROG = struct.pack("HL", len(_DROP_BARE_SYN), ctypes.addressof(_PROGRAM))


def tcp(listeners: Iterable[Any]) -> list[Any]:
    """The TCP listeners among ``listeners`` (a unix socket's queue has no such door)."""
    return [lnr for lnr in listeners if lnr.family in (socket.AF_INET, socket.AF_INET6)]


def close(listeners: Iterable[Any]) -> list[Any]:
    """Shut the door of each TCP listener; the ones it is shut on (an error leaves one open)."""
    shut = []
    for listener in tcp(listeners):
        try:
            listener.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, _FPROG)
        except OSError:
            continue
        shut.append(listener)
    return shut


def open_(listeners: Iterable[Any]) -> None:
    """Take the filter off again (harmless where there is none)."""
    for listener in tcp(listeners):
        try:
            listener.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, b"\0" * 4)
        except OSError:
            continue
