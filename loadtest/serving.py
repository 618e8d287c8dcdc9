"""A server for one measurement: started, and afterwards always stopped and its run directory
removed, even when its start failed (``GunicornServer.cleanup`` stops it, which closes its log
file, then deletes the run directory; a log kept elsewhere with ``log_dir`` stays)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from workers.launch import GunicornServer


@contextlib.contextmanager
def serving(server: GunicornServer) -> Iterator[GunicornServer]:
    """Start ``server`` for the ``with`` block; on the way out, whatever happened, stop it and
    remove its run directory."""
    try:
        yield server.start()
    finally:
        server.cleanup()
