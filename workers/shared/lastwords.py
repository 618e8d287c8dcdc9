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


def folder(run_dir: Path) -> Path:
    path = run_dir / "workers"
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare(run_dir: Path) -> None:
    """At master start: an empty folder, so no earlier server's leftovers are taken for ours."""
    for leftover in folder(run_dir).iterdir():
        leftover.unlink(missing_ok=True)


def fault_file(run_dir: Path, pid: int) -> IO[str]:
    """Open the file ``faulthandler`` writes into; keep it open for the worker's whole life."""
    return open(folder(run_dir) / f"{pid}.fault", "w")


def leave(run_dir: Path, pid: int, **words: Any) -> None:
    """Write (replace) this worker's last words."""
    tmp = folder(run_dir) / f"{pid}.json.tmp"
    tmp.write_text(json.dumps(words, default=str))
    os.replace(tmp, folder(run_dir) / f"{pid}.json")


def collect(run_dir: Path, pid: int) -> tuple[dict[str, Any], str]:
    """Read and remove a dead worker's last words and fault traceback (either may be empty)."""
    words: dict[str, Any] = {}
    fault = ""
    for suffix in (".json", ".fault"):
        path = run_dir / "workers" / f"{pid}{suffix}"
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
