"""What a worker knows about itself that its app side shows: readiness and the accept queue.

One object per worker process, made by ``HeavyWorker`` and handed to the Flask side
(``flask_ext.init_app(app, state)``), so ``/readyz`` and the backlog gauge read the worker's own
gates rather than module globals. ``ready`` is the one place readiness is decided.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workers import gunicorn_internals as internals
from workers.gates.shedding import Shedding
from workers.shared import draining


class WorkerState:
    def __init__(self, shedding: Shedding, listeners: Sequence[Any], run_dir: Path) -> None:
        self.shedding = shedding
        self.listeners = listeners
        self.run_dir = run_dir

    @property
    def ready(self) -> bool:
        """Should this worker get new requests? Not while its master drains, nor while it sheds
        load."""
        return self.not_ready_because is None

    @property
    def not_ready_because(self) -> str | None:
        """Why ``ready`` is False, for ``/readyz``'s answer; None when ready."""
        if draining.draining(self.run_dir):
            return "draining: the server is stopping"
        if self.shedding.shedding:
            return "overloaded: shedding a growing queue"
        return None

    def backlog(self) -> int:
        """Connections waiting in the accept queue now (shared by all workers); -1 if unknown."""
        return internals.listen_backlog(self.listeners)
