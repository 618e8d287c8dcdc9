"""The Linux features the kit uses, probed once at start: a missing one is switched off, named in
the log with what it costs, and the server serves (Gunicorn itself runs where they are absent).

Probed in the master by ``HeavyWorker.check_config`` (Gunicorn calls it once at start and on each
reload), on a throwaway socket, so each missing feature is one line however many workers there
are; the workers inherit the answer through the fork. A listener that refuses an option the
probe allowed is the worker's to log (``HeavyWorker.set_listener_options``).
"""

from __future__ import annotations

import contextlib
import functools
import select
import socket
from dataclasses import dataclass, fields, replace
from pathlib import Path

#: ``SO_TIMESTAMPNS`` on Linux (asm-generic); Python's socket module has no constant for it.
SO_TIMESTAMPNS = 35
#: Seconds the kernel keeps a connection that sent nothing out of ``accept()``: a real HTTP
#: client speaks first, so an idle connection never wakes a worker in that time.
DEFER_ACCEPT = 30
STATM = Path("/proc/self/statm")


@dataclass(frozen=True)
class Features:
    """Which of the kit's platform features work here; the metadata says what is off without."""

    defer_accept: bool = True
    oob_inline: bool = True
    timestamps: bool = True
    rdhup: bool = True
    tcp_info: bool = True
    proc: bool = True

    def missing(self) -> list[str]:
        """One line per feature that is off: its name, then what the kit does without it."""
        return [COSTS[f.name] for f in fields(self) if not getattr(self, f.name)]

    def without(self, name: str) -> Features:
        return replace(self, **{name: False})


COSTS = {
    "defer_accept": "TCP_DEFER_ACCEPT unavailable: idle connections are accepted at once and "
    "wait in the head gate (HEAVYAPP_HEAD_TIMEOUT) instead of in the kernel",
    "oob_inline": "SO_OOBINLINE unavailable: urgent data may wake the head gate with no new "
    "bytes (its deadline still holds)",
    "timestamps": "SO_TIMESTAMPNS unavailable: queue waits come from the connection's TCP age "
    "where TCP_DEFER_ACCEPT and TCP_INFO work, else are not measured (no shedding)",
    "rdhup": "POLLRDHUP unavailable: a client that left before its turn is served anyway "
    "(no 499 drops)",
    "tcp_info": "TCP_INFO unavailable: no first-byte clock for trickled requests (the receive "
    "stamp of the latest bytes is used) and no listen backlog metric",
    "proc": f"{STATM} unreadable: HEAVYAPP_MAX_RSS_MB is not enforced",
}


def _settable(level: int, name: int | None, value: int) -> bool:
    if name is None:
        return False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(level, name, value)
    except OSError:
        return False
    return True


@functools.cache
def probe() -> Features:
    """What works on this system (cached: asked once per process, inherited by workers)."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    readable = False
    with contextlib.suppress(OSError):
        readable = bool(STATM.read_text().split())
    return Features(
        defer_accept=_settable(
            socket.IPPROTO_TCP, getattr(socket, "TCP_DEFER_ACCEPT", None), DEFER_ACCEPT
        ),
        oob_inline=_settable(socket.SOL_SOCKET, getattr(socket, "SO_OOBINLINE", None), 1),
        timestamps=_settable(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1),
        rdhup=hasattr(select, "POLLRDHUP") and hasattr(select, "poll"),
        tcp_info=tcp_info is not None and _tcp_info_readable(tcp_info),
        proc=readable,
    )


def _tcp_info_readable(option: int) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe_sock:
            return len(probe_sock.getsockopt(socket.IPPROTO_TCP, option, 104)) >= 48
    except OSError:
        return False


def listener_options(features: Features) -> list[tuple[str, int, int, int]]:
    """(feature, level, option, value) for each listener option that works here."""
    wanted = [
        ("defer_accept", socket.IPPROTO_TCP, "TCP_DEFER_ACCEPT", DEFER_ACCEPT),
        ("oob_inline", socket.SOL_SOCKET, "SO_OOBINLINE", 1),  # urgent data is data: no stall
        ("timestamps", socket.SOL_SOCKET, SO_TIMESTAMPNS, 1),  # when each request's bytes came
    ]
    return [
        (feature, level, name if isinstance(name, int) else getattr(socket, name), value)
        for feature, level, name, value in wanted
        if getattr(features, feature)
    ]
