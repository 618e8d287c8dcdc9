"""What a connection must pass in the worker before the app runs, one gate per module.

``HeavyWorker.handle`` asks each gate in turn; the first that refuses answers the client itself
(``Refusal``), so the app never runs for a request that could not be served well. A gate costs
the usual request one cheap look at the socket.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Refusal:
    """The answer a gate gives instead of the app: ``status`` 0 closes without one."""

    status: int
    reason: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()
    warning: str | None = None  # one line for the error log, if an operator should hear of it
    #: The status of the one access line this refusal gets (499: the client left), 0 for none;
    #: ``request_line`` is what the client asked, as peeked (Gunicorn never parsed it).
    logged: int = 0
    request_line: str = ""


class Gate(Protocol):
    def check(self, client: socket.socket, addr: Any) -> Refusal | None:
        """None to let the connection through to the next gate (and then the app)."""
