"""The crash journal and the crash hook registry.

Every crash becomes one JSON line in the journal (``HEAVYAPP_CRASH_LOG``, by default
``crashes.jsonl`` in the server's run directory) and is handed to each registered hook::

    from workers.crashes import on_crash

    @on_crash
    def report(crash: dict) -> None:
        my_error_tracker.capture_message(f"{crash['cause']} in worker {crash['worker_id']}")

Register hooks in ``gunicorn_conf.py`` (or a module it imports) so the master and every worker
have them. Deaths are recorded by the master, view exceptions by the worker that caught them;
a hook runs in that process, so keep it quick (hand slow work to a thread). A failing hook is
logged and never stops the others or the server.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workers.settings import Settings

Crash = dict[str, Any]
CrashHook = Callable[[Crash], None]

log = logging.getLogger("gunicorn.error")
_hooks: list[CrashHook] = []


def entry(
    cause: str,
    pid: int,
    worker_id: int | None,
    *,
    signal: str | None = None,
    exit_code: int | None = None,
    request: str | None = None,
    detail: str | None = None,
    traceback: str | None = None,
    uptime_s: float | None = None,
    requests: int | None = None,
) -> Crash:
    """One crash record with every field the journal documents (``None`` where unknown)."""
    return {
        "pid": pid,
        "worker_id": worker_id,
        "cause": cause,
        "signal": signal,
        "exit_code": exit_code,
        "request": request,
        "uptime_s": uptime_s,
        "requests": requests,
        "detail": detail,
        "traceback": traceback,
    }


def on_crash(hook: CrashHook) -> CrashHook:
    """Register ``hook`` to be called with every crash record; usable as a decorator."""
    if hook not in _hooks:
        _hooks.append(hook)
    return hook


def remove_crash_hook(hook: CrashHook) -> None:
    if hook in _hooks:
        _hooks.remove(hook)


def record(crash: Crash, journal: Path | None = None) -> Crash:
    """Stamp, append to the journal as one line, and hand to every hook."""
    crash = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **crash}
    path = journal or Settings.from_env().crash_log_path()
    line = (json.dumps(crash, default=str) + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One write() on an O_APPEND file: lines from several processes never interleave.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as exc:
        log.error("cannot append to the crash journal %s: %s", path, exc)
    for hook in list(_hooks):
        try:
            hook(crash)
        except Exception:
            log.exception("crash hook %r failed", hook)
    return crash


def read_journal(path: Path | None = None, last: int | None = None) -> list[Crash]:
    """The journal's entries, oldest first (the last ``last`` of them if given)."""
    path = path or Settings.from_env().crash_log_path()
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    entries = [json.loads(line) for line in lines if line.strip()]
    return entries[-last:] if last else entries
