"""The lifecycle: requests lost while a server is stopped, reloaded, upgraded, killed and
recycled, the kit beside stock Gunicorn in one run.

Each scenario starts a fresh server with 2 workers (and, for the kill storm, the shipped nginx in
front) and loads it with ``harness/lifecycle.py``'s clients, which file every request as answered
(by status), lost (reset or closed without an answer), refused or timed out:

- **SIGTERM with a queue**: 12 clients back to back on ``/heavy?n=1000000`` (10 always waiting),
  then SIGTERM to the master. Failed = connections reset or closed unanswered; refusals (nobody
  listening) are not failures, and the detail says when the first came.
- **kill storm behind nginx**: 8 clients one request each ``PACE`` s (below capacity), 8 SIGKILLs
  of a worker, 1.5 s apart (as measured for the issue); the shipped nginx (a GET retried once),
  and for contrast stock Gunicorn behind the same file with its one ``server`` entry (how the
  file was before: nothing retried).
- **HUP**, **USR2** (new master, its pool up, then SIGTERM to the old master) and
  **max_requests** (recycling every 20 requests), under the same paced load.

Failed = lost + timed out + refused while serving + a 5xx; a 503 is counted apart, as shed:
the kit's queue gate answers a request that waited past its limit with 503 and ``Retry-After``
(on a loaded machine a pool short of a worker queues long enough for that), which is an answer
a client can act on, not a lost request. Granian and uWSGI are left out for now: their reload
and upgrade signals are their own, not Gunicorn's, and need scenarios of their own.

    .venv/bin/python -m bench.lifecycle [--kills 8 --every 1.5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from bench.common import Maker, external, kit, machine, record, table
from harness.lifecycle import Clients, Tally
from harness.nginx import NGINX_CONF, fronting, lone_server_conf, nginx_binary
from harness.server import serving, stock_gunicorn

HEAVY = "/heavy?n=1000000"
#: Seconds per request per client: 8 clients offer 10 req/s, a fifth of a quiet machine's
#: capacity, so that on a loaded one too the pool is below capacity and the kit's queue gate
#: (a 503 for a request that waited too long) stays out of the lifecycle's figures.
PACE = 0.8
SERVERS: dict[str, Maker] = {"kit": kit(), "stock": external(stock_gunicorn)}
RECYCLING: dict[str, Maker] = {
    "kit": kit(env={"MAX_REQUESTS": "20"}),
    "stock": external(lambda port, n: [*stock_gunicorn(port, n), "--max-requests", "20"]),
}


def failed(tally: Tally) -> int:
    """Lost, timed out, refused while serving, or a 5xx other than a shed 503."""
    errors = sum(n for status, n in tally.statuses.items() if status >= 500 and status != 503)
    return len(tally.lost) + tally.timed_out + errors + len(tally.refused)


def row(scenario: str, server: str, tally: Tally, failures: int, note: str = "") -> list[object]:
    sent = tally.answered + len(tally.lost) + tally.timed_out + len(tally.refused)
    statuses = ", ".join(f"{n}x{s}" for s, n in sorted(tally.statuses.items()))
    lost = f", {len(tally.lost)} reset/closed unanswered" if tally.lost else ""
    detail = "; ".join(part for part in (statuses + lost, note) if part)
    return [scenario, server, sent, tally.answered, tally.statuses[503], failures, detail]


def paced(server_port: int) -> Clients:
    return Clients(server_port, HEAVY, 8, until_refused=False, pace=PACE).start()


def wait(check: Callable[[], object], timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not get there in time")
        time.sleep(0.05)
    return found


def sigterm_with_a_queue(name: str, make: Maker) -> list[object]:
    with serving(make(2)) as server:
        clients = Clients(server.port, HEAVY, 12).start()
        wait(lambda: clients.tally.answered >= 24, 30)
        sent = time.time()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(40)
        took = time.time() - sent
        tally = clients.join(30)
    first = min(tally.refused, default=sent) - sent
    note = f"exit {code} in {took:.1f}s; first refusal {first:.1f}s after SIGTERM"
    return row("SIGTERM, 12 clients queued", name, tally, len(tally.lost), note)


def kill_storm(
    name: str, make: Maker, kills: int, every: float, conf: Path = NGINX_CONF
) -> list[object]:
    with serving(make(2)) as server, fronting(server, conf=conf) as front:
        clients = paced(front.port)
        wait(lambda: clients.tally.answered >= 8, 30)
        killed: set[int] = set()
        for k in range(kills):
            pids = server.wait_for_workers(2, timeout=15, exclude=killed)
            time.sleep(every)
            os.kill(pids[k % 2], signal.SIGKILL)
            killed.add(pids[k % 2])
        server.wait_for_workers(2, timeout=15, exclude=killed)
        time.sleep(1)
        tally = clients.stop()
        retried = sum("ustatus=502, " in line for line in front.access_log().splitlines())
    return row(f"{kills} SIGKILLs behind nginx", name, tally, failed(tally), f"{retried} retried")


def hup(name: str, make: Maker) -> list[object]:
    with serving(make(2)) as server:
        clients = paced(server.port)
        wait(lambda: clients.tally.answered >= 8, 30)
        before = set(server.worker_pids())
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_workers(2, timeout=30, exclude=before)
        time.sleep(1.5)
        tally = clients.stop()
    return row("HUP", name, tally, failed(tally))


def usr2(name: str, make: Maker) -> list[object]:
    """Gunicorn's binary upgrade by hand, the sequence ``heavyctl upgrade`` runs."""
    with serving(make(2)) as server:
        new_master = None
        try:
            clients = paced(server.port)
            wait(lambda: clients.tally.answered >= 8, 30)
            old = psutil.Process(server.master_pid)
            workers = set(server.worker_pids())
            old.send_signal(signal.SIGUSR2)
            new_master = wait(
                lambda: next((c for c in old.children() if c.pid not in workers), None), 30
            )
            wait(lambda: len(new_master.children()) == 2, 30)
            time.sleep(1)  # the new workers load the app
            old.send_signal(signal.SIGTERM)
            code = server.proc.wait(40)
            time.sleep(1.5)
            tally = clients.stop()
        finally:
            if new_master is not None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    new_master.send_signal(signal.SIGTERM)
                    new_master.wait(40)
    return row("USR2, then TERM the old master", name, tally, failed(tally), f"old exit {code}")


def recycling(name: str, make: Maker) -> list[object]:
    with serving(make(2)) as server:
        clients = paced(server.port)
        time.sleep(6)
        tally = clients.stop()
        recycled = server.log_text().count("Autorestarting worker")
    return row("max_requests 20", name, tally, failed(tally), f"{recycled} recycles")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--every", type=float, default=1.5, help="seconds between kills")
    args = parser.parse_args()
    print("# The lifecycle: requests lost across stop, death, reload, upgrade, recycling\n")
    print(f"{machine()}; 2 workers each, `{HEAVY}`.\n")
    rows = []
    for name, make in SERVERS.items():
        rows.append(sigterm_with_a_queue(name, make))
    if nginx_binary():
        one = lone_server_conf(Path(tempfile.mkdtemp(prefix="heavyapp-bench-")))
        for name, make in SERVERS.items():
            rows.append(kill_storm(f"{name} + shipped nginx", make, args.kills, args.every))
        lone = "stock + nginx, one server entry"
        rows.append(kill_storm(lone, SERVERS["stock"], args.kills, args.every, one))
    else:
        print("nginx not installed (apt-get install nginx): no kill storm\n")
    for scenario in (hup, usr2):
        for name, make in SERVERS.items():
            rows.append(scenario(name, make))
    for name, make in RECYCLING.items():
        rows.append(recycling(name, make))
    headers = ["scenario", "server", "requests", "answered", "shed (503)", "failed", "detail"]
    print(table(headers, rows))


if __name__ == "__main__":
    record(main)
