"""The kit as a swarm stack, against stock Gunicorn in the same stack: requests failed while the
orchestrator rolls every task, scales 2 -> 3 -> 2 and loses a container.

    python -m bench.swarm            # needs Docker (root: dockerd and the images are made here)

One stack at a time on a one-node swarm (created, and left, if the engine is in none): the kit
(deploy/swarm/stack.yaml), then the same file with stock ``gunicorn -w 1 heavyapp:app`` as the
app (deploy/swarm/stock.yaml): same image, same front, same health check and policies. Under
CLIENTS closed-loop GETs through the front, each phase of harness.swarm.SCENARIO runs and the
stack converges; the table gives per phase the GETs sent, those that failed (no complete answer
or a 5xx), how long the stack took to converge, and the tries the front logged as failed
towards a task (each one it retried on another task, or could not).
"""

from __future__ import annotations

import argparse

from bench.common import machine, record, table
from harness import swarm
from harness.server import free_port

PATH = "/heavy?n=20000"
CLIENTS = 8


def measure(stack: swarm.Stack) -> tuple[list[swarm.PhaseResult], str]:
    stack.deploy()
    stack.wait_converged(180)
    phases, report = swarm.under_load(stack, PATH, CLIENTS)
    return swarm.results(phases, report.outcomes, stack.front_errors()), report.summary()


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    port = free_port()
    swarm.preflight(port)
    swarm.build_images()
    created = swarm.join_swarm()
    rows, summaries = [], []
    try:
        for name, stock in (("kit", False), ("stock gunicorn -w 1", True)):
            stack = swarm.Stack(port=port, stock=stock)
            try:
                found, summary = measure(stack)
            finally:
                stack.remove()
            summaries.append(f"- {name}: {summary}")
            rows += [
                [name, r.name, r.gets, r.failed, f"{r.converge_s:.1f}", r.front_retries]
                for r in found
            ]
    finally:
        if created:
            swarm.leave_swarm_if_ours()
    print(machine())
    print()
    print(
        f"{CLIENTS} closed-loop clients, GET {PATH} through the front; 2 app replicas of 1 CPU "
        "each (1 worker each); one stack at a time."
    )
    print()
    headers = ["app", "phase", "GETs", "failed", "converged (s)", "front tries failed"]
    print(table(headers, rows))
    print()
    print("\n".join(summaries))


if __name__ == "__main__":
    record(main)
