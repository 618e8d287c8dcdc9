"""Fixtures that start real Gunicorn masters on free loopback ports and always stop them, and
the Docker engine and images the container, Compose and swarm tests share (built once a run)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.server import GunicornServer
from helpers import unavailable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dockerkit


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


# --------------------------------------------------------------------------- Docker


def docker_unavailable(reason: str) -> None:
    message = f"Docker is not usable here: {reason}"
    print(message, file=sys.stderr)
    unavailable(message, "HEAVYAPP_REQUIRE_DOCKER")


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[None]:
    """A Docker engine for the session: the one running, or a dockerd we start and stop."""
    try:
        started_pid = dockerkit.start_engine()
    except dockerkit.DockerUnavailable as exc:
        docker_unavailable(str(exc))
    yield
    if started_pid:
        dockerkit.stop_engine(started_pid)


@pytest.fixture(scope="session")
def base_image(docker_engine: None) -> str:
    try:
        return dockerkit.ensure_base_image(log=lambda m: print(m, file=sys.stderr))
    except dockerkit.DockerUnavailable as exc:
        docker_unavailable(str(exc))


@pytest.fixture(scope="session")
def app_image(base_image: str) -> str:
    seconds = dockerkit.build_app_image(dockerkit.APP_TAG, base_image)
    size = dockerkit.image_size_mb(dockerkit.APP_TAG)
    print(
        f"\n[container] built {dockerkit.APP_TAG} on {base_image} in {seconds:.1f} s, {size:.0f} MB"
    )
    return dockerkit.APP_TAG


@pytest.fixture(scope="session")
def front_image(base_image: str) -> str:
    seconds = dockerkit.build_front_image(dockerkit.FRONT_TAG, base_image)
    size = dockerkit.image_size_mb(dockerkit.FRONT_TAG)
    print(f"\n[container] built {dockerkit.FRONT_TAG} in {seconds:.1f} s, {size:.0f} MB")
    return dockerkit.FRONT_TAG
