"""Reading settings from the environment: one place for the config, the app and heavyctl."""

from __future__ import annotations

import os
import re
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


def bind_address(env: Mapping[str, str] = os.environ) -> str:
    """``BIND`` if set, else ``HOST:PORT``; loopback by default so a laptop never exposes it."""
    if env.get("BIND"):
        return env["BIND"]
    port = positive_int(env, "PORT", 8000)
    return f"{env.get('HOST') or '127.0.0.1'}:{port}"


def run_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where one server keeps its control socket, worker state and crash journal.

    One directory per bind address, so servers side by side (tests!) never share a control
    socket; ``HEAVYAPP_RUN_DIR`` overrides it. heavyctl computes the same path from the same
    variables, so a shell that started the server can control it.
    """
    if env.get("HEAVYAPP_RUN_DIR"):
        return Path(env["HEAVYAPP_RUN_DIR"])
    base = env.get("XDG_RUNTIME_DIR") or "/tmp"
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", bind_address(env)).strip("-")
    return Path(base) / f"heavyapp-{slug}"


def crash_log_path(env: Mapping[str, str] = os.environ) -> Path:
    """The crash journal: ``HEAVYAPP_CRASH_LOG``, else ``crashes.jsonl`` in the run directory."""
    if env.get("HEAVYAPP_CRASH_LOG"):
        return Path(env["HEAVYAPP_CRASH_LOG"])
    return run_dir(env) / "crashes.jsonl"
