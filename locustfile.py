"""Locust load for heavyapp: closed-loop users hammering ``GET /heavy?n=N``.

``locust --web-host 127.0.0.1`` in this directory opens the web UI on http://127.0.0.1:8089, aimed
at the kit's default bind http://127.0.0.1:8000 (``make run``). The web UI binds loopback even
without ``--web-host`` (this file changes Locust's default of all interfaces; ``--web-host``,
``LOCUST_WEB_HOST`` or a config file still override it). Headless::

    locust --headless -u 20 -r 20 -t 30s --heavy-n 1000000 --heavy-timeout 1 --csv out/run

Every answer is checked (status, body, headers). A fast refusal (``503`` with ``Retry-After``,
the kit's answer past ``HEAVYAPP_QUEUE_TIMEOUT``) is an answer, not a hang: it is counted in its
own row, ``/heavy refused``, apart from the failures (timeouts, errors); with
``--heavy-retry-after`` a refused user waits as long as ``Retry-After`` says before asking again.
Requests per Gunicorn worker are tallied from the ``X-Worker-Id``/``X-Worker-Pid`` headers:
printed when a test stops, written to ``<csv prefix>_workers.csv`` with ``--csv``, and shown in
the web UI's "Workers" tab (JSON at ``/workers``).
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from flask import Response, jsonify, request
from locust import FastHttpUser, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from loadtest.answers import heavy_answer_problem
from loadtest.balance import WorkerTally, csv_path, format_table, write_csv

DEFAULT_HOST = "http://127.0.0.1:8000"
DEFAULT_WEB_HOST = "127.0.0.1"
DEFAULT_N = 1_000_000
DEFAULT_TIMEOUT_S = 10.0
REFUSED_NAME = "/heavy refused"
#: The longest Retry-After honoured (seconds): a server's header must not park a user forever.
MAX_RETRY_AFTER_S = 60.0
REPORT_KEY = "heavyapp_workers"  # our part of the reports Locust workers send their master

console = logging.getLogger("locust.stats_logger")  # Locust's own plain stdout logger
tally = WorkerTally()


@events.init_command_line_parser.add_listener
def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Loopback like the rest of the kit: Locust's own default binds the web UI on all interfaces.
    parser.set_defaults(web_host=DEFAULT_WEB_HOST)
    # On the parser itself (not a group): Locust shows only those in its web UI form.
    parser.add_argument(
        "--heavy-n",
        type=int,
        default=DEFAULT_N,
        help="work size: each request is GET /heavy?n=N (1,000,000 is about 35 ms of CPU)",
    )
    parser.add_argument(
        "--heavy-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="client timeout in seconds; a request unanswered by then counts as a failure",
    )
    parser.add_argument(
        "--heavy-retry-after",
        action="store_true",
        default=False,
        help="a user refused with Retry-After waits that long before its next request",
    )


def _option(environment: Environment, name: str, default: Any) -> Any:
    """A parsed option (set by the command line or the web UI form), or its default."""
    return getattr(environment.parsed_options, name, default)


def refusal_pause(status: int, headers: Any) -> float | None:
    """Seconds a ``503`` with ``Retry-After`` (delta seconds) asks to wait; None for any other
    answer (a 503 without it is a failure like any error)."""
    raw = headers.get("Retry-After") if status == 503 and headers else None
    if raw is None or not raw.strip().isdigit():
        return None
    return min(float(raw), MAX_RETRY_AFTER_S)


class HeavyUser(FastHttpUser):
    """One client that sends its next request as soon as the last one is answered (or timed out),
    like the original article's load tester: the offered load is the number of users."""

    host = DEFAULT_HOST

    def __init__(self, environment: Environment) -> None:
        # Read at spawn time, so a timeout changed in the web UI form applies to the next swarm.
        timeout = float(_option(environment, "heavy_timeout", DEFAULT_TIMEOUT_S))
        self.network_timeout = self.connection_timeout = timeout
        self.pause = 0.0  # seconds a Retry-After asked this user to wait
        super().__init__(environment)

    def wait_time(self) -> float:
        """No think time, but a Retry-After the server sent is honoured once if asked to."""
        pause, self.pause = self.pause, 0.0
        return pause

    @task
    def heavy(self) -> None:
        n = int(_option(self.environment, "heavy_n", DEFAULT_N))
        with self.client.get(f"/heavy?n={n}", name="/heavy", catch_response=True) as resp:
            if resp.status_code == 0:
                return  # no answer: Locust records the client's own error (timeout, refused)
            retry_after = refusal_pause(resp.status_code, resp.headers)
            if retry_after is not None:
                resp.request_meta["name"] = REFUSED_NAME
                resp.success()
                if _option(self.environment, "heavy_retry_after", False):
                    self.pause = retry_after
                return
            problem = heavy_answer_problem(resp.status_code, resp.headers, resp.text or "", n)
            if problem:
                resp.failure(problem)
            else:
                resp.success()


@events.request.add_listener
def count_worker(response: Any = None, **_: Any) -> None:
    tally.record(getattr(response, "headers", None))


@events.test_start.add_listener
def start_tally(**_: Any) -> None:
    tally.clear()


@events.reset_stats.add_listener
def reset_tally(**_: Any) -> None:
    tally.clear()


@events.report_to_master.add_listener
def send_tally(data: dict[str, Any], **_: Any) -> None:
    """On a Locust worker (``--processes``, ``--worker``): hand the counts so far to the master."""
    data[REPORT_KEY] = tally.export()
    tally.clear()


@events.worker_report.add_listener
def receive_tally(data: dict[str, Any], **_: Any) -> None:
    tally.merge(data.get(REPORT_KEY, []))


def report_tally(environment: Environment) -> None:
    """Print the balance; with ``--csv``, write it beside Locust's own files."""
    rows = tally.rows()
    console.info("Requests per Gunicorn worker (from X-Worker-Id / X-Worker-Pid):")
    console.info(format_table(rows))
    prefix = _option(environment, "csv_prefix", None)
    if prefix:
        write_csv(csv_path(prefix), rows)


@events.test_stop.add_listener
def report_when_stopped(environment: Environment, **_: Any) -> None:
    if not isinstance(environment.runner, WorkerRunner | MasterRunner):
        report_tally(environment)


@events.init.add_listener
def report_when_master_quits(environment: Environment, **_: Any) -> None:
    """A master gets its workers' last counts after test_stop, so it reports when it quits."""
    if isinstance(environment.runner, MasterRunner):
        environment.events.quit.add_listener(lambda **_: report_tally(environment))


@events.init.add_listener
def extend_web_ui(environment: Environment, **_: Any) -> None:
    """A "Workers" tab in the web UI (Locust's documented extension points) and ``/workers``."""
    ui = environment.web_ui
    if ui is None:
        return
    ui.template_args["extended_tabs"] = [{"title": "Workers", "key": "workers"}]
    ui.template_args["extended_tables"] = [
        {
            "key": "workers",
            "structure": [
                {"key": "worker_id", "title": "Worker id"},
                {"key": "pid", "title": "Pid"},
                {"key": "requests", "title": "Requests"},
                {"key": "share", "title": "Share"},
            ],
        }
    ]

    def balance() -> list[dict[str, Any]]:
        return [
            {
                "worker_id": r.worker_id,
                "pid": r.pid,
                "requests": r.requests,
                "share": f"{r.share:.1%}",
            }
            for r in tally.rows()
        ]

    @ui.app.route("/workers")
    @ui.auth_required_if_enabled
    def workers() -> Response:
        return jsonify(balance())

    @ui.app.after_request
    def add_balance_to_stats(response: Response) -> Response:
        if request.path == "/stats/requests" and response.is_json:
            stats = {**response.json, "extended_stats": [{"key": "workers", "data": balance()}]}
            response.set_data(json.dumps(stats))
        return response
