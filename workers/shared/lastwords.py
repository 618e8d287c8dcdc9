"""What a worker leaves behind for the master to read after it is gone.

Two files per worker pid in ``<run dir>/workers/``: ``<pid>.fault``, where ``faulthandler``
writes the Python traceback when a fatal signal hits, and ``<pid>.json``, where the worker's own
code writes why it is leaving (a recycle, a timeout) just before it goes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from workers.settings import run_dir


def folder() -> Path:
    return run_dir() / "workers"


def prepare() -> None:
    """At master start: an empty folder, so no earlier server's leftovers are taken for ours."""
    folder().mkdir(parents=True, exist_ok=True)
    for leftover in folder().iterdir():
        leftover.unlink(missing_ok=True)


def fault_file(pid: int) -> IO[str]:
    """Open the file ``faulthandler`` writes into; keep it open for the worker's whole life."""
    folder().mkdir(parents=True, exist_ok=True)
    return open(folder() / f"{pid}.fault", "w")


def leave(pid: int, **words: Any) -> None:
    """Write (replace) this worker's last words."""
    folder().mkdir(parents=True, exist_ok=True)
    tmp = folder() / f"{pid}.json.tmp"
    tmp.write_text(json.dumps(words, default=str))
    os.replace(tmp, folder() / f"{pid}.json")


def collect(pid: int) -> tuple[dict[str, Any], str]:
    """Read and remove a dead worker's last words and fault traceback (either may be empty)."""
    words: dict[str, Any] = {}
    fault = ""
    for suffix in (".json", ".fault"):
        path = folder() / f"{pid}{suffix}"
        try:
            text = path.read_text()
            path.unlink()
        except OSError:
            continue
        if suffix == ".json":
            words = json.loads(text or "{}")
        else:
            fault = text.strip()
    return words, fault
