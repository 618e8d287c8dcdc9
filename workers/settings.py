"""Every kit setting, declared once: its environment variable, type, default, bounds and doc.

``Settings.from_env()`` reads them all into one frozen object, checking each value, so a bad one
stops the server before the first fork with a message naming the variable. ``gunicorn_conf.py``
assigns Gunicorn's settings from it. Each process reads it where it starts and keeps the object:
the master's hooks (again on a HUP, which re-reads the configuration; what the master settles
later, the run and metrics directories, it exports to its workers and replaces in its copy),
the logger, each worker, heavyctl. The Flask side, which has no worker object to ask, reads it
where it needs a value: for ``/metrics`` and for the journal of a view's exception.
``docs/configuration.md`` is generated from these declarations and the app's (``python -m
workers.settings heavyapp.settings``), and a test fails when it is stale — the way Gunicorn's own
settings page is built.

This module and the app's own ``heavyapp/settings.py`` are the only readers of kit variables.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class SettingsError(ValueError):
    """A setting has a value we refuse to start with; the message names the variable."""


#: A worker's stable id, exported by the master just before it forks the worker (read by the app
#: as pm2 apps read ``NODE_APP_INSTANCE``).
WORKER_ID = "HEAVYAPP_WORKER_ID"
#: The variables the master exports to its workers once it has settled them.
RUN_DIR = "HEAVYAPP_RUN_DIR"
METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
#: Each worker's native thread budget, exported by the master with the variables libraries read.
NATIVE_THREADS = "HEAVYAPP_NATIVE_THREADS"
#: More native threads per worker than any machine has cores is a typo, not a choice.
MAX_THREADS_PER_WORKER = 1024


def setting(
    env: str,
    default: Any,
    doc: str,
    *,
    kind: str = "int",
    minimum: float | None = 1,
    choices: tuple[str, ...] = (),
    shown: str | None = None,
) -> Any:
    """Declare one setting: a dataclass field whose metadata says how to read and document it.

    ``kind`` is ``int``, ``seconds`` (a number > 0, or >= 0 with ``minimum=0``), ``text``,
    ``choice`` or ``path``;
    ``shown`` is the default as the docs say it when it is computed.
    """
    meta = {"env": env, "doc": doc, "kind": kind, "minimum": minimum, "choices": choices}
    return field(default=default, metadata={**meta, "shown": shown})


def _parse(name: str, raw: str, meta: Mapping[str, Any]) -> Any:
    kind, minimum = meta["kind"], meta["minimum"]
    if kind in ("text", "path"):
        return Path(raw) if kind == "path" else raw
    if kind == "choice":
        value = raw.lower()
        if value not in meta["choices"]:
            allowed = ", ".join(meta["choices"])
            raise SettingsError(f"{name} must be one of {allowed}, got {value!r}")
        return value
    if kind == "seconds":
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a number of seconds, got {raw!r}") from None
        if minimum == 0 and value >= 0 and value != float("inf"):
            return value
        if not value > 0 or value == float("inf"):
            floor = "zero or a positive number" if minimum == 0 else "a positive number"
            raise SettingsError(f"{name} must be {floor} of seconds, got {raw}")
        return value
    try:
        number = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and number < minimum:
        floor = "zero or more" if minimum == 0 else "a positive integer"
        raise SettingsError(f"{name} must be {floor}, got {number}")
    return number


def read_fields(cls: type, env: Mapping[str, str]) -> dict[str, Any]:
    """The values of ``cls``'s declared settings found (non-empty) in ``env``, parsed."""
    values = {}
    for f in dataclasses.fields(cls):
        if "env" not in f.metadata:
            continue
        raw = env.get(f.metadata["env"], "").strip()
        if raw:
            values[f.name] = _parse(f.metadata["env"], raw, f.metadata)
    return values


@dataclass(frozen=True)
class Settings:
    """The kit's settings; Gunicorn's conventional variables first, then the kit's own."""

    web_concurrency: int | None = setting(
        "WEB_CONCURRENCY",
        None,
        "worker count (Gunicorn's own convention); a negative or non-numeric value Gunicorn "
        "itself refuses before any config file is read",
        shown="usable CPUs times `HEAVYAPP_WORKERS_PER_CORE`",
    )
    workers_per_core: int = setting(
        "HEAVYAPP_WORKERS_PER_CORE", 1, "CPU-bound work gains nothing from more workers than cores"
    )
    max_workers: int | None = setting(
        "HEAVYAPP_MAX_WORKERS", None, "upper bound on the computed count", shown="none"
    )
    bind: str | None = setting(
        "BIND",
        None,
        "Gunicorn bind address (one; `-b` may add more)",
        kind="text",
        shown="`HOST:PORT`",
    )
    host: str = setting(
        "HOST",
        "127.0.0.1",
        "loopback by default, so a laptop never exposes the service; the container sets "
        "`HOST=0.0.0.0`",
        kind="text",
    )
    port: int = setting("PORT", 8000, "the port of the default bind")
    timeout: int = setting("TIMEOUT", 30, "seconds before a silent worker is killed")
    graceful_timeout: int = setting(
        "GRACEFUL_TIMEOUT", 30, "seconds a stopping worker has to finish before it is killed"
    )
    drain_seconds: float = setting(
        "HEAVYAPP_DRAIN_SECONDS",
        0,
        "on SIGTERM, seconds the pool keeps taking new connections (with `/readyz` answering "
        "503) before it closes its listeners and serves what is left in the accept queue; for "
        "balancers that stop sending late (Kubernetes endpoints, DNS). 0: close at once, the "
        "queue is still served; must be below `GRACEFUL_TIMEOUT`, which bounds the whole stop "
        "(docs/deployment.md)",
        kind="seconds",
        minimum=0,
    )
    max_requests: int = setting(
        "MAX_REQUESTS", 0, "Gunicorn's planned recycling after N requests (0: never)", minimum=0
    )
    max_requests_jitter: int = setting(
        "MAX_REQUESTS_JITTER", 0, "random extra requests before a recycle", minimum=0
    )
    log_level: str = setting("LOG_LEVEL", "info", "error log level (Gunicorn's)", kind="text")
    log_format: str = setting(
        "HEAVYAPP_LOG_FORMAT",
        "text",
        "`json`: one JSON object per log line",
        kind="choice",
        choices=("text", "json"),
    )
    run_dir_path: Path | None = setting(
        RUN_DIR,
        None,
        "the control socket, worker state, metrics and crash journal of this server; "
        "created 0700, refused if a symlink or another user's",
        kind="path",
        shown="`$XDG_RUNTIME_DIR` or `/tmp`, `/heavyapp-<host>-<port>` of the address really bound",
    )
    runtime_dir: Path | None = setting(
        "XDG_RUNTIME_DIR",
        None,
        "where the default run directory is made",
        kind="path",
        shown="`/tmp`",
    )
    crash_log: Path | None = setting(
        "HEAVYAPP_CRASH_LOG",
        None,
        "the crash journal",
        kind="path",
        shown="`$HEAVYAPP_RUN_DIR/crashes.jsonl`",
    )
    metrics_dir: Path | None = setting(
        METRICS_DIR,
        None,
        "the metrics files of all workers, emptied at start",
        kind="path",
        shown="`$HEAVYAPP_RUN_DIR/metrics`",
    )
    head_timeout: float | None = setting(
        "HEAVYAPP_HEAD_TIMEOUT",
        None,
        "seconds a client has to send its request head; more than half of `TIMEOUT` is refused",
        kind="seconds",
        shown="`5`, or half of `TIMEOUT` if less",
    )
    body_timeout: float | None = setting(
        "HEAVYAPP_BODY_TIMEOUT",
        None,
        "seconds a client has to send its whole request (head and body), from its first byte; "
        "more than half of `TIMEOUT` is refused",
        kind="seconds",
        shown="`10`, or half of `TIMEOUT` if less",
    )
    max_body_bytes: int = setting(
        "HEAVYAPP_MAX_BODY_BYTES",
        1_048_576,
        "largest request body; a larger one gets a 413 (a declared length before a byte is read)",
    )
    queue_timeout: float | None = setting(
        "HEAVYAPP_QUEUE_TIMEOUT",
        None,
        "seconds a request may wait for a worker (kernel-timed, from its first bytes' arrival) "
        "before it is answered 503 with `Retry-After` instead of being served; while the queue "
        "grows (arrivals above the pool's rate) the worker refuses earlier, holding waits near "
        "a tenth of this; set it below your clients' timeout; must be below `TIMEOUT`. 2 s: past "
        "most users' patience, and 50 requests of 40 ms ahead of it per worker, a standing queue, "
        "not a burst; for requests of seconds, ten times the usual request or more",
        kind="seconds",
        shown="`2`, or half of `TIMEOUT` if less",
    )
    max_rss_mb: int | None = setting(
        "HEAVYAPP_MAX_RSS_MB",
        None,
        "memory cap per worker, checked after each request",
        shown="none",
    )
    threads_per_worker: int | None = setting(
        "HEAVYAPP_THREADS_PER_WORKER",
        None,
        "native threads (OpenBLAS, OpenMP, MKL, ...) in each worker; at most "
        f"{MAX_THREADS_PER_WORKER}",
        shown="usable CPUs ÷ workers, at least 1",
    )
    preload: str = setting(
        "HEAVYAPP_PRELOAD",
        "0",
        "`1`: load the app (and its model) once in the master, shared by the workers "
        "(Gunicorn's `preload_app`; `--preload` does the same)",
        kind="choice",
        choices=("0", "1"),
    )
    backoff_base_ms: int = setting(
        "HEAVYAPP_BACKOFF_BASE_MS", 500, "crash-loop restart delay after the second quick crash"
    )
    backoff_max_ms: int = setting("HEAVYAPP_BACKOFF_MAX_MS", 15_000, "longest crash-loop delay")
    backoff_reset_ms: int = setting(
        "HEAVYAPP_BACKOFF_RESET_MS", 30_000, "a worker that lived this long resets its id's delay"
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Every setting from ``env``, checked alone and against each other."""
        settings = cls(**read_fields(cls, env))
        settings.check()
        return settings

    def check(self) -> None:
        if self.threads_per_worker is not None and self.threads_per_worker > MAX_THREADS_PER_WORKER:
            raise SettingsError(
                f"HEAVYAPP_THREADS_PER_WORKER must be at most {MAX_THREADS_PER_WORKER}, "
                f"got {self.threads_per_worker}"
            )
        half = self.timeout / 2
        for name, value in (
            ("HEAVYAPP_HEAD_TIMEOUT", self.head_timeout),
            ("HEAVYAPP_BODY_TIMEOUT", self.body_timeout),
        ):
            if value is not None and value > half:
                raise SettingsError(
                    f"{name}={value:g} must be at most half of the timeout ({self.timeout}s)"
                )
        if self.drain_seconds >= self.graceful_timeout:
            raise SettingsError(
                f"HEAVYAPP_DRAIN_SECONDS={self.drain_seconds:g} must be below GRACEFUL_TIMEOUT "
                f"({self.graceful_timeout}s), which bounds the whole stop, queue included"
            )
        if self.queue_timeout is not None and self.queue_timeout >= self.timeout:
            raise SettingsError(
                f"HEAVYAPP_QUEUE_TIMEOUT={self.queue_timeout:g} must be below the timeout "
                f"({self.timeout}s)"
            )

    # -- what follows from the values ---------------------------------------------------------

    @property
    def bind_address(self) -> str:
        """``BIND`` if set, else ``HOST:PORT``; loopback by default."""
        return self.bind or f"{self.host or '127.0.0.1'}:{self.port}"

    @property
    def preload_app(self) -> bool:
        return self.preload == "1"

    @property
    def head_deadline(self) -> float:
        """Seconds for a request head: at most half of ``timeout`` (a worker's heartbeat period),
        so the master never takes the wait for a hang."""
        return self.head_timeout if self.head_timeout is not None else min(5, self.timeout / 2)

    @property
    def body_deadline(self) -> float:
        """Seconds for a whole request, at most half of ``timeout`` like ``head_deadline``."""
        return self.body_timeout if self.body_timeout is not None else min(10, self.timeout / 2)

    @property
    def queue_deadline(self) -> float:
        """Seconds a request may wait for a worker: always below ``timeout``."""
        return self.queue_timeout if self.queue_timeout is not None else min(2, self.timeout / 2)

    def run_dir(self, bind: str | None = None) -> Path:
        """Where one server keeps its control socket, worker state, metrics and crash journal.

        ``HEAVYAPP_RUN_DIR``, else one directory per bind address (``bind``, by default the
        configured one), so servers side by side (tests!) never share one. The master exports
        the directory it settled on, so its workers (and a heavyctl started from the same
        shell) agree with it.
        """
        if self.run_dir_path:
            return self.run_dir_path
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", bind or self.bind_address).strip("-")
        return (self.runtime_dir or Path("/tmp")) / f"heavyapp-{slug}"

    def crash_log_path(self) -> Path:
        return self.crash_log or self.run_dir() / "crashes.jsonl"

    def metrics_path(self) -> Path:
        return self.metrics_dir or self.run_dir() / "metrics"


def worker_id() -> str:
    """This worker's stable id as text: ``""`` outside a kit worker."""
    return os.environ.get(WORKER_ID, "")


def native_threads() -> int | None:
    """The native thread budget the master exported to this worker; None outside the kit."""
    raw = os.environ.get(NATIVE_THREADS, "")
    return int(raw) if raw.isdigit() else None


def export(name: str, value: str) -> None:
    """Hand a value the master settled to the workers it forks from now on (and to itself)."""
    os.environ[name] = value


# -- the configuration reference ---------------------------------------------------------------


def _default_text(f: dataclasses.Field) -> str:
    if f.metadata["shown"]:
        return f.metadata["shown"]
    return f"`{f.default}`" if f.default is not None else "none"


def _rows(cls: type) -> Iterator[str]:
    for f in dataclasses.fields(cls):
        if "env" in f.metadata:
            meta = f.metadata
            allowed = f" (one of {', '.join(meta['choices'])})" if meta["choices"] else ""
            yield f"| `{meta['env']}` | {_default_text(f)} | {meta['doc']}{allowed} |"


def reference(app_settings: type | None = None) -> str:
    """``docs/configuration.md``: the kit's settings and, given an app's settings class declared
    the same way (``env``, ``doc`` metadata), the app's, from their declarations. The kit never
    imports the app: the app is named on the command line (``python -m workers.settings
    heavyapp.settings``), and its section's introduction is its class's docstring."""
    head = ["| variable | default | meaning |", "| --- | --- | --- |"]
    made = "<!-- Generated by `python -m workers.settings` from workers/settings.py;"
    app: list[str] = []
    if app_settings is not None:
        module = app_settings.__module__
        source = module.replace(".", "/") + ".py"
        made = f"<!-- Generated by `python -m workers.settings {module}` from workers/settings.py"
        made += f" and\n     {source};"
        intro = inspect.getdoc(app_settings) or ""
        app = [f"## The app (`{source}`)", "", *intro.splitlines(), "", *head]
        app += [*_rows(app_settings), ""]
    return "\n".join(
        [
            "# Configuration",
            "",
            f"{made} tests/test_settings.py fails when this page is stale. -->",
            "",
            "Everything is read from the environment; `GUNICORN_CMD_ARGS` and command-line flags",
            "still override Gunicorn's own settings, as Gunicorn documents. The master logs the",
            "effective values as one line at start. A bad value stops the server before the first",
            "worker forks: `heavyapp: refusing to start: <what is wrong>`.",
            "",
            "## The kit (`workers/settings.py`)",
            "",
            *head,
            *_rows(Settings),
            "",
            "Set by the kit itself: `HEAVYAPP_WORKER_ID`, each worker's stable id, exported by the",
            "master just before it forks the worker (the app reads it as pm2 apps read",
            "`NODE_APP_INSTANCE`); `HEAVYAPP_RUN_DIR` and `PROMETHEUS_MULTIPROC_DIR`, once the",
            "master has settled them, so its workers agree with it; `HEAVYAPP_NATIVE_THREADS` and",
            "`OMP_NUM_THREADS`, `OPENBLAS_NUM_THREADS`, `MKL_NUM_THREADS`,",
            "`VECLIB_MAXIMUM_THREADS`, `NUMEXPR_NUM_THREADS`: each worker's native thread budget.",
            "",
            *app,
        ]
    )


def main(argv: list[str]) -> None:
    """``python -m workers.settings [MODULE]``: the reference, with ``MODULE``'s ``Settings``
    (an app's settings module) as its second part."""
    app_settings = importlib.import_module(argv[0]).Settings if argv else None
    sys.stdout.write(reference(app_settings))


if __name__ == "__main__":
    main(sys.argv[1:])
