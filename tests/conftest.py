"""Fixtures that start real Gunicorn masters on free loopback ports and always stop them."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from harness.server import GunicornServer


@pytest.fixture
def start_server() -> Iterator[Callable[..., GunicornServer]]:
    """``start_server(workers=2, env={...})`` starts a server; all are stopped after the test."""
    started: list[GunicornServer] = []

    def start(**kwargs: object) -> GunicornServer:
        server = GunicornServer(**kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.cleanup()  # stops it, then deletes its run directory


@pytest.fixture
def server(start_server: Callable[..., GunicornServer]) -> GunicornServer:
    """A two-worker server, the size of this machine (and CI's)."""
    return start_server(workers=2)
