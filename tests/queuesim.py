"""A discrete-event model of the kit's accept queue, to test the shedding policy (a pure
function of the waits and depths it sees) against the loads bench/overload.py puts on a real
server, in milliseconds and exactly repeatable.

One FIFO queue, ``workers`` workers that each hold their own ``Shedding`` (as each worker
process does), a fixed service time and a refusal cost. Two kinds of callers:

- open loop, as harness/openloop.py drives hey: ``processes`` processes started 1/K s apart,
  each sending its share of the rate in one burst a second, whatever the answers;
- closed loop: ``users`` callers, each sending its next request when its answer comes (a
  refusal included, straight back), or when its timeout passes without one; started all at
  once, or a few a second as Locust spawns them; alone, or right after an open loop.

A request whose caller gave up is judged like any other: it waited past the caller's timeout,
so past the cap, and is refused at once.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from workers.gates.shedding import Shedding


@dataclass
class Outcome:
    sent: int = 0
    in_time: int = 0  # served within the caller's timeout
    refused: int = 0
    late: int = 0  # no answer within the timeout
    waits: list[float] = field(default_factory=list)  # queue waits of the requests served
    refusals: list[tuple[float, str]] = field(default_factory=list)  # when, and why: all


@dataclass
class Pool:
    """``workers`` workers serving in ``service`` s, refusing (or dropping) in ``refusal`` s.
    ``judged``: the service time each worker's policy believes (default: the true one)."""

    workers: int = 2
    service: float = 1 / 30
    refusal: float = 0.0003
    cap: float = 0.9
    judged: float | None = None

    def policies(self) -> list[Shedding]:
        policies = [Shedding(self.cap, self.workers) for _ in range(self.workers)]
        for policy in policies:
            policy.served(self.judged or self.service)
        return policies


class _Run:
    """The event loop shared by both kinds of callers."""

    def __init__(self, pool: Pool, timeout: float) -> None:
        self.pool, self.timeout = pool, timeout
        self.policies = pool.policies()
        self.queue: list[tuple[float, int]] = []  # (sent at, request id), oldest first
        self.head = 0
        self.events: list[tuple[float, int, str, int]] = []
        self.seq = itertools.count()
        self.idle = list(range(pool.workers))
        self.outcome = Outcome()
        self.ids = itertools.count()
        self.caller_of: dict[int, int] = {}
        self.until, self.think = 0.0, 0.0

    def at(self, when: float, kind: str, arg: int) -> None:
        heapq.heappush(self.events, (when, next(self.seq), kind, arg))

    def send(self, now: float, caller: int) -> None:
        rid = next(self.ids)
        self.caller_of[rid] = caller
        self.queue.append((now, rid))
        self.outcome.sent += 1
        self.at(now + self.timeout, "timeout", rid)
        self.wake(now)

    def wake(self, now: float) -> None:
        while self.idle and self.head < len(self.queue):
            self.pick(now, self.idle.pop())

    def pick(self, now: float, worker: int) -> None:
        sent, rid = self.queue[self.head]
        self.head += 1
        behind = len(self.queue) - self.head
        policy = self.policies[worker]
        if reason := policy.reason_to_shed(now - sent, now, lambda: behind):
            self.outcome.refused += rid in self.caller_of  # not one whose caller gave up
            self.outcome.refusals.append((now, reason))
            self.at(now + self.pool.refusal, "answer", rid)
            self.at(now + self.pool.refusal, "free", worker)
            return
        self.outcome.waits.append(now - sent)
        policy.served(self.pool.service)
        self.at(now + self.pool.service, "served", rid)
        self.at(now + self.pool.service, "free", worker)

    def run(self, until: float) -> Outcome:
        while self.events and self.events[0][0] <= until:
            now, _, kind, arg = heapq.heappop(self.events)
            if kind == "free":
                self.idle.append(arg)
                self.wake(now)
            elif kind == "served" and arg in self.caller_of:
                self.outcome.in_time += 1
                self.answered(now, self.caller_of.pop(arg))
            elif kind == "answer" and arg in self.caller_of:
                self.answered(now, self.caller_of.pop(arg))
            elif kind == "timeout" and arg in self.caller_of:
                self.outcome.late += 1
                self.answered(now, self.caller_of.pop(arg))
            elif kind == "send":
                self.send(now, arg)
        return self.outcome

    def answered(self, now: float, caller: int) -> None:
        """A caller got its answer (or gave up): a closed-loop one sends its next request."""
        if caller >= 0 and now < self.until:
            self.at(now + self.think, "send", caller)


def simulate(
    pool: Pool,
    *,
    rates: Sequence[float] = (),
    users: int = 0,
    users_from: float = 0.0,
    spawn: float = 1000.0,
    seconds: float = 10.0,
    think: float = 0.001,
    processes: int = 10,
    timeout: float = 1.0,
) -> Outcome:
    """Open-loop arrivals as hey sends them, ``rates[i]`` in second ``i`` from 1 s on; and
    ``users`` closed-loop callers started from ``users_from`` s on, ``spawn`` a second (all at
    once by default), each sending until ``seconds``."""
    run = _Run(pool, timeout)
    run.until, run.think = seconds, think
    for tick, rate in enumerate(rates):
        per = round(rate)
        for p in range(processes):
            for _ in range(per // processes + (p < per % processes)):
                run.at(1 + tick + p / processes, "send", -1)
    for user in range(users):
        run.at(users_from + user / spawn, "send", user)
    return run.run(max(seconds, 1 + len(rates)) + 2 * timeout)
