"""The CPU-bound work and the strict parsing of its size.

``count`` stands for the user's own CPU-bound code: a pure-Python loop that holds the GIL for its
whole run, so only more *processes* (not threads) make more of them run at once.
"""

from __future__ import annotations

import re

#: More digits than any sane bound has; longer values are refused before any parsing.
MAX_DIGITS = 20
_DIGITS = re.compile(r"-?[0-9]+")


class BadWorkSize(ValueError):
    """The client asked for a work size we refuse; the message says why, for the client."""


def count(n: int) -> int:
    """Count to ``n`` one step at a time, the way the original Node.js article does."""
    total = 0
    for _ in range(n):
        total += 1
    return total


def parse_work_size(values: list[str], default: int, maximum: int) -> int:
    """Turn the ``n`` query values into a work size, or raise ``BadWorkSize`` saying what is wrong.

    Only plain ASCII digits are accepted: ``int()`` would also take ``" 12"``, ``"1_000"`` and
    ``"١٢"``, which no client means to send.
    """
    if not values:
        return default
    if len(values) > 1:
        raise BadWorkSize(f"n is given {len(values)} times; give it once")
    raw = values[0]
    if len(raw) > MAX_DIGITS:
        raise BadWorkSize(f"n is {len(raw)} characters long; at most {MAX_DIGITS} are accepted")
    if not _DIGITS.fullmatch(raw):
        raise BadWorkSize(f"n must be a non-negative integer, got {raw!r}")
    n = int(raw)
    if n < 0:
        raise BadWorkSize(f"n must not be negative, got {n}")
    if n > maximum:
        raise BadWorkSize(f"n={n} is above the maximum {maximum} (HEAVYAPP_MAX_N)")
    return n
