"""Slow, idle and hostile clients against the kit's HeavyWorker and Gunicorn's stock sync worker.

Both servers run the same config with two workers and the defaults; only the worker class differs
(``--worker-class sync``). Each attack runs against each server in turn, and the table gives what
a client of ``/healthz`` saw meanwhile and how long the attack held the server:

- 200 connections that send nothing, held ``--hold`` seconds (``/healthz`` probed every 0.25 s);
- 8 and 16 clients that read their answer and do not close (``/healthz`` right after);
- an urgent byte after half a head, and an unfinished 200 kB head, at once (until each ended).

    .venv/bin/python -m bench.clients [--hold 20]
"""

from __future__ import annotations

import argparse
import socket
import time

from bench.common import machine, record, table
from harness.server import GunicornServer, serving

SERVERS = {
    "HeavyWorker": [],
    "stock sync": ["--worker-class", "sync"],
}
PROBE_TIMEOUT = 2.0
HUGE_UNFINISHED_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(
    b"X-Big-%d: %s\r\n" % (i, b"a" * 7000) for i in range(29)
)


def probe(server: GunicornServer) -> float:
    """Seconds for one ``/healthz``; ``PROBE_TIMEOUT`` when it got no answer in that time."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=PROBE_TIMEOUT) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            sock.recv(65536)
        except TimeoutError:
            return PROBE_TIMEOUT
    return time.monotonic() - started


def idle(server: GunicornServer, hold: float) -> str:
    conns = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(200)]
    probes: list[float] = []
    started = time.monotonic()
    while time.monotonic() - started < hold and len(probes) < 10_000:
        probes.append(probe(server))
        time.sleep(0.25)
    for sock in conns:
        sock.close()
    missed = sum(p >= PROBE_TIMEOUT for p in probes)
    return f"worst {max(probes):.3f}s, {missed}/{len(probes)} unanswered in {PROBE_TIMEOUT:g}s"


def not_closing(server: GunicornServer, count: int) -> str:
    conns = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        conns.append(sock)
    started = time.monotonic()
    while time.monotonic() - started < 40:  # /healthz as a patient client sees it
        if probe(server) < PROBE_TIMEOUT:
            break
    for sock in conns:
        sock.close()
    return f"{time.monotonic() - started:.3f}s"


def hostile(server: GunicornServer) -> str:
    workers = server.worker_pids()
    urgent = socket.create_connection(("127.0.0.1", server.port))
    urgent.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    urgent.send(b"!", socket.MSG_OOB)
    huge = socket.create_connection(("127.0.0.1", server.port))
    huge.sendall(HUGE_UNFINISHED_HEAD)
    started = time.monotonic()
    ended = []
    for sock in (urgent, huge):
        sock.settimeout(60)
        try:
            answer = sock.recv(65536)
            while sock.recv(65536):
                pass
        except OSError:
            answer = b""
        status = answer[9:12].decode() or "close"
        ended.append(f"{time.monotonic() - started:.1f}s ({status})")
        sock.close()
    time.sleep(1)  # let the master replace a killed worker before counting
    lost = len(set(workers) - set(server.worker_pids()))
    return f"urgent {ended[0]}, 200 kB head {ended[1]}, {lost} workers lost"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hold", type=float, default=20.0, help="seconds idle connections stay")
    args = parser.parse_args()
    rows = []
    for name, extra in SERVERS.items():
        with serving(GunicornServer(workers=2, args=extra)) as server:
            rows.append(
                [
                    name,
                    idle(server, args.hold),
                    not_closing(server, 8),
                    not_closing(server, 16),
                    hostile(server),
                ]
            )
    print(machine())
    print()
    headers = [
        "worker",
        f"/healthz, 200 idle held {args.hold:g}s",
        "/healthz after 8 non-closing",
        "after 16 non-closing",
        "urgent byte + 200 kB head at once",
    ]
    print(table(headers, rows))


if __name__ == "__main__":
    record(main)
