"""The open-loop client (harness/openloop.py) with the real ``hey`` against a real kit server."""

from __future__ import annotations

import math
import shutil

import pytest

from harness.openloop import loopback, open_loop, parse_csv, recovery_seconds, split
from harness.server import GunicornServer

# -- pure parts --------------------------------------------------------------------------------


def test_split_spreads_the_rate_over_at_most_as_many_processes_as_requests() -> None:
    assert split(364, 10) == [37] * 4 + [36] * 6
    assert split(3, 10) == [1, 1, 1]


def test_only_loopback_targets() -> None:
    assert loopback("http://127.0.0.1:8000/heavy").port == 8000
    for url in ("http://localhost:8000/", "http://10.0.0.1:8000/", "https://127.0.0.1:8000/"):
        with pytest.raises(ValueError, match="only"):
            loopback(url)


def test_hey_csv_rows_become_answers_timed_from_the_run_start() -> None:
    text = (
        "response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,"
        "status-code,offset\n"
        "0.0576,0.0116,0.0000,0.0001,0.0456,0.0002,200,1.0088\n"
        "0.0011,0.0003,0.0000,0.0000,0.0007,0.0001,503,2.0003\n"
    )
    answers = parse_csv(text, process=3, started=0.3)
    assert [(a.process, a.status, a.latency) for a in answers] == [
        (3, 200, 0.0576),
        (3, 503, 0.0011),
    ]
    assert [a.sent_at for a in answers] == pytest.approx([1.3088, 2.3003])


# -- against a real server ---------------------------------------------------------------------


@pytest.mark.server
@pytest.mark.skipif(
    shutil.which("hey") is None, reason="hey not installed: apt-get install hey (.ci/run does)"
)
def test_below_capacity_every_request_is_served_and_arrivals_are_spread(
    server: GunicornServer,
) -> None:
    processes, seconds = 5, 2
    result = open_loop(f"{server.url}/heavy?n=1000", 10, seconds, processes=processes)
    assert result.sent == 20
    assert result.ok == result.sent == len(result.answers)
    assert result.statuses == {200: 20}
    assert result.refused == result.other == result.no_answer == 0
    assert result.goodput == pytest.approx(10.0)
    assert 0 < result.latency(50) <= result.latency(95) < 1
    # Each process sends its share once a second, 1/5 s after the one before it.
    assert {a.process for a in result.answers} == set(range(processes))
    for a in result.answers:
        tick = a.sent_at - a.process / processes
        assert abs(tick - round(tick)) < 0.1, a
        assert 1 <= round(tick) <= seconds, a


@pytest.mark.server
def test_recovery_is_immediate_on_an_idle_server(server: GunicornServer) -> None:
    assert recovery_seconds(f"{server.url}/healthz") < 1
    assert math.isinf(recovery_seconds(f"{server.url}/nowhere", limit=0.3))
