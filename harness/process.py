"""A server the harness runs as its own child on a 127.0.0.1 port: started, waited for until it
answers, and stopped by the pid it was started with, never by name. ``GunicornServer`` and
``NginxFront`` are built on it, and tests/test_alerts.py's Prometheus."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import psutil


def port_is_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChildServer:
    """The lifecycle both servers share; a subclass says what it runs and when it is ready.

    ``directory`` is the child's own (made by ``mkdtemp``, removed by ``cleanup``); ``output``
    gets its stdout and stderr.
    """

    #: What start and stop failures raise; the message carries ``tail()``.
    Error: type[RuntimeError] = RuntimeError
    #: The word for the child in those messages.
    what = "server"
    #: The graceful stop, and how long it may take before the child and its children are
    #: SIGKILLed.
    stop_signal: int = signal.SIGTERM
    stop_timeout = 40.0

    def __init__(self, port: int, directory: Path, output: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.directory = directory
        self.output = output
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    def ready(self) -> bool:
        """The child serves (polled during ``start``)."""
        raise NotImplementedError

    def log_text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def launch(
        self,
        command: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str] | None,
        timeout: float,
        give_up: int,
    ) -> None:
        """Start ``command`` and poll until ``ready()``; one that exits or is not ready within
        ``timeout`` raises, stopped first with the ``give_up`` signal."""
        if port_is_taken(self.port):
            raise self.Error(f"port {self.port} on 127.0.0.1 is already taken")
        self._out = open(self.output, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=self._out, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.Error(f"{self.what} exited with {self.proc.returncode}:\n{self.tail()}")
            if self.ready():
                return
            time.sleep(0.05)
        self.stop(give_up)
        raise self.Error(f"{self.what} not ready within {timeout}s:\n{self.tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, sig: int | None = None, timeout: float | None = None) -> int | None:
        """Signal the child we started (only it: ``stop_signal`` unless told) and wait; if it
        outlives ``timeout``, SIGKILL it and its children, by pid. Its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal if sig is None else sig)
            try:
                self.proc.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.kill_tree()
                self.proc.wait(5)
        if self._out:
            self._out.close()
        return self.proc.returncode

    def kill_tree(self) -> None:
        """Last resort: SIGKILL the child and the processes it started, by pid."""
        try:
            family = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        for p in [*family, psutil.Process(self.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()

    def cleanup(self) -> None:
        """Stop the child if it still runs and delete its directory.

        Apart from ``stop()`` because callers read the logs after stopping.
        """
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
