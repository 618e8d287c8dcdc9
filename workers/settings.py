"""Reading settings from the environment: one place for the config, the app and heavyctl."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path


class SettingsError(ValueError):
    """A setting has a value we refuse to start with; the message names the variable."""


def positive_int(
    env: Mapping[str, str], name: str, default: int | None, *, allow_zero: bool = False
) -> int | None:
    """``name`` from ``env`` as an integer >= 1 (>= 0 with ``allow_zero``), else ``default``."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < (0 if allow_zero else 1):
        floor = "zero or more" if allow_zero else "a positive integer"
        raise SettingsError(f"{name} must be {floor}, got {value}")
    return value


#: A worker's stable id, set by the master just before it forks the worker.
WORKER_ID = "HEAVYAPP_WORKER_ID"


def worker_id() -> str:
    """This worker's stable id as text: ``""`` outside a kit worker (say, Flask's test client)."""
    return os.environ.get(WORKER_ID, "")


def bind_address(env: Mapping[str, str] = os.environ) -> str:
    """``BIND`` if set, else ``HOST:PORT``; loopback by default so a laptop never exposes it."""
    if env.get("BIND"):
        return env["BIND"]
    port = positive_int(env, "PORT", 8000)
    return f"{env.get('HOST') or '127.0.0.1'}:{port}"


def run_dir(env: Mapping[str, str] = os.environ, bind: str | None = None) -> Path:
    """Where one server keeps its control socket, worker state, metrics and crash journal.

    ``HEAVYAPP_RUN_DIR``, else one directory per bind address (``bind``, by default the one
    the environment gives), so servers side by side (tests!) never share one. The master
    exports the directory it settled on (``lifecycle.on_starting``), so its workers agree with
    it; heavyctl computes it from the same variables, so a shell that started the server can
    control it.
    """
    if env.get("HEAVYAPP_RUN_DIR"):
        return Path(env["HEAVYAPP_RUN_DIR"])
    base = env.get("XDG_RUNTIME_DIR") or "/tmp"
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", bind or bind_address(env)).strip("-")
    return Path(base) / f"heavyapp-{slug}"


def claim_run_dir(path: Path, *, private: bool) -> Path:
    """Create ``path``, or refuse one that another user could have planted.

    The default lives in a shared ``/tmp``: a directory or symlink put there by someone else
    would get our control socket and have us delete files in it. The default is also made
    ``private`` (0700); a directory the operator named keeps the mode they gave it.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
            raise SettingsError(
                f"run directory {path} is a symlink or not owned by uid {os.geteuid()}"
            )
        if private:
            path.chmod(0o700)
    except OSError as exc:
        raise SettingsError(f"run directory {path}: {exc.strerror or exc}") from None
    return path


def crash_log_path(env: Mapping[str, str] = os.environ) -> Path:
    """The crash journal: ``HEAVYAPP_CRASH_LOG``, else ``crashes.jsonl`` in the run directory."""
    if env.get("HEAVYAPP_CRASH_LOG"):
        return Path(env["HEAVYAPP_CRASH_LOG"])
    return run_dir(env) / "crashes.jsonl"
