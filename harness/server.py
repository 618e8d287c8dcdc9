"""The one server harness: start a real Gunicorn master as the README does, wait until it serves,
stop it by pid. Used by the tests, the benchmarks and the experiment, so all of them measure the
same server; not shipped in the wheel or the image.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil

from harness.process import ChildServer, free_port
from workers.shared import titles

REPO = Path(__file__).resolve().parent.parent
SERVER_COMMAND = ["-c", "gunicorn_conf.py", "heavyapp:app"]
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))


class ServerError(RuntimeError):
    """The server did not start (or stop) as asked; the message carries its log's tail."""


def stock_gunicorn(port: int, workers: int) -> list[str]:
    """Gunicorn with none of the kit: no config file, the stock sync worker (the peer the
    benchmarks and the experiment measure the kit against)."""
    return [GUNICORN, "-w", str(workers), "-b", f"127.0.0.1:{port}", "heavyapp:app"]


class GunicornServer(ChildServer):
    """One ``gunicorn -c gunicorn_conf.py heavyapp:app`` on 127.0.0.1 with its own run directory."""

    Error = ServerError

    def __init__(
        self,
        *,
        workers: int | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        log_dir: Path | None = None,
        command: list[str] | None = None,
    ) -> None:
        run_dir = Path(tempfile.mkdtemp(prefix="heavyapp-", dir="/tmp"))
        super().__init__(port or free_port(), run_dir, (log_dir or run_dir) / "server.log")
        self.env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "HEAVYAPP_RUN_DIR": str(run_dir),
            **(env or {}),
        }
        self.env.pop("BIND", None)
        if workers is not None:
            self.env["WEB_CONCURRENCY"] = str(workers)
        self.command = command or [GUNICORN, *SERVER_COMMAND, *(args or [])]

    @property
    def run_dir(self) -> Path:
        return self.directory

    @property
    def log_path(self) -> Path:
        return self.output

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> GunicornServer:
        self.launch(self.command, cwd=REPO, env=self.env, timeout=timeout, give_up=signal.SIGKILL)
        return self

    def ready(self) -> bool:
        return self.healthy() and len(self.worker_pids()) >= self.expected_workers()

    def expected_workers(self) -> int:
        """The pool size the master announced in its log (0 until it did)."""
        match = re.search(r"starting (\d+) workers", self.log_text())
        return int(match.group(1)) if match else 1

    def __enter__(self) -> GunicornServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- looking at it -----------------------------------------------------------------------

    @property
    def master_pid(self) -> int:
        return self.pid

    def worker_pids(self) -> list[int]:
        """Pids of the master's live children that are workers (by their process title)."""
        try:
            children = psutil.Process(self.master_pid).children()
        except psutil.NoSuchProcess:
            return []
        pids = []
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    pids.append(child.pid)
            except psutil.NoSuchProcess:
                continue
        return sorted(pids)

    def worker_titles(self) -> dict[int, str]:
        """Worker pid -> its process title, as ``ps -eo pid,args`` shows it."""
        found = {pid: titles.read(pid) for pid in self.worker_pids()}
        return {pid: title for pid, title in found.items() if title}

    def worker_ids(self) -> dict[int, int]:
        """Worker pid -> worker id, read from the process titles."""
        found = {pid: titles.parse(title)["id"] for pid, title in self.worker_titles().items()}
        return {pid: wid for pid, wid in found.items() if wid is not None}

    def wait_for_ids(self, ids: set[int], timeout: float = 10.0) -> dict[int, int]:
        """Poll until the live workers carry exactly ``ids``, one each; pid -> id."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.worker_ids()
            live = self.worker_pids()
            if sorted(found.values()) == sorted(ids) and len(live) == len(ids):
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"wanted ids {sorted(ids)}, have {found} (workers {live})")
            time.sleep(0.02)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait_for_log(self, pattern: str, timeout: float = 10.0, count: int = 1) -> list[str]:
        """Poll the log until ``pattern`` (a regex) matched ``count`` lines; return those lines."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.log_text().splitlines() if regex.search(line)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{pattern!r} matched {len(found)}/{count} lines within {timeout}s:\n"
                    + self.tail()
                )
            time.sleep(0.05)

    def wait_for_workers(
        self, n: int, timeout: float = 10.0, exclude: set[int] = frozenset()
    ) -> list[int]:
        """Poll until exactly ``n`` live workers, none of them in ``exclude``; their pids."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.worker_pids()
            if len(pids) == n and not set(pids) & set(exclude):
                return pids
            if time.monotonic() > deadline:
                raise AssertionError(f"wanted {n} workers (not {sorted(exclude)}), have {pids}")
            time.sleep(0.02)


@contextlib.contextmanager
def serving(server: GunicornServer) -> Iterator[GunicornServer]:
    """Start ``server`` for the ``with`` block; on the way out, whatever happened, stop it and
    remove its run directory."""
    try:
        yield server.start()
    finally:
        server.cleanup()
