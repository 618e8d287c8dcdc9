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

The hooks are one ``CrashHooks`` object, ``hooks``, made at import as a Flask extension's object
is: ``on_crash`` is its ``add``, filled by the config before the master starts (the workers
inherit it by fork); the master holds it (``Master.crash_hooks``) and hands it to ``record``,
and a test makes its own.
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


class CrashHooks:
    """The callbacks a crash record is handed to, in the process that records it."""

    def __init__(self) -> None:
        self._hooks: list[CrashHook] = []

    def add(self, hook: CrashHook) -> CrashHook:
        """Register ``hook`` to be called with every crash record; usable as a decorator."""
        if hook not in self._hooks:
            self._hooks.append(hook)
        return hook

    def remove(self, hook: CrashHook) -> None:
        if hook in self._hooks:
            self._hooks.remove(hook)

    def run(self, crash: Crash) -> None:
        """Each hook in turn; one that raises is logged and skipped."""
        for hook in list(self._hooks):
            try:
                hook(crash)
            except Exception:
                log.exception("crash hook %r failed", hook)


#: This process's hooks: what ``gunicorn_conf.py`` registers, inherited by every worker.
hooks = CrashHooks()
on_crash = hooks.add
remove_crash_hook = hooks.remove


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


def record(crash: Crash, journal: Path | None = None, to: CrashHooks = hooks) -> Crash:
    """Stamp, append to the journal as one line, and hand to every hook of ``to``.

    ``journal`` is the caller's settled path (the master's settings know it); without one it is
    read from the environment, as a worker exports it."""
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
    to.run(crash)
    return crash


def read_journal(path: Path, last: int | None = None) -> list[Crash]:
    """The journal's entries, oldest first (the last ``last`` of them if given)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    entries = [json.loads(line) for line in lines if line.strip()]
    return entries[-last:] if last else entries
