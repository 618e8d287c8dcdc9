"""Requests per Gunicorn worker, tallied by the load generator from the answers' headers.

The kernel, not Gunicorn, spreads connections over the workers (they all ``accept()`` on one
socket), so the only honest view of the balance is the client's: every answer carries
``X-Worker-Id`` (the kit's stable id) and ``X-Worker-Pid``. A replaced worker keeps its id and
gets a new pid, so it shows as a row of its own. Requests that got no answer (timeouts, refused
connections) are counted on a row of their own too: under overload they are the story.

Pure Python, no Locust import: the locustfile and the experiment both use it, and the tests
import it without gevent's monkey-patching.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

#: The worker id and pid shown for requests that got no answer.
NO_ANSWER = "-"
CSV_COLUMNS = ["worker_id", "pid", "requests", "share"]


@dataclass(frozen=True)
class WorkerRow:
    worker_id: str
    pid: str
    requests: int
    share: float  # of all requests, 0..1

    @property
    def answered(self) -> bool:
        return self.worker_id != NO_ANSWER


def _order(key: tuple[str, str]) -> tuple[int, int, str, str]:
    """Numeric ids in order, then anything else, the no-answer row last."""
    worker_id, pid = key
    if worker_id == NO_ANSWER:
        return (2, 0, worker_id, pid)
    if worker_id.isdigit():
        return (0, int(worker_id), worker_id, pid)
    return (1, 0, worker_id, pid)


class WorkerTally:
    """Counts of requests per (worker id, pid); mergeable, so Locust workers can report it."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def record(self, headers: Mapping[str, str] | None) -> None:
        """One request: ``headers`` of its answer, or None (or none at all) when there was no
        answer; an answer that names no worker (a server without the kit) counts as "?"."""
        if not headers:
            self.counts[(NO_ANSWER, NO_ANSWER)] += 1
        else:
            worker = (headers.get("X-Worker-Id") or "?", headers.get("X-Worker-Pid") or "?")
            self.counts[worker] += 1

    def export(self) -> list[list[str | int]]:
        """The counts as plain lists (Locust sends reports to its master as msgpack)."""
        return [[worker_id, pid, n] for (worker_id, pid), n in self.counts.items()]

    def merge(self, exported: Iterable[list[str | int]]) -> None:
        for worker_id, pid, n in exported:
            self.counts[(str(worker_id), str(pid))] += int(n)

    def clear(self) -> None:
        self.counts.clear()

    def rows(self) -> list[WorkerRow]:
        total = sum(self.counts.values())
        return [
            WorkerRow(worker_id, pid, n, n / total)
            for (worker_id, pid), n in sorted(self.counts.items(), key=lambda kv: _order(kv[0]))
        ]


def format_table(rows: list[WorkerRow]) -> str:
    """The balance as a plain-text table, one line per worker, for the console."""
    total = sum(row.requests for row in rows)
    lines = [f"{'worker id':>10} {'pid':>8} {'requests':>9} {'share':>7}"]
    for row in rows:
        label = "no answer" if not row.answered else row.worker_id
        lines.append(f"{label:>10} {row.pid:>8} {row.requests:>9} {row.share:>7.1%}")
    lines.append(f"{'total':>10} {'':>8} {total:>9} {'':>7}")
    return "\n".join(lines)


def csv_path(prefix: str) -> Path:
    """Where the balance goes beside Locust's own ``<prefix>_stats.csv``."""
    return Path(f"{prefix}_workers.csv")


def write_csv(path: Path, rows: list[WorkerRow]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([row.worker_id, row.pid, row.requests, f"{row.share:.4f}"])


def read_csv(path: Path) -> list[WorkerRow]:
    with path.open(newline="") as f:
        return [
            WorkerRow(r["worker_id"], r["pid"], int(r["requests"]), float(r["share"]))
            for r in csv.DictReader(f)
        ]
