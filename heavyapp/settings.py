"""The app's own settings, read once from the environment when the app is created.

The app stands alone (any WSGI server runs it), so it reads its variables itself; each is
declared with the same metadata as the kit's (``env``, ``doc``), which is how
``docs/configuration.md`` lists them too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

#: The largest model the app builds: a typo like 40960 must not take the host's memory.
MAX_MODEL_MB = 4096


class SettingsError(ValueError):
    """A setting has a value the app refuses; the message names the variable."""


def _setting(
    env: str, default: Any, doc: str, *, minimum: int = 1, kind: str = "int", shown: Any = None
) -> Any:
    meta = {"env": env, "doc": doc, "kind": kind, "minimum": minimum, "choices": ()}
    return field(default=default, metadata={**meta, "shown": shown})


def _count(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        floor = "zero or more" if minimum == 0 else "a positive integer"
        raise SettingsError(f"{name} must be {floor}, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    """Checked when the app is created: a bad value stops Gunicorn with the same message in
    its traceback."""

    default_n: int = _setting(
        "HEAVYAPP_DEFAULT_N", 1_000_000, "`/heavy` work size when `n` is not given", minimum=0
    )
    max_n: int = _setting("HEAVYAPP_MAX_N", 50_000_000, "the largest `n` `/heavy` accepts")
    max_matmul_size: int = _setting(
        "HEAVYAPP_MAX_MATMUL_SIZE",
        2000,
        "the largest `size` `/matmul` accepts (an NxN product costs 2N³ operations)",
    )
    model_mb: int = _setting(
        "HEAVYAPP_MODEL_MB",
        0,
        f"MB of read-only model built when the app is created, searched by `/predict` "
        f"(`0`: none; at most {MAX_MODEL_MB})",
        minimum=0,
    )
    chaos: bool = _setting(
        "HEAVYAPP_CHAOS",
        False,
        "`1` adds the `/chaos/*` endpoints — never in production",
        kind="flag",
        shown="unset",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Refuse to build the app on a bad value: a worker that cannot boot halts Gunicorn."""
        values: dict[str, Any] = {"chaos": env.get("HEAVYAPP_CHAOS") == "1"}
        for f in fields(cls):
            if f.metadata["kind"] == "int":
                values[f.name] = _count(env, f.metadata["env"], f.default, f.metadata["minimum"])
        settings = cls(**values)
        if settings.default_n > settings.max_n:
            raise SettingsError(
                f"HEAVYAPP_DEFAULT_N={settings.default_n} is above HEAVYAPP_MAX_N={settings.max_n}"
            )
        if settings.model_mb > MAX_MODEL_MB:
            raise SettingsError(
                f"HEAVYAPP_MODEL_MB must be at most {MAX_MODEL_MB}, got {settings.model_mb}"
            )
        return settings


def worker_id() -> str:
    """The id of the worker serving this request, as a kit worker exports it (like pm2's
    ``NODE_APP_INSTANCE``); ``""`` under any other server. Read per request: with a preloaded
    app, the app was created in the master, before any worker had an id."""
    return os.environ.get("HEAVYAPP_WORKER_ID", "")
