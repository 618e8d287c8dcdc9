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
is queued keeps such a loop from starting it below its reach, and a loop that does start it
(its service time misjudged, say while other load starves the CPUs) stops it an interval later,
when the refusals have not made the queue any shorter.

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
        self._shed_from: tuple[float, int] | None = None  # when shedding began, the depth then
        #: The depth at which shedding last proved futile: only a deeper queue starts it again.
        self._futile_depth = 0
        self.shedding = False

    def futile(self, now: float, behind: int) -> bool:
        """Has an interval of shedding left the queue as deep as it was? Then the refused come
        straight back (a closed loop of callers that ignore ``Retry-After``): refusing more
        only turns their waits into refusals, so shedding stops (the cap still holds)."""
        began, depth = self._shed_from or (now, behind)
        return now - began >= self.interval and behind >= 0.9 * depth

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
            if wait <= self.target:
                self._futile_depth = 0  # the queue drained: a new overload is judged afresh
            return None
        behind = depth()
        if behind < 0:
            return None
        rate = self.workers / self.service
        arrivals = behind / max(wait, 1e-3)
        backlog = behind / rate  # how long the newest request in the queue will wait
        if self.shedding:  # until arrivals fall to the pool's rate or the queue is short
            growing = arrivals > rate and backlog > self.target
            if growing and self.futile(now, behind):
                self._futile_depth, growing = behind, False
        else:
            growing = arrivals > GROWTH * rate and behind > 1.1 * self._futile_depth
        if not growing:
            self._growing_since = self._shed_from = None
            self.shedding = False
            return None
        if self._growing_since is None:
            self._growing_since = now
        if not self.shedding:
            # Only a queue that has grown for a whole interval, and that its newest requests
            # could not wait out within the cap.
            self.shedding = now - self._growing_since >= self.interval and backlog > self.cap
            if self.shedding:
                self._shed_from = (now, behind)
        return "queue-growing" if self.shedding and wait > self.target else None
