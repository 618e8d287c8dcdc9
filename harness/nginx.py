"""Start a real nginx in front of a real server, with the shipped config, and stop it by pid.

The tests and ``harness.attack`` put Debian's ``/usr/sbin/nginx`` in front of a
``GunicornServer`` (or any loopback HTTP server) exactly as production does: the one shipped file,
``deploy/nginx/heavyapp.conf``, rendered with this run's ports and included in a small http{}
of our own. Everything nginx writes (pid, logs, temp files) lives in a private temporary
directory; /etc/nginx and the system's nginx are never touched.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import psutil

from harness.process import ChildServer, free_port
from harness.server import REPO, GunicornServer

NGINX_CONF = REPO / "deploy" / "nginx" / "heavyapp.conf"
NGINX_BINARY = "/usr/sbin/nginx"
#: Where the shipped file writes its access lines (Debian's, and the official image's stdout).
SHIPPED_ACCESS_LOG = "/var/log/nginx/access.log"
# The only names the shipped file may leave for the renderer (the official image's
# NGINX_ENVSUBST_FILTER does the same): every other "$name" is an nginx variable.
PLACEHOLDER = re.compile(r"\$\{(HEAVYAPP_\w+)\}|\$(HEAVYAPP_\w+)")

# Our http{} around the shipped file: what the official image's nginx.conf or Debian's provides,
# with every path in the run's own directory. Logged at "info" so a refused connection says why.
WRAPPER = """\
# written by harness/nginx.py for one test run; the server itself is the shipped file below
{user}worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{
    worker_connections 1024;
}}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/heavyapp.conf;
}}
"""


class NginxError(RuntimeError):
    """nginx refused the config or did not start (or stop); the message carries its error log."""


def nginx_binary() -> str | None:
    """Debian's nginx if installed (``apt-get install nginx``), else one on PATH, else None."""
    if os.access(NGINX_BINARY, os.X_OK):
        return NGINX_BINARY
    return shutil.which("nginx")


def render(template: str, values: Mapping[str, str]) -> str:
    """The shipped config with its ``HEAVYAPP_*`` placeholders filled, as envsubst would.

    Fails on a placeholder without a value: an empty ``listen`` or ``server`` would otherwise
    surface as a puzzling nginx error (or, worse, a valid but different config).
    """

    def fill(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for ${{{name}}} in {NGINX_CONF.name}")
        return values[name]

    return PLACEHOLDER.sub(fill, template)


def lone_server_conf(directory: Path) -> Path:
    """The shipped file without its backup entry, written to ``directory``: one ``server``, as
    the file was before the retry (nginx never retries a lone server), for the contrast."""
    lines = NGINX_CONF.read_text().splitlines()
    conf = directory / "lone-server.conf"
    conf.write_text("\n".join(line for line in lines if " backup;" not in line) + "\n")
    return conf


def placeholders(template: str) -> set[str]:
    """The ``HEAVYAPP_*`` names the template needs."""
    return {a or b for a, b in PLACEHOLDER.findall(template)}


class NginxFront(ChildServer):
    """``nginx -g 'daemon off;'`` on 127.0.0.1:<free port>, proxying to ``upstream``.

    ``upstream`` is a started ``GunicornServer`` or a ``host:port`` string (a test's own tiny
    HTTP server). Only the nginx master we started, and its own workers, are ever signalled:
    SIGQUIT, nginx's graceful stop, then SIGKILL by pid if it does not exit in time.
    """

    Error = NginxError
    what = "nginx"
    stop_signal = signal.SIGQUIT
    stop_timeout = 10.0

    def __init__(
        self,
        upstream: GunicornServer | str,
        *,
        port: int | None = None,
        workers: int = 1,
        conf: Path = NGINX_CONF,
        binary: str | None = None,
    ) -> None:
        found = binary or nginx_binary()
        if found is None:
            raise NginxError("no nginx binary (apt-get install nginx)")
        self.binary = found
        self.upstream = (
            f"127.0.0.1:{upstream.port}" if isinstance(upstream, GunicornServer) else upstream
        )
        tmp = Path(tempfile.mkdtemp(prefix="heavyapp-nginx-", dir="/tmp"))
        super().__init__(port or free_port(), tmp, tmp / "stdout.log")
        self.workers = workers
        # nginx's workers drop to "nobody" when the master is root: they must reach the temp
        # directories under here (nginx creates and chowns those itself).
        self.tmp.chmod(0o711)
        self.conf_path = self.tmp / "nginx.conf"
        self.rendered = render(
            conf.read_text(),
            {"HEAVYAPP_LISTEN": f"127.0.0.1:{self.port}", "HEAVYAPP_UPSTREAM": self.upstream},
        )
        # The shipped file's access log, moved into this run's directory like everything else.
        sandboxed = self.rendered.replace(SHIPPED_ACCESS_LOG, str(self.tmp / "access.log"))
        (self.tmp / "heavyapp.conf").write_text(sandboxed)
        user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
        self.conf_path.write_text(WRAPPER.format(user=user, workers=workers, tmp=self.tmp))

    @property
    def tmp(self) -> Path:
        return self.directory

    def command(self, *extra: str) -> list[str]:
        """nginx with our prefix, config and error log: nothing falls back to /etc or /var."""
        return [
            self.binary,
            "-p",
            f"{self.tmp}/",
            "-c",
            str(self.conf_path),
            "-e",
            str(self.tmp / "error.log"),
            *extra,
        ]

    def check_config(self) -> subprocess.CompletedProcess[str]:
        """``nginx -t`` on the rendered config (exit 0 and "test is successful" when accepted)."""
        return subprocess.run(
            self.command("-t"), capture_output=True, text=True, timeout=30, cwd=self.tmp
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> NginxFront:
        command = self.command("-g", "daemon off;")
        self.launch(command, cwd=self.tmp, env=None, timeout=timeout, give_up=signal.SIGQUIT)
        return self

    def ready(self) -> bool:
        return self.answers()

    def answers(self) -> bool:
        """nginx answered an HTTP request (any status: the upstream may still be starting)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            return True
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def worker_pids(self) -> list[int]:
        """nginx's own worker processes (children of the master we started)."""
        try:
            return sorted(p.pid for p in psutil.Process(self.pid).children())
        except psutil.NoSuchProcess:
            return []

    def __enter__(self) -> NginxFront:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- looking at it -----------------------------------------------------------------------

    def error_log(self) -> str:
        path = self.tmp / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> str:
        path = self.tmp / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_text(self) -> str:
        """The error log, then what nginx wrote to its stdout and stderr."""
        return self.error_log() + super().log_text()


def nginx_t(conf: Path = NGINX_CONF, binary: str | None = None) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on ``conf`` rendered for a placeholder upstream, its prefix removed after."""
    front = NginxFront("127.0.0.1:9", conf=conf, binary=binary)
    try:
        return front.check_config()
    finally:
        front.cleanup()


@contextlib.contextmanager
def fronting(upstream: GunicornServer | str, **kwargs: object) -> Iterator[NginxFront]:
    """A started ``NginxFront`` for the ``with`` block, stopped and removed whatever happens."""
    front = NginxFront(upstream, **kwargs)  # type: ignore[arg-type]
    try:
        yield front.start()
    finally:
        front.cleanup()
