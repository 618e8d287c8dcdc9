"""The shedding policy: refuse only what cannot be served in time.

Two cases, told apart by the queue's trend rather than its length:

- **A request that waited past the cap** (``HEAVYAPP_QUEUE_TIMEOUT``) is refused always
  (``queue-timeout``): its client has given up, or will before the answer.
- **A growing queue is cut to the target** (``queue-growing``). The accept queue is FIFO, so
  the ``depth`` connections behind the request just picked up all arrived while it waited:
  ``depth / wait`` is the arrival rate over that window, exactly (Little's law on the queue).
  The pool serves ``workers / service`` requests a second, ``service`` being this worker's
  measured time per request. Arrivals above ``GROWTH`` times that rate for a whole
  ``interval``, with more queued than the pool serves within the cap, mean the queue grows
  without end: from then on every request that waited more than ``target`` is refused, oldest
  first, until arrivals fall back to the pool's rate or the queue holds less than ``target``
  of work.

Under overload the queue is thus held near ``target``: what is served is served fast, and the
workers never idle. A standing but steady queue — a closed loop of callers, each waiting for its
answer, arrives exactly as fast as the pool serves — is never cut: its waits are inside the
cap, so it is served in time. A burst passes unless it outlasts the interval and the cap. Once
shedding, callers who come straight back when refused keep the arrivals high; the cap on what
is queued keeps such a loop from starting it below its reach.

All thresholds follow the cap: ``target`` a tenth of it, ``interval`` half. ``GROWTH`` leaves
room for the error of one worker's service time standing for the pool's (workers share CPUs
with other load) and for the noise of one sample; a rate between the pool's and ``GROWTH``
times it grows slowly, and the cap bounds it.
"""

from __future__ import annotations

from collections.abc import Callable

#: Arrivals above this multiple of the pool's rate mean a growing queue.
GROWTH = 1.5
#: Weight of the newest service time in the running mean (about the last 10 requests).
_NEWEST = 0.1


class Shedding:
    def __init__(self, cap: float, workers: int) -> None:
        self.cap = cap
        self.workers = max(workers, 1)
        self.target = cap / 10
        self.interval = cap / 2
        #: Mean seconds this worker takes per request it serves (None until one was served).
        self.service: float | None = None
        self._growing_since: float | None = None
        self.shedding = False

    def served(self, seconds: float) -> None:
        """A request went through the app in ``seconds`` (pick-up to close)."""
        mean = self.service
        self.service = seconds if mean is None else mean + _NEWEST * (seconds - mean)

    def reason_to_shed(self, wait: float, now: float, depth: Callable[[], int]) -> str | None:
        """Why a request that waited ``wait`` s, picked up at ``now`` (monotonic), is refused;
        or None. ``depth()`` reads the accept queue behind it (-1: unknown); only asked when
        the wait is past the target, or while shedding."""
        if wait > self.cap:
            return "queue-timeout"
        if (wait <= self.target and not self.shedding) or self.service is None:
            return None
        behind = depth()
        if behind < 0:
            return None
        rate = self.workers / self.service
        arrivals = behind / max(wait, 1e-3)
        backlog = behind / rate  # how long the newest request in the queue will wait
        if self.shedding:  # until arrivals fall to the pool's rate or the queue is short
            growing = arrivals > rate and backlog > self.target
        else:
            growing = arrivals > GROWTH * rate
        if not growing:
            self._growing_since, self.shedding = None, False
            return None
        if self._growing_since is None:
            self._growing_since = now
        if not self.shedding:
            # Only a queue that has grown for a whole interval, and that its newest requests
            # could not wait out within the cap: callers who retry at once when refused must
            # not keep it going by coming back (a closed loop never grows past its callers).
            self.shedding = now - self._growing_since >= self.interval and backlog > self.cap
        return "queue-growing" if self.shedding and wait > self.target else None
