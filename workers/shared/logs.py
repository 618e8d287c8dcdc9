"""The kit's Gunicorn logger: every line carries the pid and the worker id (or "master")."""

from __future__ import annotations

import logging
import os

from gunicorn import glogging

from workers.settings import worker_id
from workers.shared import jsonlog

#: Set in the master by ``on_starting``; a fork inherits it, so a worker can tell it is not it.
MASTER_PID = 0


def worker_tag() -> str:
    """``master`` in the master, ``worker <id>`` in a worker (the id comes from the environment)."""
    if MASTER_PID in (0, os.getpid()):  # 0: the master before on_starting ran
        return "master"
    return f"worker {worker_id() or '?'}"


class _TagFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = worker_tag()
        return True


_TAG = _TagFilter()


class HeavyLogger(glogging.Logger):
    """Gunicorn's logger with ``[pid] [worker id]`` on error and access lines alike."""

    error_fmt = r"%(asctime)s [%(process)d] [%(worker)s] [%(levelname)s] %(message)s"
    access_fmt = r"%(asctime)s [%(process)d] [%(worker)s] %(message)s"

    def setup(self, cfg) -> None:
        super().setup(cfg)
        json_lines = jsonlog.log_format() == "json"
        for handler in self.error_log.handlers + self.access_log.handlers:
            handler.addFilter(_TAG)
            if json_lines:
                handler.setFormatter(jsonlog.JsonFormatter())
            elif handler.formatter and self.access_fmt == handler.formatter._fmt:
                handler.formatter.datefmt = self.datefmt
