"""The Flask app through its test client: answers, headers and every kind of bad input.

The app stands alone; the client here has the kit's Flask side attached, as a kit worker does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from flask.testing import FlaskClient

from heavyapp import create_app
from heavyapp.settings import Settings, SettingsError
from workers.flask_ext import init_app


@pytest.fixture
def client() -> FlaskClient:
    return init_app(create_app(Settings(default_n=1000, max_n=100_000, chaos=False))).test_client()


def test_heavy_counts_to_n(client: FlaskClient) -> None:
    body = client.get("/heavy?n=12345").get_json()
    assert body["result"] == body["n"] == 12345
    assert body["message"] == "The result of the CPU intensive task is 12345"
    assert body["elapsed_ms"] >= 0 and isinstance(body["pid"], int)


def test_heavy_defaults_n(client: FlaskClient) -> None:
    assert client.get("/heavy").get_json()["result"] == 1000


def test_healthz(client: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEAVYAPP_WORKER_ID", "3")
    resp = client.get("/healthz")
    assert resp.get_json()["status"] == "ok"
    assert resp.headers["X-Worker-Id"] == "3" and resp.get_json()["worker_id"] == "3"


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("n=abc", "non-negative integer"),
        ("n=1.5", "non-negative integer"),
        ("n=", "non-negative integer"),
        ("n=%201", "non-negative integer"),
        ("n=1_000", "non-negative integer"),
        ("n=%D9%A1", "non-negative integer"),
        ("n=-5", "negative"),
        ("n=100001", "above the maximum 100000"),
        ("n=" + "9" * 21, "21 characters long"),
        ("n=" + "9" * 5000, "5000 characters long"),
        ("n=1&n=2", "given 2 times"),
    ],
)
def test_bad_n_is_a_400_saying_why(client: FlaskClient, query: str, says: str) -> None:
    resp = client.get(f"/heavy?{query}")
    assert resp.status_code == 400
    assert says in resp.get_json()["error"]
    assert resp.headers["X-Worker-Pid"]


def test_unknown_path_is_a_json_404(client: FlaskClient) -> None:
    resp = client.get("/nope")
    assert resp.status_code == 404 and "Not Found" in resp.get_json()["error"]
    assert "X-Worker-Id" in resp.headers


def test_wrong_method_is_a_json_405(client: FlaskClient) -> None:
    resp = client.put("/heavy")  # GET and POST (JSON) only
    assert resp.status_code == 405 and "Method Not Allowed" in resp.get_json()["error"]


def test_chaos_routes_do_not_exist_unless_enabled(client: FlaskClient) -> None:
    assert client.post("/chaos/exception").status_code == 404


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"HEAVYAPP_MAX_N": "0"}, "HEAVYAPP_MAX_N"),
        ({"HEAVYAPP_DEFAULT_N": "x"}, "HEAVYAPP_DEFAULT_N"),
        ({"HEAVYAPP_DEFAULT_N": "10", "HEAVYAPP_MAX_N": "5"}, "above HEAVYAPP_MAX_N"),
    ],
)
def test_bad_settings_are_refused(env: dict[str, str], says: str) -> None:
    with pytest.raises(SettingsError, match=says):
        Settings.from_env(env)


def test_chaos_parameters_are_checked_and_named() -> None:
    chaotic = init_app(create_app(Settings(default_n=1000, max_n=100_000, chaos=True)))
    chaotic = chaotic.test_client()
    resp = chaotic.post("/chaos/leak?mb=5000")
    assert resp.status_code == 400
    assert resp.get_json()["error"] == "mb=5000 is above the maximum 4096"
    assert (
        "seconds must be a non-negative integer"
        in chaotic.post("/chaos/hang?seconds=x").get_json()["error"]
    )


def test_the_app_stands_alone_without_the_kit() -> None:
    """Any WSGI server can run it: importing the app imports nothing of ``workers``."""
    code = (
        "import sys, heavyapp; "
        "kit = sorted(m for m in sys.modules if m.split('.')[0] == 'workers'); "
        "print(kit); "
        "c = heavyapp.app.test_client(); r = c.get('/heavy?n=5'); "
        "assert r.get_json()['result'] == 5 and 'X-Worker-Pid' not in r.headers"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_importing_the_package_builds_no_app_until_asked() -> None:
    """``import heavyapp`` reads no setting and builds nothing (a bad model size is not even
    seen); ``heavyapp:app``, as Gunicorn loads it, builds the app once and refuses the bad value."""
    code = (
        "import heavyapp; "
        "assert 'app' not in vars(heavyapp), 'built at import'; "
        "from gunicorn.util import import_app; "
        "import_app('heavyapp:app')"
    )
    env = {**os.environ, "HEAVYAPP_MODEL_MB": "lots"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env
    )
    assert done.returncode == 1, done.stderr
    assert "SettingsError: HEAVYAPP_MODEL_MB must be an integer, got 'lots'" in done.stderr
    code = (
        "import heavyapp; from gunicorn.util import import_app; "
        "assert import_app('heavyapp:app') is import_app('heavyapp:app') is heavyapp.app; "
        "print(type(heavyapp.app).__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "Flask"), done.stderr


def test_the_kit_attaches_once() -> None:
    app = create_app(Settings(default_n=1, max_n=10, chaos=False))
    init_app(init_app(app))
    resp = app.test_client().get("/healthz")
    assert resp.headers.getlist("X-Worker-Pid") == [str(os.getpid())]  # tagged once, not twice
