"""What a correct answer from ``GET /heavy?n=N`` looks like, checked the way a client can.

A load test that counts any 200 as success measures how fast a server can be wrong; this checks
the status, the body and that the body agrees with the worker headers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping


def heavy_answer_problem(status: int, headers: Mapping[str, str], body: str, n: int) -> str | None:
    """Why this answer to ``/heavy?n=n`` is wrong, or None when it is right."""
    if status != 200:
        return f"status {status}: {body[:200]}"
    try:
        data = json.loads(body)
    except ValueError:
        return f"body is not JSON: {body[:200]!r}"
    if not isinstance(data, dict):
        return f"body is not a JSON object: {body[:200]!r}"
    if data.get("result") != n or data.get("n") != n:
        return f"asked n={n}, got n={data.get('n')!r} result={data.get('result')!r}"
    pid, worker_id = headers.get("X-Worker-Pid"), headers.get("X-Worker-Id")
    if pid is None and worker_id is None:
        return None  # a server without the kit (plain Gunicorn) names no worker
    if pid != str(data.get("pid")) or worker_id != str(data.get("worker_id")):
        return (
            f"headers say worker {worker_id!r} pid {pid!r}, "
            f"body says worker {data.get('worker_id')!r} pid {data.get('pid')!r}"
        )
    return None
