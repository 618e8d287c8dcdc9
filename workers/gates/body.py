"""The request body, whole and in memory before the app runs.

A sync worker that let the app read the body from the socket would be held by a slow client for
as long as it pleases (until the master kills the worker: a crash for a rude client). So the
worker reads the body itself first, under a deadline: all of it within ``HEAVYAPP_BODY_TIMEOUT``
of the request's first byte, else a 408; a ``Content-Length`` above ``HEAVYAPP_MAX_BODY_BYTES``
gets a 413 before a byte of it is read (a chunked body, once it passes the cap). The app then
reads ``wsgi.input`` from memory. Malformed chunking is Gunicorn's parser's to refuse (400).
"""

from __future__ import annotations

import socket
from typing import Any

from workers import gunicorn_internals as internals
from workers.gates import Stop, Stopped
from workers.gates.deadline import DeadlineSocket, missed

_CHUNK = 64 * 1024


class BodyRead:
    def __init__(self, max_bytes: int, seconds: float) -> None:
        self.max_bytes = max_bytes
        self.seconds = seconds

    def read(self, req: Any, client: socket.socket, ip: str) -> None:
        """Read ``req``'s body into memory, or raise ``Stopped`` (413 or 408); the connection
        is left disarmed (blocking) for the app either way."""
        deadline = isinstance(client, DeadlineSocket)
        if deadline:
            client.disarm()  # the head deadline's time is over: the head is parsed
        length = internals.declared_length(req)
        if length is not None and length > self.max_bytes:
            raise Stopped(self.too_large())
        if length == 0 or internals.bodiless(req):
            return
        if internals.take_expect_continue(req):
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if deadline:
            client.arm(client.started + self.seconds, missed("request body", self.seconds, ip))
        body = bytearray()
        try:
            while chunk := internals.request_body(req).read(_CHUNK):
                body += chunk
                if len(body) > self.max_bytes:
                    raise Stopped(self.too_large())
        finally:
            if deadline:
                client.disarm()
        internals.replace_body(req, bytes(body))

    def too_large(self) -> Stop:
        return Stop(
            413,
            "Content Too Large",
            f"request body above {self.max_bytes} bytes (HEAVYAPP_MAX_BODY_BYTES)",
        )
