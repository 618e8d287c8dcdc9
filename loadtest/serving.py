"""A server for one measurement: started, and afterwards always stopped, even when its start
failed (``GunicornServer.stop`` also closes its log file)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from workers.launch import GunicornServer


@contextlib.contextmanager
def serving(server: GunicornServer) -> Iterator[GunicornServer]:
    """Start ``server`` for the ``with`` block; stop it on the way out, whatever happened."""
    try:
        yield server.start()
    finally:
        server.stop()
