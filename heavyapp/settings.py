"""The app's settings, read once from the environment when the app is created."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from workers.settings import SettingsError, positive_int


@dataclass(frozen=True)
class Settings:
    default_n: int
    max_n: int
    chaos: bool

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Refuse to build the app on a bad value: a worker that cannot boot halts Gunicorn."""
        max_n = positive_int(env, "HEAVYAPP_MAX_N", 50_000_000)
        default_n = positive_int(env, "HEAVYAPP_DEFAULT_N", 1_000_000, allow_zero=True)
        if default_n > max_n:
            raise SettingsError(f"HEAVYAPP_DEFAULT_N={default_n} is above HEAVYAPP_MAX_N={max_n}")
        return cls(default_n=default_n, max_n=max_n, chaos=env.get("HEAVYAPP_CHAOS") == "1")
