"""The CPU-bound work and the strict parsing of its size.

``count`` stands for the user's own CPU-bound code: a pure-Python loop that holds the GIL for its
whole run, so only more *processes* (not threads) make more of them run at once.
"""

from __future__ import annotations

import json
import re

#: More digits than any sane bound has; longer values are refused before any parsing.
MAX_DIGITS = 20
_DIGITS = re.compile(r"-?[0-9]+")


class BadParameter(ValueError):
    """The client sent a query parameter we refuse; the message says why, for the client."""


def count(n: int) -> int:
    """Count to ``n`` one step at a time, the way the original Node.js article does."""
    total = 0
    for _ in range(n):
        total += 1
    return total


def parse_count(
    values: list[str], *, name: str, default: int, maximum: int, bound_by: str | None = None
) -> int:
    """Turn the query values of ``name`` into a count, or raise ``BadParameter`` saying why.

    Only plain ASCII digits are accepted: ``int()`` would also take ``" 12"``, ``"1_000"`` and
    ``"١٢"``, which no client means to send. ``bound_by`` names the setting behind ``maximum``.
    """
    if not values:
        return default
    if len(values) > 1:
        raise BadParameter(f"{name} is given {len(values)} times; give it once")
    raw = values[0]
    if len(raw) > MAX_DIGITS:
        raise BadParameter(
            f"{name} is {len(raw)} characters long; at most {MAX_DIGITS} are accepted"
        )
    if not _DIGITS.fullmatch(raw):
        raise BadParameter(f"{name} must be a non-negative integer, got {raw!r}")
    value = int(raw)
    if value < 0:
        raise BadParameter(f"{name} must not be negative, got {value}")
    if value > maximum:
        source = f" ({bound_by})" if bound_by else ""
        raise BadParameter(f"{name}={value} is above the maximum {maximum}{source}")
    return value


def json_count(
    payload: object, *, name: str, default: int, maximum: int, bound_by: str | None = None
) -> int:
    """``name`` from a JSON object body as a count, with the same bounds as ``parse_count``.

    Only a JSON integer is accepted (not ``true``, ``1.0`` or ``"12"``); absent means
    ``default``."""
    if not isinstance(payload, dict):
        raise BadParameter(f'the body must be a JSON object like {{"{name}": 1000}}')
    if name not in payload:
        return default
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadParameter(f"{name} must be a non-negative integer, got {json.dumps(value)}")
    return parse_count([str(value)], name=name, default=default, maximum=maximum, bound_by=bound_by)
