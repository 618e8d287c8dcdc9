"""The config against real masters: its run directory, refusals to start, preload."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from gunicorn.ctl.client import ControlClient, ControlClientError
from prometheus_client.parser import text_string_to_metric_families

from harness.server import GunicornServer, ServerError, free_port
from helpers import poll_until

pytestmark = pytest.mark.server
Start = Callable[..., GunicornServer]


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A short-named directory under /tmp (a control socket path must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="hk-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def master_pid_on(socket: Path) -> int:
    """Ask the control socket for its master's pid; Gunicorn re-binds it around each fork,
    so it may be missing for a moment: poll."""

    def ask() -> int:
        with ControlClient(str(socket), timeout=5) as client:
            return client.send_command("show stats")["pid"]

    return poll_until(ask, 10, f"an answer on {socket}", ignore=(ControlClientError,))


def test_servers_bound_with_dash_b_get_their_own_run_directory(
    start_server: Start, scratch: Path
) -> None:
    """Same environment, different ``-b``: each master settles on its real bind's directory."""
    base = str(scratch)
    env = {"HEAVYAPP_RUN_DIR": "", "XDG_RUNTIME_DIR": base, "PORT": "8000"}
    servers = []
    for _ in range(2):
        port = free_port()
        servers.append(start_server(port=port, env=env, args=["-b", f"127.0.0.1:{port}"]))
    for server in servers:
        where = Path(base) / f"heavyapp-127.0.0.1-{server.port}"
        server.wait_for_log(rf"run directory: {where} \(control socket")
        assert oct(where.stat().st_mode & 0o777) == "0o700"
        assert master_pid_on(where / "gunicorn.ctl") == server.master_pid
    assert not (Path(base) / "heavyapp-127.0.0.1-8000").exists()


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"WEB_CONCURRENCY": "0"}, "refusing to start: WEB_CONCURRENCY must be a positive integer"),
        # Gunicorn validates its own default, parsed from WEB_CONCURRENCY, before any config file.
        ({"WEB_CONCURRENCY": "-1"}, "Value must be positive: -1"),
        ({"WEB_CONCURRENCY": "three"}, "invalid literal for int.*'three'"),
        (
            {"HEAVYAPP_MAX_RSS_MB": "lots"},
            "refusing to start: HEAVYAPP_MAX_RSS_MB must be an integer",
        ),
        (
            {"HEAVYAPP_BACKOFF_BASE_MS": "0"},
            "refusing to start: HEAVYAPP_BACKOFF_BASE_MS must be a",
        ),
        ({"HEAVYAPP_LOG_FORMAT": "xml"}, "refusing to start: HEAVYAPP_LOG_FORMAT"),
        (
            {"HEAVYAPP_HEAD_TIMEOUT": "20", "TIMEOUT": "30"},
            r"refusing to start: HEAVYAPP_HEAD_TIMEOUT=20 must be at most half of the timeout",
        ),
        # The app's own settings are checked when the app is created: no worker can boot.
        ({"HEAVYAPP_MAX_N": "0"}, "HEAVYAPP_MAX_N must be a positive integer, got 0"),
    ],
)
def test_bad_settings_refuse_to_start(env: dict[str, str], says: str) -> None:
    server = GunicornServer(env=env)
    try:
        with pytest.raises(ServerError):
            server.start()
        # The whole log: on Python 3.13 a worker's boot traceback pushes it out of the error's tail.
        assert re.search(says, server.log_text()), server.tail()
        assert server.stop() not in (0, None)
    finally:
        server.cleanup()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a directory to another user")
def test_a_run_directory_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    planted = tmp_path / "planted"
    planted.mkdir()
    os.chown(planted, 65534, 65534)
    server = GunicornServer(env={"HEAVYAPP_RUN_DIR": str(planted)})
    try:
        with pytest.raises(ServerError, match=f"run directory {planted} is a symlink or not"):
            server.start()
        assert server.stop() not in (0, None)
    finally:
        server.cleanup()


def test_a_config_importing_prometheus_needs_a_named_metrics_directory(
    start_server: Start, scratch: Path
) -> None:
    """Preload names the directory itself (tests/test_native.py); a config file that imports
    prometheus_client before any hook runs must name it."""
    conf = scratch / "conf.py"
    conf.write_text("from gunicorn_conf import *  # noqa: F403\nimport prometheus_client\n")
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    refused = GunicornServer(command=[gunicorn, "-c", str(conf), "heavyapp:app"])
    try:
        with pytest.raises(
            ServerError, match="prometheus_client was imported in the master before"
        ):
            refused.start()
        assert refused.stop() not in (0, None)
    finally:
        refused.cleanup()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(scratch)}
    server = start_server(workers=2, args=["--preload"], env=env)
    for _ in range(6):
        requests.get(f"{server.url}/heavy?n=10", timeout=10).raise_for_status()
    resp = requests.get(f"{server.url}/metrics", timeout=10)
    resp.raise_for_status()
    text = resp.text
    counted = sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "heavyapp_http_requests_total" and sample.labels["endpoint"] == "/heavy"
    )
    assert counted == 6


def test_a_second_master_on_the_same_run_directory_is_refused(start_server: Start) -> None:
    first = start_server(workers=1)
    requests.get(f"{first.url}/heavy?n=10", timeout=10).raise_for_status()
    metrics_files = sorted((first.run_dir / "metrics").glob("*.db"))
    second = GunicornServer(workers=1, env={"HEAVYAPP_RUN_DIR": str(first.run_dir)})
    try:
        with pytest.raises(
            ServerError,
            match=f"another master \\(pid {first.master_pid}\\) uses run directory {first.run_dir}",
        ):
            second.start()
    finally:
        second.cleanup()
    assert sorted((first.run_dir / "metrics").glob("*.db")) == metrics_files
    assert first.healthy()
