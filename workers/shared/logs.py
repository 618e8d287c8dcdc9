"""The kit's Gunicorn logger: every line carries the pid and the worker id (or "master")."""

from __future__ import annotations

import logging
import os

from gunicorn import glogging

from workers.settings import Settings, worker_id
from workers.shared import jsonlog


class _TagFilter(logging.Filter):
    """Tags each record ``master`` in the master's process, ``worker <id>`` in a worker's.

    The logger is set up in the master and inherited through the fork, so a process other than
    the one that set it up is a worker (its id comes from the environment the master set)."""

    def __init__(self) -> None:
        super().__init__()
        self.master_pid = os.getpid()

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = (
            "master" if os.getpid() == self.master_pid else f"worker {worker_id() or '?'}"
        )
        return True


class HeavyLogger(glogging.Logger):
    """Gunicorn's logger with ``[pid] [worker id]`` on error and access lines alike."""

    error_fmt = r"%(asctime)s [%(process)d] [%(worker)s] [%(levelname)s] %(message)s"
    access_fmt = r"%(asctime)s [%(process)d] [%(worker)s] %(message)s"

    def atoms(self, resp, req, wsgi, request_time) -> dict:
        """Gunicorn's atoms, and ``queue_wait_ms`` (for JSON lines, or ``%(queue_wait_ms)s``):
        the queue gate's measure, carried by the request's connection (``gunicorn.socket``)."""
        atoms = super().atoms(resp, req, wsgi, request_time)  # wsgi: the request's environ
        wait = getattr(wsgi.get("gunicorn.socket"), "queue_wait", None)
        atoms["queue_wait_ms"] = round(wait * 1000, 3) if wait is not None else None
        return atoms

    def setup(self, cfg) -> None:
        super().setup(cfg)
        tag = _TagFilter()
        json_lines = Settings.from_env().log_format == "json"
        for handler in self.error_log.handlers + self.access_log.handlers:
            handler.addFilter(tag)
            if json_lines:
                handler.setFormatter(jsonlog.JsonFormatter())
            elif handler.formatter and self.access_fmt == handler.formatter._fmt:
                handler.formatter.datefmt = self.datefmt
