"""The shedding policy: refuse only what cannot be served in time.

Two cases, told apart by the queue's trend rather than its length:

- **A request that waited past the cap** (``HEAVYAPP_QUEUE_TIMEOUT``) is refused always
  (``queue-timeout``): its client has given up, or will before the answer.
- **A growing queue is cut to the target** (``queue-growing``). Arrivals are counted over each
  ``interval``: what left the accept queue (this worker's picks, as many for each worker) plus
  what it gained (the depth behind the request just picked up, then and now). The pool serves
  ``workers / service`` requests a second, ``service`` being this worker's measured time per
  request. Arrivals of an interval above ``GROWTH`` times that rate, with more queued than the
  pool serves within the cap, mean the queue grows without end: from then on every request
  that waited more than ``target`` is refused, oldest first, while more is queued than the
  pool serves within ``target``.

Under overload the queue is thus held near ``target``: what is served is served fast, and the
workers never idle. A standing but steady queue — a closed loop of callers, each waiting for its
answer — is never cut: its callers arrive exactly as fast as the pool serves, its depth never
grows past their number however many came at once (a service time misjudged does not change
what is counted), and its waits are inside the cap. A burst passes unless it outlasts the
interval and the cap. Arrivals are counted, not sampled: one request's ``depth / wait`` swings
with bursty arrivals, and reads high for a worker whose neighbour already refuses.

Shedding stops when a request finds the queue empty (the overload is over), or when it proves
futile: an interval of refusals left the queue as deep as it was when shedding began, where
cutting an open loop's queue to the target leaves a fifth of it (its depth then: arrivals over
an interval; now: over a target). The refused are coming straight back (a closed loop that
ignores ``Retry-After``, spawned fast enough to look like growth), and refusing only turns their
waits into refusals; it then starts again only for a deeper queue, until the queue has drained.
Callers that come straight back look, while they are refused, exactly like an open loop (what
arrives is what is refused and served, in both), so every ``PROBE_EVERY`` intervals of shedding
the worker stops refusing for two targets: an open loop's arrivals go on, and the shedding
resumes at once; callers who wait for their answers arrive no faster than the pool serves, and
it ends (a closed loop that began before the overload's queue emptied: wrk measuring capacity, a
batch job's pool). What a probe lets wait is served within three targets.

All thresholds follow the cap: ``target`` a tenth of it, ``interval`` half. ``GROWTH`` leaves
room for the error of one worker's service time standing for the pool's (workers share CPUs
with other load) and of its picks standing for every worker's; a rate between the pool's and
``GROWTH`` times it grows slowly, and the cap bounds it.
"""

from __future__ import annotations

from collections.abc import Callable

#: Arrivals above this multiple of the pool's rate mean a growing queue.
GROWTH = 1.5
#: A queue still this deep, after an interval of shedding, of the depth that started it: the
#: refused are coming straight back, so refusing only turns waits into refusals.
_HELD = 0.9
#: Every this many intervals of shedding, one without: callers who wait for their answers
#: then arrive no faster than the pool serves, and the shedding ends.
PROBE_EVERY = 4
#: Weight of the newest service time in the running mean (about the last 10 requests).
_NEWEST = 0.1


class Shedding:
    def __init__(self, cap: float, workers: int) -> None:
        self.cap = cap
        self.workers = max(workers, 1)
        self.target = cap / 10
        self.interval = cap / 2
        #: How long a probe stops refusing: what it lets wait is served within three targets
        #: (one before it, two during), and it spans more than one of hey's bursts (10 a second).
        self._probe = 2 * self.target
        #: Mean seconds this worker takes per request it serves (None until one was served).
        self.service: float | None = None
        self.shedding = False
        #: The window arrivals are counted over: since when, the depth then, this worker's
        #: picks since (None: no queue to judge).
        self._window: tuple[float, int] | None = None
        self._picks = 0
        self._started_at = 0  # the depth that started the shedding
        self._shed_windows = 0  # intervals of it since
        self._probing = False  # not refusing for a probe, to see if the queue still grows
        #: When shedding last proved futile, and the depth then: only a deeper queue starts it
        #: again, until a short wait an interval later shows the queue drained.
        self._futile = (0.0, 0)

    def served(self, seconds: float) -> None:
        """A request went through the app in ``seconds`` (pick-up to close)."""
        mean = self.service
        self.service = seconds if mean is None else mean + _NEWEST * (seconds - mean)

    def reason_to_shed(self, wait: float, now: float, depth: Callable[[], int]) -> str | None:
        """Why a request that waited ``wait`` s, picked up at ``now`` (monotonic), is refused;
        or None. ``depth()`` reads the accept queue behind it (-1: unknown); only asked when
        the wait is past the target, or while shedding."""
        self._picks += 1
        if wait > self.cap:
            return "queue-timeout"
        if self.service is None or (wait <= self.target and not self.shedding):
            if wait <= self.target and not self._probing:
                self._window = None
                if now - self._futile[0] >= self.interval:  # drained: judged afresh
                    self._futile = (0.0, 0)
            return None
        behind = depth()
        if behind < 0:
            return None
        rate = self.workers / self.service
        if not self.shedding:
            return self._judge_growth(now, behind, rate)
        if behind == 0 and wait <= self.target:  # the queue is empty: the overload is over
            self.shedding = False
            return None
        if self._arrivals(now, behind, self.interval) is not None:
            if behind >= _HELD * self._started_at:
                self._futile = (now, behind)  # an interval of refusals left the queue as deep
                self.shedding = False
                return None
            self._shed_windows += 1
            if self._shed_windows % PROBE_EVERY == 0:  # stop refusing for a probe
                self.shedding, self._probing = False, True
                return None
        if behind > rate * self.target and wait > self.target:  # more than a target's work
            return "queue-growing"
        return None

    def _judge_growth(self, now: float, behind: int, rate: float) -> str | None:
        """Start shedding once the arrivals of an interval came to more than ``GROWTH`` times
        the pool's rate, and the queue holds more than the pool serves within the cap."""
        if self._window is None:
            self._window, self._picks = (now, behind), 0
            return None
        arrivals = self._arrivals(now, behind, self._probe if self._probing else self.interval)
        if arrivals is None:
            return None
        # After a probe, a queue still growing resumes the shedding at once.
        probed, self._probing = self._probing, False
        if (
            arrivals <= GROWTH * rate
            or behind <= rate * (self.target if probed else self.cap)
            or behind <= 1.1 * self._futile[1]
        ):
            return None
        if not probed:
            self._started_at, self._shed_windows = behind, 0
        self.shedding = True
        return "queue-growing"

    def _arrivals(self, now: float, behind: int, length: float) -> float | None:
        """Requests that arrived a second over the window, once it is ``length`` long (and a
        new window from now); None before. Counted, not sampled: what left the queue (this
        worker's picks, as many for each worker) and what it gained."""
        assert self._window is not None
        began, depth_then = self._window
        if now - began < length:
            return None
        arrived = (self.workers * self._picks + behind - depth_then) / (now - began)
        self._window, self._picks = (now, behind), 0
        return arrived
