"""Closed-loop clients that tell, for every request, what became of it: the lifecycle's witness.

Each client sends one request per connection, back to back, and files the outcome: answered
(by status), **lost** (the connection was reset or closed without an answer: what a stop, a
reload or a death must never cost), refused (nobody listens: fine once the server is gone) or
timed out. Used by tests/test_lifecycle.py, tests/test_front.py and bench/lifecycle.py, so all
of them count the same way. Every loop is bounded in time; every socket is closed.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Tally:
    """What the clients saw; the lists hold ``time.time()`` of each event."""

    statuses: Counter = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)  # "reset", "closed", ... with no answer
    refused: list[float] = field(default_factory=list)
    timed_out: int = 0
    last_answer: float = 0.0
    headers: Counter = field(default_factory=Counter)  # ("connection", "close") etc.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    def summary(self) -> dict[str, object]:
        return {
            "answered": self.answered,
            "statuses": dict(self.statuses),
            "lost": len(self.lost),
            "refused": len(self.refused),
            "timed_out": self.timed_out,
        }


class Clients:
    """``count`` threads, each sending ``method path`` on a fresh connection to ``port``, back to
    back (or one every ``pace`` seconds: load below capacity), until ``stop()``, ``seconds``
    elapsed, or (with ``until_refused``) a refusal."""

    def __init__(
        self,
        port: int,
        path: str,
        count: int,
        *,
        method: str = "GET",
        seconds: float = 60.0,
        until_refused: bool = True,
        timeout: float = 10.0,
        pace: float = 0.0,
    ) -> None:
        self.port, self.path, self.method = port, path, method
        self.count = count
        self.deadline = time.monotonic() + seconds
        self.until_refused = until_refused
        self.timeout = timeout
        self.pace = pace
        self.tally = Tally()
        self.finished = [0] * count  # requests each client has finished, whatever became of them
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(count)
        ]

    def start(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> Tally:
        self._stop.set()
        self.join(timeout)
        return self.tally

    def join(self, timeout: float = 30.0) -> Tally:
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        return self.tally

    def progress(self) -> list[int]:
        """A snapshot for ``past``."""
        return list(self.finished)

    def past(self, snapshot: list[int]) -> bool:
        """Has every client finished a request since ``snapshot``? Then whatever was in flight
        when it was taken (a retry included) is over."""
        return all(now > then for now, then in zip(self.finished, snapshot, strict=True))

    def _loop(self, index: int) -> None:
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            began = time.monotonic()
            outcome = self._one()
            self.finished[index] += 1
            if outcome == "refused" and self.until_refused:
                return
            self._stop.wait(max(0.0, self.pace - (time.monotonic() - began)))

    def _one(self) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        tally = self.tally
        try:
            conn.request(self.method, self.path, body=b"" if self.method == "POST" else None)
            resp = conn.getresponse()
            resp.read()
        except ConnectionRefusedError:
            with tally.lock:
                tally.refused.append(time.time())
            return "refused"
        except TimeoutError:
            with tally.lock:
                tally.timed_out += 1
            return "timeout"
        except (OSError, http.client.HTTPException) as exc:
            with tally.lock:
                tally.lost.append(type(exc).__name__)
            return "lost"
        finally:
            conn.close()
        with tally.lock:
            tally.statuses[resp.status] += 1
            tally.headers["connection: " + (resp.getheader("Connection") or "-").lower()] += 1
            tally.last_answer = time.time()
        return "answered"
