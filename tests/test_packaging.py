"""What ships: the wheel and the image carry the runtime code only (heavyapp/ and workers/), and
nothing in them imports the test or load tooling, which the image does not install."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHIPPED = {"heavyapp", "workers"}
#: Installed by the dev, load and bench extras only; a shipped module importing one breaks there.
TOOLING = {"locust", "pytest", "hypothesis", "matplotlib", "requests"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    """The wheel ``pip wheel --no-deps .`` builds, as the Dockerfile's build stage does, from a
    copy of the tree (the build writes build/ and *.egg-info beside the sources)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", "build", "*.egg-info", "__pycache__", ".*_cache", "out"
        ),
    )
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp), str(source)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    # setuptools warns as "...Warning:" (a licence table, classifiers); pip's own notes differ.
    warnings = [line for line in output.splitlines() if re.search(r"\w+Warning\b", line)]
    assert warnings == [], warnings
    (built,) = tmp.glob("heavyapp-*.whl")
    with zipfile.ZipFile(built) as opened:
        yield opened


def test_the_wheel_holds_only_the_runtime_packages(wheel: zipfile.ZipFile) -> None:
    tops = {name.split("/")[0] for name in wheel.namelist() if not name.endswith("/")}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == SHIPPED
    modules = [n for n in wheel.namelist() if n.endswith(".py")]
    assert "workers/heavy.py" in modules and "heavyapp/app.py" in modules
    metadata = wheel.read(f"{dist_info.pop()}/METADATA").decode()
    assert "License-Expression: MIT" in metadata.splitlines()


def imported_roots(source: str) -> set[str]:
    """The top-level package of every import in ``source``, at any depth (lazy ones count)."""
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_imported_roots_sees_lazy_and_dotted_imports() -> None:
    source = "import a.b, c\nfrom d.e import f\nfrom . import g\ndef h():\n    import requests\n"
    assert imported_roots(source) == {"a", "c", "d", "requests"}


def test_no_shipped_module_imports_test_or_load_tooling(wheel: zipfile.ZipFile) -> None:
    offenders = {
        name: sorted(imported_roots(wheel.read(name).decode()) & TOOLING)
        for name in wheel.namelist()
        if name.endswith(".py")
    }
    assert {name: roots for name, roots in offenders.items() if roots} == {}


def test_the_image_copies_only_runtime_files() -> None:
    """The Dockerfile builds the wheel from these and adds the Gunicorn config, nothing else."""
    copied = set()
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            *sources, _dest = [w for w in line.split()[1:] if not w.startswith("--")]
            copied |= set(sources)
    assert copied == {"pyproject.toml", "README.md", *SHIPPED, "gunicorn_conf.py"}


def kit_sources() -> Iterator[tuple[str, str]]:
    for path in sorted((REPO / "workers").rglob("*.py")):
        yield str(path.relative_to(REPO)), path.read_text()


def test_the_kit_never_imports_the_app() -> None:
    """A user copies ``workers/`` next to their own app: nothing in it may need ``heavyapp``."""
    offenders = [name for name, source in kit_sources() if "heavyapp" in imported_roots(source)]
    assert offenders == []


def test_the_kit_keeps_no_state_behind_global_statements() -> None:
    """State lives on objects that are passed (the worker, the master's hooks), never rebound
    module names."""
    offenders = [
        f"{name}:{node.lineno}"
        for name, source in kit_sources()
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Global)
    ]
    assert offenders == []


@pytest.mark.parametrize(("package", "other"), [("bench", "loadtest"), ("loadtest", "bench")])
def test_bench_and_loadtest_share_only_through_the_harness(package: str, other: str) -> None:
    offenders = [
        str(path.relative_to(REPO))
        for path in sorted((REPO / package).rglob("*.py"))
        if other in imported_roots(path.read_text())
    ]
    assert offenders == []
