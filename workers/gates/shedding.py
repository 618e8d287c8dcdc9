"""The shedding policy: which queued requests the queue gate refuses, per worker.

CoDel's idea (Nichols & Jacobson, "Controlling Queue Delay", 2012) on the accept queue. A burst
makes a queue that drains by itself; a *standing* queue does not. CoDel tells them apart by the
minimum wait over an interval: if even the luckiest request of a whole ``interval`` waited more
than ``target``, the queue is standing, and the worker then sheds every request that waited
more than ``shed_above``, so the queue drains to that and what is served is served well within
clients' timeouts. A request that waited more than ``cap`` is refused always. All three follow
the one setting (``cap``), so a service with slower requests scales them with its queue timeout.
"""

from __future__ import annotations


class Codel:
    def __init__(self, cap: float) -> None:
        self.cap = cap
        # Measured (docs/benchmarks.md, bench/overload.py): with an interval of two caps, a
        # moment of empty queue switched shedding off for a whole second, the queue grew back
        # to the cap and the median answer took 0.31 s at 4x; half a cap keeps it near 0.16 s
        # with the same goodput. A target near ``shed_above`` flapped in and out of shedding.
        self.target = cap / 10
        self.shed_above = cap / 4
        self.interval = cap / 2
        self.shedding = False
        self._window_end = float("-inf")  # before the first request: idle
        self._window_min = float("inf")

    def reason_to_shed(self, wait: float, now: float) -> str | None:
        """Why a request that waited ``wait`` s, picked up at ``now``, is refused; or None."""
        if now >= self._window_end:
            # A window with no request at all (now past its end by a whole interval): idle.
            idle = now >= self._window_end + self.interval
            self.shedding = not idle and self._window_min > self.target
            self._window_end, self._window_min = now + self.interval, float("inf")
        self._window_min = min(self._window_min, wait)
        if wait > self.cap:
            return "queue-timeout"
        if self.shedding and wait > self.shed_above:
            return "codel"
        return None
