"""``HEAVYAPP_LOG_FORMAT=json``: one JSON object per log line, for log shippers that parse.

Each object has ``time``, ``level``, ``logger``, ``pid``, ``role`` (master | worker),
``worker_id`` and ``message``; access lines add the request's fields (``queue_wait_ms``: how
long it waited for a worker, null when unknown), error lines with an
exception its ``traceback`` (inside the object: a line stays a line).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any


def access_fields(atoms: Mapping[str, Any]) -> dict[str, Any]:
    """The request, from the atoms Gunicorn formats its access line with."""
    status = str(atoms["s"])
    return {
        "remote": atoms["h"],
        "method": atoms["m"],
        "path": atoms["U"],
        "query": atoms["q"],
        "protocol": atoms["H"],
        "status": int(status) if status.isdigit() else status,
        "bytes": atoms["B"],
        "duration_ms": round(atoms["D"] / 1000, 3),
        "user_agent": atoms["a"],
        "queue_wait_ms": atoms.get("queue_wait_ms"),
    }


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        tag = getattr(record, "worker", "")
        role, _, wid = tag.partition(" ")
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created)
            .astimezone()
            .isoformat("T", "milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "role": role or None,
            "worker_id": int(wid) if wid.isdigit() else None,
            "message": record.getMessage(),
        }
        if record.name == "gunicorn.access" and isinstance(record.args, Mapping):
            entry.update(access_fields(record.args))
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
