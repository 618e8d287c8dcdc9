"""Slow and idle clients against a server while a probe measures whether /healthz still answers.

The attack a buffering front exists for: many idle connections, request heads sent halfway,
bodies sent a byte per second, all held (and reopened when the server drops them) for the whole
run, while ``GET /healthz`` is probed on fresh connections at a fixed pace. Against a bare pool
of sync workers each of those connections takes a worker; against nginx none reaches Gunicorn.

    python -m harness.attack --seconds 30            # kit behind the shipped nginx config
    python -m harness.attack --seconds 30 --bare     # the same attack on the bare kit

Every loop is bounded in count and time; every socket is closed on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import selectors
import socket
import threading
import time
from dataclasses import asdict, dataclass, field

from harness.closedloop import percentile

SLOW_HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # half a head: no blank line, ever
SLOW_BODY_HEAD = (
    b"POST /heavy HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n"
)


@dataclass
class AttackResult:
    """What the probe saw while the attack held, and what the attackers did."""

    seconds: float
    probes: int
    failures: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    opened: int  # attack connections opened, reopenings included
    dropped_by_server: int  # attack connections the server closed (and we reopened)
    body_bytes_sent: int
    latencies_ms: list[float] = field(repr=False, default_factory=list)

    def summary(self) -> dict[str, float | int]:
        return {k: v for k, v in asdict(self).items() if k != "latencies_ms"}


@dataclass(frozen=True)
class Mix:
    """How many attacking connections of each kind are held open."""

    idle: int = 200
    slow_heads: int = 50
    slow_bodies: int = 8


#: The attack docs/front.md measures: 200 idle connections, 50 slow heads, 8 slow bodies.
FULL_MIX = Mix()


class _Slot:
    """One attacking connection: what it sends, and its socket while open."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "idle", "head" or "body"
        self.sock: socket.socket | None = None
        self.body_sent = 0


class Attackers:
    """The attacking connections, driven from one thread with a selector until ``stop()``."""

    def __init__(
        self, host: str, port: int, mix: Mix = FULL_MIX, *, max_reopens_per_slot: int = 20
    ) -> None:
        self.addr = (host, port)
        self.slots = (
            [_Slot("idle") for _ in range(mix.idle)]
            + [_Slot("head") for _ in range(mix.slow_heads)]
            + [_Slot("body") for _ in range(mix.slow_bodies)]
        )
        self.reopen_budget = max_reopens_per_slot * len(self.slots)
        self.opened = 0
        self.dropped = 0
        self.body_bytes = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._thread = threading.Thread(target=self._run, name="attackers", daemon=True)

    def _open(self, slot: _Slot) -> None:
        sock = socket.create_connection(self.addr, timeout=2)
        try:
            if slot.kind == "head":
                sock.sendall(SLOW_HEAD)
            elif slot.kind == "body":
                sock.sendall(SLOW_BODY_HEAD)
            sock.setblocking(False)
            self._sel.register(sock, selectors.EVENT_READ, slot)
        except OSError:
            sock.close()
            raise
        slot.sock, slot.body_sent = sock, 0
        self.opened += 1

    def _close(self, slot: _Slot) -> None:
        if slot.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(slot.sock)
            slot.sock.close()
            slot.sock = None

    def start(self) -> Attackers:
        """Open every connection (the attack is in place when this returns), then hold them."""
        for slot in self.slots:
            self._open(slot)
        self._thread.start()
        return self

    def _run(self) -> None:
        next_byte = time.monotonic() + 1.0
        # 100 ms per turn at most: bounded by the stop event and by a hard count (an hour).
        for _ in range(36_000):
            if self._stop.is_set():
                return
            try:
                for key, _ in self._sel.select(timeout=0.1):
                    slot: _Slot = key.data
                    try:
                        if slot.sock is not None:
                            slot.sock.recv(4096)
                    except BlockingIOError:
                        continue  # a spurious wake-up: nothing to read after all
                    except OSError:
                        pass  # reset: dropped like a close
                    # Any answer (a 408, a 400) or a close: the server dropped us. A real
                    # attacker comes back, so we do too, within the budget.
                    self.dropped += 1
                    self._close(slot)
                    if self.reopen_budget > 0:
                        self.reopen_budget -= 1
                        self._open(slot)
                if time.monotonic() >= next_byte:
                    next_byte += 1.0
                    for slot in self.slots:
                        if slot.kind == "body" and slot.sock is not None and slot.body_sent < 999:
                            with contextlib.suppress(BlockingIOError):
                                slot.body_sent += slot.sock.send(b"x")
                                self.body_bytes += 1
            except OSError as exc:  # a reopen refused: note it, keep holding the rest
                self.errors.append(repr(exc))
                if len(self.errors) > 100:
                    return

    def stop(self) -> None:
        """Stop the thread and close every socket."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for slot in self.slots:
            self._close(slot)
        self._sel.close()


def probe(host: str, port: int, timeout: float) -> float | None:
    """Milliseconds for one ``GET /healthz`` on a fresh connection; None if it failed."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        resp.read()
        ok = resp.status == 200
    except (OSError, http.client.HTTPException):
        ok = False
    finally:
        conn.close()
    return (time.perf_counter() - started) * 1000 if ok else None


def run_attack(
    host: str,
    port: int,
    seconds: float,
    *,
    mix: Mix = FULL_MIX,
    probe_every: float = 0.2,
    probe_timeout: float = 5.0,
) -> AttackResult:
    """Hold the attack for ``seconds`` while probing /healthz every ``probe_every`` s.

    A failed probe (error, non-200 or no answer within ``probe_timeout``) counts as
    ``probe_timeout`` in the percentiles, so a starved server cannot look fast.
    """
    attackers = Attackers(host, port, mix)
    latencies: list[float] = []
    failures = 0
    started = time.monotonic()
    try:
        attackers.start()
        deadline = time.monotonic() + seconds
        next_probe = time.monotonic()
        for _ in range(int(seconds / probe_every) + 1):
            now = time.monotonic()
            if now >= deadline:
                break
            if next_probe > now:
                time.sleep(min(next_probe, deadline) - now)
            ms = probe(host, port, probe_timeout)
            if ms is None:
                failures += 1
                ms = probe_timeout * 1000
            latencies.append(ms)
            next_probe += probe_every
    finally:
        attackers.stop()
    return AttackResult(
        seconds=round(time.monotonic() - started, 2),
        probes=len(latencies),
        failures=failures,
        p50_ms=round(percentile(latencies, 50), 1),
        p99_ms=round(percentile(latencies, 99), 1),
        max_ms=round(max(latencies, default=math.nan), 1),
        opened=attackers.opened,
        dropped_by_server=attackers.dropped,
        body_bytes_sent=attackers.body_bytes,
        latencies_ms=latencies,
    )


def main(argv: list[str] | None = None) -> None:
    """Start the kit (and nginx unless ``--bare``) on loopback, attack, print JSON figures."""
    from harness.nginx import fronting
    from harness.server import GunicornServer, serving

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--bare", action="store_true", help="attack the kit without nginx")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    with serving(GunicornServer(workers=args.workers)) as server:
        before = server.worker_pids()
        if args.bare:
            result = run_attack("127.0.0.1", server.port, args.seconds)
        else:
            with fronting(server) as front:
                result = run_attack("127.0.0.1", front.port, args.seconds)
        after = server.worker_pids()
    report = {
        "target": "bare kit" if args.bare else "kit behind nginx",
        **result.summary(),
        "workers_before": before,
        "workers_after": after,
        "workers_lost": sorted(set(before) - set(after)),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
