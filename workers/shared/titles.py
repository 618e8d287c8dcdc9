"""Process titles: what ``ps -eo pid,args`` shows, written and read back in one place."""

from __future__ import annotations

import re
from typing import Any

import psutil
from setproctitle import setproctitle

_WORKER = re.compile(
    r"heavyapp: worker (?P<id>\d+) \[pid \d+\] "
    r"(?:(?P<requests>\d+) requests|waiting (?P<wait>[\d.]+)s)"
)


def master(workers: int, bind: str) -> None:
    setproctitle(f"heavyapp: master [{workers} workers] {bind}")


def serving(worker_id: int, pid: int, requests: int) -> None:
    setproctitle(f"heavyapp: worker {worker_id} [pid {pid}] {requests} requests")


def waiting(worker_id: int, pid: int, delay: float) -> None:
    setproctitle(f"heavyapp: worker {worker_id} [pid {pid}] waiting {delay:.1f}s (crash loop)")


def read(pid: int) -> str:
    """The title process ``pid`` shows now; '' once it is gone (or a zombie)."""
    try:
        return " ".join(psutil.Process(pid).cmdline()).strip()
    except psutil.NoSuchProcess:
        return ""


def parse(title: str) -> dict[str, Any]:
    """Id, requests served and whether it sits out a crash-loop delay; id None if not ours."""
    match = _WORKER.search(title)
    if not match:
        return {"id": None, "requests": None, "waiting": False}
    return {
        "id": int(match["id"]),
        "requests": int(match["requests"]) if match["requests"] else None,
        "waiting": match["wait"] is not None,
    }
