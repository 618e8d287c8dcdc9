"""Degrade, never crash: a platform without a Linux feature the kit uses still serves.

No other OS runs here, so the platform is simulated (tests/shim/sitecustomize.py, on the server's
``PYTHONPATH``): the constants macOS lacks deleted before anything imports, or the listener
refusing ``SO_TIMESTAMPNS``. The server must start, serve ``/heavy``, and say what is off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import requests

from harness.server import GunicornServer

Start = Callable[..., GunicornServer]
SHIM = Path(__file__).resolve().parent / "shim"


def shimmed(start_server: Start, shim: str) -> GunicornServer:
    path = os.pathsep.join(filter(None, [str(SHIM), os.environ.get("PYTHONPATH")]))
    return start_server(workers=2, env={"PYTHONPATH": path, "HEAVYAPP_TEST_SHIM": shim})


def serves(server: GunicornServer) -> None:
    for _ in range(4):
        resp = requests.get(f"{server.url}/heavy?n=1000", timeout=10)
        assert resp.status_code == 200, resp.text
    assert requests.get(f"{server.url}/readyz", timeout=10).status_code == 200
    assert requests.get(f"{server.url}/metrics", timeout=10).status_code == 200


def test_without_the_linux_constants_the_server_starts_serves_and_names_what_is_off(
    start_server: Start,
) -> None:
    server = shimmed(start_server, "no-constants")
    serves(server)
    log = server.log_text()
    for name in ("TCP_DEFER_ACCEPT unavailable", "POLLRDHUP unavailable", "TCP_INFO unavailable"):
        lines = [line for line in log.splitlines() if name in line]
        assert len(lines) == 1 and "[master]" in lines[0], (name, log)  # once, by the master
    assert "Traceback" not in log


def test_a_listener_refusing_timestamps_is_logged_and_the_server_serves(
    start_server: Start,
) -> None:
    server = shimmed(start_server, "refuse-timestamps")
    serves(server)
    log = server.log_text()
    refused = [line for line in log.splitlines() if "refused by the test shim" in line]
    assert len(refused) == 2, log  # each worker sets the listener's options, and says so
    assert all("SO_TIMESTAMPNS unavailable" in line for line in refused)
    assert "Traceback" not in log
