"""A few bytes of memory shared by the master and one worker: what the worker is doing now.

The master maps it just before the fork, the worker writes to it around each request (plain
memory writes, no system call), and the master reads it when the worker dies. That is how a
worker killed by SIGKILL or a segfault still tells which request it was serving.
"""

from __future__ import annotations

import mmap
import struct
import time
from dataclasses import dataclass

_HEADER = struct.Struct("=Qd")  # requests served, start of the request in flight (0 = idle)
_PATH_BYTES = 240


@dataclass(frozen=True)
class Snapshot:
    requests: int
    busy_since: float | None  # wall-clock start of the request in flight
    request: str  # "GET /heavy?n=5" or ""


class Board:
    def __init__(self) -> None:
        self._map = mmap.mmap(-1, _HEADER.size + _PATH_BYTES)  # anonymous, MAP_SHARED

    def request_started(self, requests: int, method: str, path: str) -> None:
        raw = f"{method} {path}".encode("utf-8", "replace")[:_PATH_BYTES].ljust(_PATH_BYTES, b"\0")
        self._map[_HEADER.size :] = raw
        _HEADER.pack_into(self._map, 0, requests, time.time())

    def request_finished(self, requests: int) -> None:
        _HEADER.pack_into(self._map, 0, requests, 0.0)

    def read(self) -> Snapshot:
        requests, since = _HEADER.unpack_from(self._map, 0)
        request = self._map[_HEADER.size :].rstrip(b"\0").decode("utf-8", "replace")
        return Snapshot(requests, since or None, request if since else "")

    def close(self) -> None:
        self._map.close()
