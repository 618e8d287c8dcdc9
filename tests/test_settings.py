"""The settings table: each value checked with its name, and the docs generated from it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from heavyapp.settings import Settings as AppSettings
from workers import settings
from workers.settings import Settings, SettingsError

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "docs" / "configuration.md"


def test_defaults() -> None:
    s = Settings.from_env({})
    assert (s.bind_address, s.timeout, s.log_format, s.head_deadline) == (
        "127.0.0.1:8000",
        30,
        "text",
        5,
    )
    assert s.run_dir() == Path("/tmp/heavyapp-127.0.0.1-8000")
    assert s.crash_log_path() == s.run_dir() / "crashes.jsonl"


def test_values_are_parsed_by_kind() -> None:
    s = Settings.from_env(
        {
            "HEAVYAPP_LOG_FORMAT": "JSON",
            "HEAVYAPP_HEAD_TIMEOUT": "2.5",
            "HEAVYAPP_RUN_DIR": "/srv/x",
            "MAX_REQUESTS": "0",
            "BIND": "0.0.0.0:9",
        }
    )
    assert (s.log_format, s.head_deadline, s.run_dir(), s.max_requests, s.bind_address) == (
        "json",
        2.5,
        Path("/srv/x"),
        0,
        "0.0.0.0:9",
    )


def test_a_drain_window_of_zero_is_allowed() -> None:
    assert Settings.from_env({"HEAVYAPP_DRAIN_SECONDS": "0"}).drain_seconds == 0
    assert Settings.from_env({}).drain_seconds == 0


def test_the_head_deadline_shrinks_to_half_the_timeout() -> None:
    assert Settings.from_env({"TIMEOUT": "6"}).head_deadline == 3


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"HEAVYAPP_LOG_FORMAT": "xml"}, "HEAVYAPP_LOG_FORMAT must be one of text, json"),
        ({"TIMEOUT": "soon"}, "TIMEOUT must be an integer, got 'soon'"),
        ({"MAX_REQUESTS": "-1"}, "MAX_REQUESTS must be zero or more"),
        ({"HEAVYAPP_HEAD_TIMEOUT": "0"}, "HEAVYAPP_HEAD_TIMEOUT must be a positive number"),
        ({"HEAVYAPP_HEAD_TIMEOUT": "nan"}, "HEAVYAPP_HEAD_TIMEOUT must be a positive number"),
        ({"HEAVYAPP_HEAD_TIMEOUT": "16"}, "at most half of the timeout"),
        ({"HEAVYAPP_DRAIN_SECONDS": "-0.5"}, "HEAVYAPP_DRAIN_SECONDS must be zero or a positive"),
        ({"HEAVYAPP_DRAIN_SECONDS": "inf"}, "HEAVYAPP_DRAIN_SECONDS must be zero or a positive"),
        ({"HEAVYAPP_DRAIN_SECONDS": "x"}, "HEAVYAPP_DRAIN_SECONDS must be a number of seconds"),
        (
            {"HEAVYAPP_DRAIN_SECONDS": "10", "GRACEFUL_TIMEOUT": "10"},
            "HEAVYAPP_DRAIN_SECONDS=10 must be below GRACEFUL_TIMEOUT (10s)",
        ),
    ],
)
def test_bad_values_are_refused_by_name(env: dict[str, str], says: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(says)):
        Settings.from_env(env)


def test_the_configuration_reference_is_current() -> None:
    """Regenerate with ``python -m workers.settings heavyapp.settings > docs/configuration.md``."""
    assert REFERENCE.read_text() == settings.reference(AppSettings)


def test_the_generator_takes_the_app_from_the_command_line_and_builds_no_app() -> None:
    """The kit never imports the app: the app's settings module is named on the command line,
    and importing it builds no app (a bad model size would stop an app being built)."""
    env = {**os.environ, "HEAVYAPP_MODEL_MB": "lots"}
    done = subprocess.run(
        [sys.executable, "-m", "workers.settings", "heavyapp.settings"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=REPO,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == REFERENCE.read_text()
    assert "## The app" not in settings.reference()  # without an app: the kit's part only


def test_every_heavyapp_variable_in_the_code_is_documented() -> None:
    """A ``HEAVYAPP_*`` name in any Python file is in the docs: the kit's and the app's settings
    in the configuration reference, the nginx template's in docs/front.md, the test and benchmark
    switches in CONTRIBUTING.md."""
    pages = [*REPO.glob("docs/*.md"), REPO / "CONTRIBUTING.md"]
    documented = "".join(page.read_text() for page in pages)
    names = set()
    for path in REPO.rglob("*.py"):
        if ".venv" not in path.parts:
            names |= set(re.findall(r"HEAVYAPP_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    assert sorted(n for n in names if n not in documented) == []


def test_kit_variables_are_read_in_at_most_three_modules() -> None:
    """Only the settings modules read the environment for settings."""
    readers = set()
    for path in [
        *REPO.glob("workers/**/*.py"),
        *REPO.glob("heavyapp/*.py"),
        REPO / "gunicorn_conf.py",
    ]:
        text = path.read_text()
        if re.search(r"environ\.get\(|environ\[[^]]+\](?!\s*=)|getenv\(", text):
            readers.add(str(path.relative_to(REPO)))
    assert readers <= {"workers/settings.py", "heavyapp/settings.py"}, readers
