"""The test files' shared helpers: one polling loop, and one HTTP call for exact request targets
(tests otherwise use ``requests``, which normalises a target: ``/a/../b`` becomes ``/b``)."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from email.message import Message
from typing import Any
from urllib.parse import urlsplit


def poll_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    every: float = 0.05,
    ignore: tuple[type[Exception], ...] = (),
) -> Any:
    """``predicate()`` until it returns something truthy, which is returned; fails after
    ``timeout`` seconds naming ``what``. Exceptions of the ``ignore`` types count as not yet
    (the last one is quoted on failure)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = predicate()
        except ignore as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")
        time.sleep(every)


def http_get(url: str, method: str = "GET", timeout: float = 30.0) -> tuple[int, Any, Message]:
    """(status, JSON body or None, headers) of one request whose target is sent exactly as written
    (for the fuzz and bad-input tests), whatever the status; redirects are not followed. Raises
    OSError or http.client.HTTPException when the connection broke."""
    parts = urlsplit(url)
    target = url.split(parts.netloc, 1)[1] or "/"  # exact: urlsplit would drop a bare "?"
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, target)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    return resp.status, data, resp.headers
