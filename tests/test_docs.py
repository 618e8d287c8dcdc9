"""The docs name only what exists: paths, kit names, links, make targets, the README's file tree.

Pure and fast: the code is read with ``ast``, never imported, so no app (or model) is built.
"""

from __future__ import annotations

import ast
import builtins
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted(REPO.glob("docs/**/*.md"))]
#: The repository's Python: the kit, the app and what runs from a checkout.
PACKAGES = ("workers", "heavyapp", "harness", "bench", "loadtest", "tests")
TOP_MODULES = ("gunicorn_conf", "locustfile")
#: A span with one of these endings names a file, never an attribute (``gunicorn_conf.py``).
FILE_ENDINGS = re.compile(
    r"\.(py|md|txt|toml|ya?ml|json|jsonl|csv|png|conf|template|service|socket|lock|ctl|sh)$"
)

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
LINK = re.compile(r"\]\(([^)\s]+)\)")
MODULE_RUN = re.compile(rf"python3? -m ((?:{'|'.join(PACKAGES)})(?:\.\w+)*)\b(?!\.)")
MAKE_RUN = re.compile(r"(?:^|`|\s)make ([a-z][\w-]*)")


# -- the code, read as text -----------------------------------------------------------------------


@dataclass
class ClassInfo:
    members: set[str] = field(default_factory=set)
    bases: list[str] = field(default_factory=list)


@dataclass
class ModuleInfo:
    names: set[str] = field(default_factory=set)
    classes: dict[str, ClassInfo] = field(default_factory=dict)
    source: str = ""


def _class_info(node: ast.ClassDef) -> ClassInfo:
    info = ClassInfo(bases=[ast.unparse(b).split(".")[-1] for b in node.bases])
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            info.members.add(item.name)
        elif isinstance(item, ast.Assign):
            info.members |= {t.id for t in item.targets if isinstance(t, ast.Name)}
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            info.members.add(item.target.id)
    for sub in ast.walk(node):  # what the methods set on self
        stored = isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store)
        if stored and isinstance(sub.value, ast.Name) and sub.value.id in ("self", "cls"):
            info.members.add(sub.attr)
    return info


def _module_info(path: Path) -> ModuleInfo:
    source = path.read_text()
    info = ModuleInfo(source=source)
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            info.names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            info.names.add(node.name)
            info.classes[node.name] = _class_info(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            info.names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            info.names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    if "__getattr__" in info.names:  # a lazy attribute (PEP 562) is one named in __all__
        info.names |= set(re.findall(r"\"(\w+)\"", source.partition("__all__")[2][:400]))
    return info


def _modules() -> dict[str, ModuleInfo]:
    found = {name: _module_info(REPO / f"{name}.py") for name in TOP_MODULES}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            dotted = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[dotted] = _module_info(path)
    return found


MODULES = _modules()
CLASSES: dict[str, list[ClassInfo]] = {}
for _info in MODULES.values():
    for _name, _cls in _info.classes.items():
        CLASSES.setdefault(_name, []).append(_cls)
DEFINED = {name for m in MODULES.values() for name in m.names}


def _has_member(cls: str, attr: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether a kit class of that name (any, where two share it) has ``attr``."""
    for info in CLASSES[cls]:
        if attr in info.members:
            return True
        for base in info.bases:
            if base in CLASSES and base not in seen:
                if _has_member(base, attr, seen | {cls}):
                    return True
            elif base not in CLASSES and base not in ("object", "Generic", "Protocol"):
                return True  # inherited from a library: not the docs' to check here
    return False


def _resolves(parts: list[str], module: str) -> bool:
    """``parts`` are attributes of the kit module ``module`` (classes' members included)."""
    info = MODULES[module]
    head, rest = parts[0], parts[1:]
    if f"{module}.{head}" in MODULES:
        return not rest or _resolves(rest, f"{module}.{head}")
    if head not in info.names:
        return False
    if not rest:
        return True
    if head in info.classes and head in CLASSES:
        return len(rest) == 1 and _has_member(head, rest[0])
    return True  # an imported module or an object: its attributes are the library's


def kit_name_exists(name: str) -> bool | None:
    """Whether a dotted name of the kit exists; None when it is not the kit's at all.

    A name starts at a package (``workers.heavy.HeavyWorker``), at a module's last part
    (``gunicorn_internals.set_listener_options``) or at a kit class (``Settings.from_env``).
    """
    parts = name.removesuffix("()").split(".")
    if parts[0] in PACKAGES or parts[0] in TOP_MODULES:
        modules = [m for m in MODULES if name.startswith(m + ".") or m == name]
        longest = max(modules, key=len, default=parts[0])
        if longest == name:
            return True
        return longest in MODULES and _resolves(name[len(longest) + 1 :].split("."), longest)
    short = [m for m in MODULES if m.startswith("workers.") and m.rsplit(".", 1)[-1] == parts[0]]
    if short:
        return any(_resolves(parts[1:], m) for m in short)
    if parts[0] in CLASSES:
        return len(parts) == 2 and _has_member(parts[0], parts[1])
    return None


# -- what the docs say --------------------------------------------------------------------------


def _prose(page: Path) -> str:
    return FENCE.sub("", page.read_text())


def spans() -> Iterator[tuple[Path, str]]:
    for page in PAGES:
        for match in SPAN.finditer(_prose(page)):
            yield page, match.group(1).strip()


#: Top-level folders that runs write and git ignores (``/out/`` in .gitignore): what the docs
#: say is written there exists only after a run, so it is not checked.
RUN_OUTPUT = tuple(
    line.strip("/")
    for line in (REPO / ".gitignore").read_text().splitlines()
    if line.startswith("/") and line.endswith("/")
)


def path_exists(span: str) -> bool | None:
    """Whether a repo path in a span exists (``<placeholder>`` and ``*`` match any name); None
    for what is not a path in this repository."""
    if " " in span or "://" in span:
        return None
    first = span.split("/", 1)[0]
    if "/" not in span:
        if not span.endswith(".py"):
            return None
        return (REPO / span).exists() or any(any((REPO / d).rglob(span)) for d in PACKAGES)
    if not (REPO / first).exists() or first in ("", ".", "~", *RUN_OUTPUT):
        return None
    pattern = re.sub(r"<[^>]+>", "*", span).rstrip("/")
    return any(REPO.glob(pattern)) if "*" in pattern else (REPO / pattern).exists()


def test_every_path_in_backticks_exists() -> None:
    missing = [(p.name, s) for p, s in spans() if path_exists(s) is False]
    assert not missing, f"paths named in the docs that do not exist: {missing}"


def test_every_kit_name_in_backticks_exists() -> None:
    names = [(p, s) for p, s in spans() if DOTTED.fullmatch(s.removesuffix("()"))]
    missing = [
        (p.name, s) for p, s in names if not FILE_ENDINGS.search(s) and kit_name_exists(s) is False
    ]
    assert not missing, f"kit names in the docs that do not exist: {missing}"


def test_every_module_run_and_make_target_exists() -> None:
    targets = set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
    missing = []
    for page in PAGES:
        text = page.read_text()
        code = "\n".join([*FENCE.findall(text), *SPAN.findall(text)])
        missing += [m for m in MODULE_RUN.findall(code) if m not in MODULES]
        missing += [f"make {t}" for t in MAKE_RUN.findall(code) if t not in targets]
    assert not missing, f"commands in the docs that name what does not exist: {missing}"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", _prose(page), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def broken_links(page: Path, text: str) -> list[str]:
    """The links in ``text`` (on ``page``) to repo files or headings that are not there."""
    broken = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        goal = (page.parent / path).resolve() if path else page
        if not goal.exists() or (anchor and goal.suffix == ".md" and anchor not in _anchors(goal)):
            broken.append(target)
    return broken


def test_every_link_to_a_repo_file_resolves() -> None:
    broken = [(p.name, t) for p in PAGES for t in broken_links(p, p.read_text())]
    assert not broken, f"links in the docs that lead nowhere: {broken}"


def test_a_broken_link_is_caught() -> None:
    page = REPO / "docs" / "benchmarks.md"
    text = "[a](bench/scaling.md), [b](design.md#no-such-part), [c](design.md), [d](https://x.org)"
    assert broken_links(page, text) == ["bench/scaling.md", "design.md#no-such-part"]


def test_docstrings_name_only_defined_classes() -> None:
    """A ``CamelCase`` name in the code's docstrings and comments is defined in the repository,
    imported where it is named, or a builtin."""
    missing = []
    for module, info in MODULES.items():
        if module.startswith("tests"):
            continue
        imported = {
            (a.asname or a.name).split(".")[-1]
            for node in ast.walk(ast.parse(info.source))
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for a in node.names
        }
        for name in re.findall(r"``([A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*)``", info.source):
            if name not in DEFINED | imported | CLASSES.keys() and not hasattr(builtins, name):
                missing.append((module, name))
        for dotted in re.findall(r"``([A-Za-z_]\w*(?:\.\w+)+)``", info.source):
            if not FILE_ENDINGS.search(dotted) and kit_name_exists(dotted) is False:
                missing.append((module, dotted))
    assert not missing, f"names in docstrings that are not defined: {sorted(set(missing))}"


# -- the README's file tree ---------------------------------------------------------------------


def tree_paths() -> set[str]:
    """The paths the README's file tree lists, from its indentation (two spaces a level)."""
    text = (REPO / "README.md").read_text()
    block = text.split("## The files", 1)[1].split("```", 2)[1]
    paths, stack = set(), []
    for line in block.splitlines()[1:]:
        match = re.match(r"( *)(\S+/|\S+\.\w+|Dockerfile|Makefile)(?:\s{2,}|$)", line)
        if not match:
            continue
        depth = len(match.group(1)) // 2
        stack[depth:] = [match.group(2).rstrip("/")]
        paths.add("/".join(stack))
    return paths


def test_the_readme_tree_names_what_exists() -> None:
    missing = sorted(p for p in tree_paths() if not (REPO / p).exists())
    assert not missing, f"the README's file tree lists what does not exist: {missing}"


def test_the_readme_tree_lists_every_kit_module() -> None:
    listed = tree_paths()
    modules = {
        str(p.relative_to(REPO))
        for p in (REPO / "workers").rglob("*.py")
        if p.name != "__init__.py" and p.parent.name != "__pycache__"
    }
    assert modules - listed == set(), "README's tree leaves kit modules out"


# -- claims the docs make about the code's numbers ------------------------------------------------


def _shedding_numbers() -> dict[str, float]:
    """The shedding policy's window and target as fractions of the queue timeout, and its
    growth factor, read from the code (``workers/gates/shedding.py``)."""
    for module, info in MODULES.items():
        if module.startswith("workers.") and "Shedding" in info.classes:
            init = re.search(r"class Shedding\b.*?def __init__.*?(?=\n    def )", info.source, re.S)
            assert init, f"{module}.Shedding has no __init__"
            found = {
                name: 1 / int(d)
                for name, d in re.findall(r"self\.(\w+) = cap / (\d+)", init.group(0))
            }
            growth = re.search(r"^GROWTH = ([\d.]+)$", info.source, re.M)
            assert growth, f"{module} declares no GROWTH"
            return {**found, "growth": float(growth.group(1))}
    pytest.fail("no Shedding class under workers/: update this test with its successor")


def test_the_shedding_numbers_in_the_docs_are_the_code_s() -> None:
    numbers = _shedding_numbers()
    words = {1 / 2: "half", 1 / 4: "a quarter", 1 / 10: "a tenth"}
    operating = " ".join((REPO / "docs" / "operating.md").read_text().split())
    assert f"for {words[numbers['interval']]} of `HEAVYAPP_QUEUE_TIMEOUT`" in operating
    assert f"more than {numbers['growth']:g} times the rate" in operating
    assert f"waited more than {words[numbers['target']]} of it" in operating
    design = " ".join((REPO / "docs" / "design.md").read_text().split())
    window = round(1 / numbers["interval"])
    assert f"Arrivals above {numbers['growth']:g} times that for a whole `Q/{window}`" in design


# -- the checks themselves catch what they are for ----------------------------------------------


@pytest.mark.parametrize(
    ("span", "exists"),
    [
        ("docs/bench/scaling.md", False),
        ("workers/gates/nosuch.py", False),
        ("docs/bench/<script>.nope", False),
        ("test_nope.py", False),
        ("docs/bench/<script>.md", True),
        ("test_roster.py", True),
        ("/proc/self/cgroup", None),
        ("gunicorn/systemd.py", None),
        ("out/run_stats.csv", None),  # a run's output, present or not
    ],
)
def test_the_path_check_tells_dangling_from_present(span: str, exists: bool | None) -> None:
    assert path_exists(span) is exists


@pytest.mark.parametrize(
    ("name", "exists"),
    [
        ("gunicorn_internals.listener_sockets", False),
        ("workers.heavy.NoSuchWorker", False),
        ("Settings.no_such_field", False),
        ("harness.nosuch", False),
        ("gunicorn_internals.set_listener_options", True),
        ("workers.heavy.HeavyWorker", True),
        ("HeavyWorker.handle_error", True),
        ("Settings.from_env", True),
        ("workers.settings", True),
        ("os.cpu_count", None),
    ],
)
def test_the_name_check_tells_dangling_from_present(name: str, exists: bool | None) -> None:
    assert kit_name_exists(name) is exists
