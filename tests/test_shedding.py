"""The shedding policy alone (``workers/gates/shedding.py``): a pure function of the waits and
depths it sees, fed by a model of the accept queue (``tests/queuesim.py``) under the loads
``bench/overload.py`` puts on a real server: two workers serving 60 a second, a 0.9 s queue
timeout, 1 s clients. The real server under the same loads is the bench's; tests/test_overload.py
drives the gate itself."""

from __future__ import annotations

import pytest

from queuesim import Outcome, Pool, simulate
from workers.gates.shedding import Shedding

POOL = Pool()  # 2 workers x 1/30 s: 60 a second; 0.3 ms a refusal
RATE = POOL.workers / POOL.service
REACH = RATE * 1.0  # callers the pool serves within their 1 s timeout


def judge(policy: Shedding, picks: list[tuple[float, float, int]]) -> list[str | None]:
    """(now, wait, depth behind) for each request picked up -> why each was refused."""
    return [policy.reason_to_shed(wait, now, lambda d=depth: d) for now, wait, depth in picks]


def queue_growing(outcome: Outcome) -> list[float]:
    return [when for when, why in outcome.refusals if why == "queue-growing"]


def test_a_steady_standing_queue_is_never_cut() -> None:
    """36 closed-loop callers on 60 a second: 0.57 s of queue, arriving as fast as served."""
    policy = POOL.policies()[0]
    picks = [(i / 60, 0.57, 34) for i in range(600)]
    assert judge(policy, picks) == [None] * 600 and not policy.shedding


def test_a_burst_the_pool_serves_in_time_passes() -> None:
    """Arrivals far above the rate for a whole second, but 40 requests: 0.67 s of work."""
    policy = POOL.policies()[0]
    burst = [(t / 100, t / 100, 40 - t // 3) for t in range(10, 85)]
    assert judge(policy, burst) == [None] * 75 and not policy.shedding


def test_a_request_past_the_cap_is_refused_whatever_the_queue() -> None:
    policy = POOL.policies()[0]
    assert judge(policy, [(0.0, 0.91, 0), (0.1, 0.89, 0)]) == ["queue-timeout", None]


@pytest.mark.parametrize(("multiple", "p95"), [(2, 0.45), (4, 0.27), (10, 0.27)])
def test_an_open_loop_overload_is_cut_and_the_pool_serves_at_capacity(
    multiple: int, p95: float
) -> None:
    """Cut from its start to its end: the queue held near the target, a probe's waits within
    three targets (at 2x it takes longer to hold more than the cap's worth, and those first
    waits are in the tail)."""
    outcome = simulate(POOL, rates=[multiple * RATE] * 10)
    assert outcome.in_time >= 0.9 * 10 * RATE, outcome
    assert outcome.late == 0
    waits = sorted(outcome.waits)
    assert waits[len(waits) // 2] <= 2 * POOL.cap / 10 and waits[int(0.95 * len(waits))] <= p95
    assert waits[-1] <= POOL.cap


def test_at_capacity_nothing_is_refused() -> None:
    assert simulate(POOL, rates=[RATE] * 10).refused == 0


def test_shedding_ends_at_the_first_request_that_finds_the_queue_empty() -> None:
    """Callers that arrive right after an overload (a closed loop, within reach) are not taken
    for it: the policy stopped at the queue's end."""
    policy = POOL.policies()[0]
    growing = [(i / 60, 0.2, 60 + 5 * i) for i in range(40)]  # 420 a second, 1 s of work
    assert "queue-growing" in judge(policy, growing) and policy.shedding
    assert judge(policy, [(0.8, 0.0, 0)]) == [None] and not policy.shedding
    steady = [(1 + i / 60, 0.57, 34) for i in range(600)]
    assert judge(policy, steady) == [None] * 600


@pytest.mark.parametrize("users", [8, round(0.6 * REACH)])
def test_a_closed_loop_straight_after_an_overload_is_not_shed(users: int) -> None:
    """4x for 4 s, and callers waiting for their answers from its last second on (wrk's 8
    connections measuring capacity, or a closed loop within reach): the queue never empties,
    yet once the open loop ends nothing more is refused."""
    outcome = simulate(POOL, rates=[4 * RATE] * 4, users=users, users_from=4.5, seconds=12)
    assert max(when for when, _ in outcome.refusals) < 1 + 4 + 2 * POOL.cap, outcome.refusals[-5:]


def test_shedding_ends_with_the_overload() -> None:
    """4x for 4 s, then half the capacity: the refusals stop within an interval, and the
    policy is no longer shedding (readiness comes back)."""
    outcome = simulate(POOL, rates=[4 * RATE] * 4 + [RATE / 2] * 4)
    assert queue_growing(outcome) and max(queue_growing(outcome)) < 1 + 4 + POOL.cap / 2
    assert outcome.late == 0


@pytest.mark.parametrize("judged", [None, 3 * POOL.service], ids=["judged right", "misjudged"])
@pytest.mark.parametrize("multiple", [0.5, 0.6, 0.8])
def test_a_closed_loop_within_reach_is_never_refused(multiple: float, judged: float | None) -> None:
    """Callers who each wait for their answer keep a standing queue; within their patience it
    is served in time, even when the service time is misjudged (the pool seems 3x slower) and
    all of them came at once: the queue's depth never grows past its callers."""
    outcome = simulate(Pool(judged=judged), users=round(multiple * REACH))
    assert outcome.refused == 0 and outcome.late == 0


@pytest.mark.parametrize("judged", [None, 3 * POOL.service], ids=["judged right", "misjudged"])
def test_shedding_stops_when_the_refused_come_straight_back(judged: float | None) -> None:
    """Callers spawned 100 a second grow the queue as an overload does, and shedding starts;
    but refused, they come straight back, many times faster than the arrivals that started it:
    shedding stops an interval later and does not start again at that depth."""
    outcome = simulate(Pool(judged=judged), users=round(REACH), spawn=100)
    cut = queue_growing(outcome)
    assert cut and max(cut) - min(cut) < POOL.cap  # two intervals
    assert outcome.in_time >= 0.9 * 10 * RATE


@pytest.mark.parametrize("multiple", [1.5, 3])
def test_a_closed_loop_beyond_reach_is_served_at_capacity(multiple: float) -> None:
    outcome = simulate(POOL, users=round(multiple * REACH))
    assert outcome.in_time >= 0.9 * 10 * RATE
    assert outcome.late == 0 and max(outcome.waits) <= POOL.cap
