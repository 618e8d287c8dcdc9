"""The buffering front: the shipped nginx config run by a real nginx before a real kit server,
and the systemd units that run the kit on a bare VM.

nginx is Debian's (``apt-get install nginx``), started by ``harness/nginx.py`` on a free
127.0.0.1 port with its own prefix, pid, logs and temp dirs. The attack test holds idle
connections, half-sent heads and byte-a-second bodies for ``HEAVYAPP_FRONT_FULL=1`` 30 s (8 s by
default, in CI) while /healthz is probed; the same attack on the bare kit is the control that
shows the attack bites. ``HEAVYAPP_REQUIRE_NGINX=1`` (CI) turns a missing nginx into a failure.
"""

from __future__ import annotations

import configparser
import http.client
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from harness.attack import run_attack
from harness.lifecycle import Clients
from harness.nginx import (
    NGINX_CONF,
    NginxFront,
    fronting,
    lone_server_conf,
    nginx_binary,
    nginx_t,
    placeholders,
    render,
)
from harness.server import REPO, GunicornServer, free_port
from helpers import http_get, poll_until, unavailable
from workers.shared import titles

pytestmark = pytest.mark.front

FULL = os.environ.get("HEAVYAPP_FRONT_FULL") == "1"
ATTACK_SECONDS = 30.0 if FULL else 8.0
GUNICORN_TIMEOUT = 30  # gunicorn_conf.py's TIMEOUT default
GUNICORN_GRACEFUL_TIMEOUT = 30  # gunicorn_conf.py's GRACEFUL_TIMEOUT default
SYSTEMD = REPO / "deploy" / "systemd"


@pytest.fixture(scope="module")
def nginx() -> str:
    """The nginx binary, or a skip naming the fix (a failure where CI demands nginx)."""
    found = nginx_binary()
    if found is None:
        unavailable("no nginx binary (apt-get install nginx)", "HEAVYAPP_REQUIRE_NGINX")
    return found


# --------------------------------------------------------------------------- an echo upstream


class EchoUpstream:
    """A tiny real HTTP server on loopback that answers every request with its own headers,
    and records each request with the upstream connection (peer port) it came on."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # closes after each answer, as a sync worker does

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                record = {
                    "method": self.command,
                    "path": self.path,
                    "peer_port": self.client_address[1],
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body.decode(errors="replace"),
                }
                seen.append(record)
                out = json.dumps(record).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> EchoUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def echo_front(nginx: str) -> Iterator[tuple[NginxFront, EchoUpstream]]:
    with EchoUpstream() as echo, fronting(f"127.0.0.1:{echo.port}") as front:
        yield front, echo


# --------------------------------------------------------------------------- the config itself


def directives(text: str) -> list[tuple[int, str]]:
    """(line number, directive text) of every non-comment line, comments stripped."""
    out = []
    for i, line in enumerate(text.splitlines()):
        code = line.split("#", 1)[0].strip()
        if code and code not in {"}"}:
            out.append((i, code))
    return out


def test_shipped_config_passes_nginx_t(nginx: str) -> None:
    proc = nginx_t(binary=nginx)
    assert proc.returncode == 0, proc.stderr
    assert "test is successful" in proc.stderr


def test_nginx_t_really_checks(nginx: str, tmp_path: Path) -> None:
    """The same check refuses the shipped file with a directive misspelt."""
    broken = tmp_path / "heavyapp.conf"
    broken.write_text(NGINX_CONF.read_text().replace("send_timeout", "sendd_timeout"))
    proc = nginx_t(broken, binary=nginx)
    assert proc.returncode != 0
    assert "sendd_timeout" in proc.stderr


def test_config_says_what_the_front_must_do() -> None:
    text = NGINX_CONF.read_text()
    found = {code.split()[0]: code for _, code in directives(text)}
    assert found["proxy_request_buffering"] == "proxy_request_buffering on;"
    assert found["proxy_buffering"] == "proxy_buffering on;"
    assert found["client_max_body_size"] == "client_max_body_size 1m;"
    for name in ("client_header_timeout", "client_body_timeout", "send_timeout"):
        assert name in found, name
    assert 'proxy_set_header X-Request-Start "t=${msec}";' in text
    assert "proxy_set_header X-Forwarded-For" in text
    assert "proxy_set_header X-Forwarded-Proto $scheme;" in text
    assert found["proxy_next_upstream"] == "proxy_next_upstream error timeout;"
    assert found["proxy_next_upstream_tries"] == "proxy_next_upstream_tries 2;"
    servers = [c for _, c in directives(text) if c.startswith("server ${")]
    assert servers == [
        "server ${HEAVYAPP_UPSTREAM} max_fails=0;",
        "server ${HEAVYAPP_UPSTREAM} max_fails=0 backup;",
    ], "two tries of the one pool: a lone server is never retried"
    for status in (502, 503, 504, 413):
        assert f"error_page {status} @heavyapp_{status};" in text
        assert re.search(rf"return {status} '{{\"error\": ", text), status
    assert "proxy_intercept_errors" not in " ".join(c for _, c in directives(text)), (
        "the app's own errors pass as written"
    )
    assert "$upstream_status" in text and "access_log /var/log/nginx/access.log heavyapp;" in text
    assert "non_idempotent" not in " ".join(code for _, code in directives(text))
    read_timeout = re.fullmatch(r"proxy_read_timeout (\d+)s;", found["proxy_read_timeout"])
    assert read_timeout and int(read_timeout.group(1)) > GUNICORN_TIMEOUT
    upstream = text[text.index("upstream heavyapp_gunicorn") : text.index("server {")]
    assert not [c for _, c in directives(upstream) if c.startswith("keepalive")], (
        "no upstream keepalive: sync workers close after each request"
    )
    assert int(re.search(r"keepalive_timeout (\d+)s;", text).group(1)) > 0  # kept to clients


def test_every_directive_has_a_comment_saying_why() -> None:
    lines = NGINX_CONF.read_text().splitlines()
    missing = []
    for i, code in directives("\n".join(lines)):
        if code.endswith("{") or code.startswith("proxy_pass"):
            continue  # blocks and the proxy_pass itself are explained by the file's header
        above = lines[i - 1].strip() if i else ""
        if not above.startswith("#") and "#" not in lines[i]:
            missing.append(f"line {i + 1}: {code}")
    assert not missing, "directives without a comment:\n" + "\n".join(missing)


def test_the_image_template_is_the_shipped_file() -> None:
    """One copy: the official image's template is a symlink to heavyapp.conf."""
    template = REPO / "deploy" / "nginx" / "templates" / "default.conf.template"
    assert template.is_symlink()
    assert template.resolve() == NGINX_CONF.resolve()
    assert placeholders(NGINX_CONF.read_text()) == {"HEAVYAPP_LISTEN", "HEAVYAPP_UPSTREAM"}
    with pytest.raises(KeyError, match="HEAVYAPP_UPSTREAM"):
        render(NGINX_CONF.read_text(), {"HEAVYAPP_LISTEN": "80"})


@pytest.mark.skipif(shutil.which("perl") is None, reason="perl (Debian's perl-base) not found")
def test_official_image_renders_it_like_the_harness() -> None:
    """The substitution the official image's 20-envsubst-on-templates.sh runs (perl, only
    defined names matching NGINX_ENVSUBST_FILTER) gives exactly the harness's rendering, and
    leaves every nginx variable ($msec, $scheme, ...) alone."""
    values = {"HEAVYAPP_LISTEN": "80", "HEAVYAPP_UPSTREAM": "app:8000"}
    env = {"PATH": os.environ["PATH"], "NGINX_ENVSUBST_FILTER": "HEAVYAPP_", **values}
    expr = r"s|\$(\{)?($ENV{NGINX_ENVSUBST_FILTER}\w*)(?(1)\})|$ENV{$2} // $&|ge"
    proc = subprocess.run(
        ["perl", "-pe", expr],
        input=NGINX_CONF.read_text(),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert proc.stdout == render(NGINX_CONF.read_text(), values)
    assert '"t=${msec}"' in proc.stdout and "server app:8000 " in proc.stdout


# --------------------------------------------------------------------------- what nginx does


def test_kit_behind_nginx_answers_with_worker_pids(nginx: str, server: GunicornServer) -> None:
    workers = set(server.worker_pids())
    with fronting(server) as front:
        for path in ("/healthz", "/heavy?n=1000"):
            status, body, headers = http_get(front.url + path)
            assert status == 200, (path, body)
            assert int(headers["X-Worker-Pid"]) in workers, path
            assert body["pid"] == int(headers["X-Worker-Pid"])
        # Keep-alive to the client, one upstream connection per request (HTTP/1.0 upstream).
        conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
        try:
            socks = []
            for _ in range(3):
                conn.request("GET", "/healthz")
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 200
                assert resp.getheader("Connection") == "keep-alive"
                socks.append(conn.sock)
            assert socks[0] is socks[1] is socks[2], "the client connection was kept"
        finally:
            conn.close()
        lines = server.wait_for_log(r'"GET /healthz HTTP/1\.0" 200', count=4)
        assert len(lines) >= 4


def test_nginx_adds_request_start_and_forwarding_headers(echo_front) -> None:
    front, echo = echo_front
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
    try:
        stamps = []
        for _ in range(3):
            before = time.time()
            conn.request(
                "GET",
                "/echo",
                headers={"X-Forwarded-For": "6.6.6.6", "X-Request-Start": "t=1.000"},
            )
            resp = conn.getresponse()
            got = json.loads(resp.read())
            after = time.time()
            assert resp.status == 200
            stamp = re.fullmatch(r"t=(\d+\.\d{3})", got["headers"]["x-request-start"])
            assert stamp, got["headers"]["x-request-start"]
            assert before - 0.002 <= float(stamp.group(1)) <= after + 0.002
            stamps.append(float(stamp.group(1)))
            assert got["headers"]["x-forwarded-for"] == "127.0.0.1", "a forged chain is replaced"
            assert got["headers"]["x-forwarded-proto"] == "http"
            assert got["headers"]["connection"] == "close"
    finally:
        conn.close()
    assert stamps == sorted(stamps)
    ports = [r["peer_port"] for r in echo.seen if r["path"] == "/echo"]
    assert len(ports) == 3 and len(set(ports)) == 3, "one upstream connection per request"


def posts(echo: EchoUpstream) -> list[dict]:
    return [r for r in echo.seen if r["method"] == "POST"]


def test_nginx_buffers_the_request_body(echo_front) -> None:
    """Half a body reaches nobody; the whole body reaches the upstream in one piece."""
    front, echo = echo_front
    with socket.create_connection(("127.0.0.1", front.port), timeout=10) as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        deadline = time.monotonic() + 1.0  # proving an absence: watch it for a bounded second
        while time.monotonic() < deadline:
            assert not posts(echo), "nginx passed on a request whose body is not complete"
            time.sleep(0.05)
        sock.sendall(b"world")
        poll_until(lambda: posts(echo), 5, "the buffered request upstream")
        assert [r["body"] for r in posts(echo)] == ["helloworld"]
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")


def post_with_length(port: int, length: int, send_body: bool) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/heavy")
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Content-Length", str(length))
    conn.endheaders()
    if send_body:
        conn.send(b"x" * length)
    resp = conn.getresponse()
    resp.body = resp.read()
    conn.close()
    return resp


def test_body_above_client_max_body_size_gets_413_from_nginx(
    nginx: str, server: GunicornServer
) -> None:
    with fronting(server) as front:
        at_limit = post_with_length(front.port, 1024 * 1024, send_body=True)
        assert at_limit.status == 415, "1 MiB passes nginx; the app refuses a body not JSON"
        assert at_limit.getheader("X-Worker-Pid"), "it reached a worker"
        over = post_with_length(front.port, 1024 * 1024 + 1, send_body=False)
        assert over.status == 413
        assert over.getheader("X-Worker-Pid") is None, "refused by nginx, not the kit"
        assert over.getheader("Content-Type") == "application/json"
        assert "Payload Too Large" in json.loads(over.body)["error"], "the app's shape, not HTML"
    posts = [line for line in server.log_text().splitlines() if '"POST /heavy' in line]
    assert len(posts) == 1, posts


# --------------------------------------------------------------------------- worker deaths


class DyingUpstream:
    """A loopback upstream whose every request but /healthz (nginx's start-up check) dies: after
    reading the request head, it resets the connection (``before`` any answer) or after half an
    answer (``midway``); keeps
    the request line of each connection, i.e. how many times nginx sent each request."""

    def __init__(self, when: str) -> None:
        self.when = when
        self.requests: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data and (chunk := conn.recv(4096)):
                    data += chunk
                line = data.split(b"\r\n", 1)[0].decode()
                self.requests.append(line)
                if "/healthz" in line:
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    continue
                if self.when == "midway":
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 100\r\n\r\npartial")
                    time.sleep(0.1)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def __enter__(self) -> DyingUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()


@pytest.mark.parametrize(
    ("method", "when", "backup", "sent"),
    [
        ("GET", "before", True, 2),
        ("POST", "before", True, 1),
        ("GET", "midway", True, 1),
        ("GET", "before", False, 1),  # a lone server: nginx never retries it
    ],
)
def test_nginx_resends_only_a_get_that_got_no_answer(
    nginx: str, tmp_path: Path, method: str, when: str, backup: bool, sent: int
) -> None:
    """A GET whose upstream died before answering is sent once more (the backup entry), a POST
    never; nor anything once part of an answer went back. nginx's 502 is the app's JSON."""
    conf = NGINX_CONF if backup else lone_server_conf(tmp_path)
    with (
        DyingUpstream(when) as upstream,
        fronting(f"127.0.0.1:{upstream.port}", conf=conf) as front,
    ):
        conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
        try:
            conn.request(method, "/heavy", body=b"{}" if method == "POST" else None)
            resp = conn.getresponse()
            if when == "midway":
                assert resp.status == 200
                with pytest.raises(http.client.IncompleteRead):
                    resp.read()
            else:
                assert resp.status == 502
                assert resp.getheader("Content-Type") == "application/json"
                assert "Bad Gateway" in json.loads(resp.read())["error"]
        finally:
            conn.close()
        assert upstream.requests.count(f"{method} /heavy HTTP/1.0") == sent, upstream.requests
        line = poll_until(
            lambda: [x for x in front.access_log().splitlines() if "/heavy" in x],
            5,
            "the access line",
        )[0]
        assert line.count(f"127.0.0.1:{upstream.port}") == sent, line


KILLS = 8
LONG_QUEUE = {"HEAVYAPP_QUEUE_TIMEOUT": "10"}


def test_a_kill_storm_behind_nginx_costs_no_get(nginx: str, start_server) -> None:
    """8 SIGKILLs of busy workers under 8 GET clients: every GET answered 200, the retries in
    nginx's access line and counted by the kit; then a POST that dies with its worker gets a
    JSON 502 and is not sent again. A long queue timeout keeps the queue gate's 503s (their own
    tests are in test_overload.py) out of a count that is about retries, on a loaded machine
    too, where a pool short of a worker queues for longer."""
    server = start_server(workers=2, env=LONG_QUEUE)
    with fronting(server) as front:
        clients = Clients(front.port, "/heavy?n=1000000", 8, until_refused=False).start()
        try:
            poll_until(lambda: clients.tally.answered >= 8, 30, "the clients being served")
            killed: set[int] = set()
            for kill in range(KILLS):  # 8 clients on 2 workers: both are always mid-request
                pids = server.wait_for_workers(2, timeout=10, exclude=killed)
                before = clients.progress()
                os.kill(pids[kill % 2], signal.SIGKILL)
                killed.add(pids[kill % 2])
                # Kill again only once the request killed (and its retry) is over: one retry
                # is the bound, so a request that died twice would be a 502 by design.
                poll_until(lambda b=before: clients.past(b), 30, "every client past the kill")
            server.wait_for_workers(2, timeout=10, exclude=killed)
        finally:
            tally = clients.stop()
        assert tally.lost == [] and tally.timed_out == 0, tally.summary()
        assert set(tally.statuses) == {200}, tally.summary()
        retried = [x for x in front.access_log().splitlines() if "ustatus=502, 200" in x]
        assert 1 <= len(retried) <= KILLS, "\n".join(retried)
        print(json.dumps({"kill storm": tally.summary(), "retried": len(retried)}))

        interrupted = poll_until(lambda: interrupted_gets(front), 10, "the kit's count")
        assert 1 <= interrupted <= KILLS

        # After the storm replacements may still sit out a crash-loop delay or load the app
        # (CPU that busy() would take for the POST's): wait until the pool is up and idle.
        pids = poll_until(lambda: idle_pool(server), 40, "the pool up and idle", every=0.2)
        conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30)
        try:
            conn.request(
                "POST",
                "/heavy",
                body=b'{"n": 50000000}',
                headers={"Content-Type": "application/json"},
            )
            os.kill(busy(pids), signal.SIGKILL)
            resp = conn.getresponse()
            body = json.loads(resp.read())
        finally:
            conn.close()
    assert resp.status == 502 and "Bad Gateway" in body["error"], body
    assert '"POST /heavy' not in server.log_text(), "the POST was never sent again"


def idle_pool(server: GunicornServer) -> list[int] | None:
    """The 2 workers' pids once none sits out a crash-loop delay and none used CPU for 0.3 s."""
    pids = server.worker_pids()
    if len(pids) != 2 or any(titles.parse(titles.read(p))["waiting"] for p in pids):
        return None
    workers = [psutil.Process(pid) for pid in pids]
    start = [w.cpu_times().user + w.cpu_times().system for w in workers]
    time.sleep(0.3)
    used = [
        w.cpu_times().user + w.cpu_times().system - s for w, s in zip(workers, start, strict=True)
    ]
    return pids if max(used) < 0.02 else None


def busy(pids: list[int]) -> int:
    """The worker among ``pids`` burning CPU (serving the one request in flight)."""
    workers = [psutil.Process(pid) for pid in pids]
    start = [w.cpu_times().user for w in workers]

    def burning() -> int | None:
        for worker, before in zip(workers, start, strict=True):
            if worker.cpu_times().user - before > 0.1:
                return worker.pid
        return None

    return poll_until(burning, 10, "a worker serving the request", every=0.01)


def interrupted_gets(front: NginxFront) -> float:
    """The kit's count of GETs in flight at a worker's death, from /metrics (through nginx)."""
    text = urllib.request.urlopen(front.url + "/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith('heavyapp_requests_interrupted_total{method="GET"}'):
            return float(line.split()[-1])
    return 0.0


# --------------------------------------------------------------------------- the attack


def attack_report(name: str, result, before: list[int], after: list[int]) -> str:
    summary = {"target": name, **result.summary(), "before": before, "after": after}
    print(json.dumps(summary))
    return json.dumps(summary)


def test_slow_and_idle_clients_do_not_reach_the_kit_behind_nginx(
    nginx: str, server: GunicornServer
) -> None:
    before = server.worker_pids()
    with fronting(server) as front:
        result = run_attack("127.0.0.1", front.port, ATTACK_SECONDS)
    after = server.worker_pids()
    report = attack_report("kit behind nginx", result, before, after)
    assert result.opened >= 258, "the attack was in place"
    assert result.probes >= ATTACK_SECONDS / 0.2 * 0.8, report
    assert result.failures == 0, report
    assert result.p99_ms < 1000, report
    assert after == before, "no worker lost or replaced"
    assert '"POST /heavy' not in server.log_text(), "no slow body reached Gunicorn"


def test_the_same_attack_starves_the_bare_kit(server: GunicornServer) -> None:
    """The control: without nginx the attack holds the sync workers and /healthz starves,
    so the test above passes because of the front, not because the attack is weak."""
    before = server.worker_pids()
    result = run_attack("127.0.0.1", server.port, ATTACK_SECONDS)
    after = server.worker_pids()
    report = attack_report("bare kit", result, before, after)
    assert result.p99_ms >= 1000, report


# --------------------------------------------------------------------------- systemd units


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read_string((SYSTEMD / name).read_text())
    return parser


def unit_environment() -> dict[str, str]:
    """The service's Environment= lines (one VAR=value each, as ours are written)."""
    text = (SYSTEMD / "heavyapp.service").read_text()
    return dict(
        line.split("=", 2)[1:] for line in text.splitlines() if line.startswith("Environment=")
    )


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip(reason="systemd-analyze not installed (Debian package systemd)")
    return found


def local_copies(tmp_path: Path, replace: dict[str, str] | None = None) -> list[Path]:
    """The units, with ExecStart and WorkingDirectory pointing at this checkout."""
    gunicorn = str(REPO / ".venv" / "bin" / "gunicorn")
    if not os.access(gunicorn, os.X_OK):
        gunicorn = shutil.which("gunicorn") or gunicorn
    out = []
    for path in sorted(SYSTEMD.glob("heavyapp.*")):
        text = path.read_text()
        text = text.replace("/opt/heavyapp/.venv/bin/gunicorn", gunicorn)
        text = text.replace("WorkingDirectory=/opt/heavyapp", f"WorkingDirectory={REPO}")
        for old, new in (replace or {}).items():
            text = text.replace(old, new)
        copy = tmp_path / path.name
        copy.write_text(text)
        out.append(copy)
    return out


def verify(tool: str, units: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, "verify", *map(str, units)], capture_output=True, text=True, timeout=60
    )


def test_systemd_units_verify(tmp_path: Path) -> None:
    tool = systemd_analyze()
    proc = verify(tool, local_copies(tmp_path))
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stderr


def test_systemd_verify_really_checks(tmp_path: Path) -> None:
    """A bad value is only a warning to systemd-analyze (exit 0): hence "no output" above."""
    tool = systemd_analyze()
    proc = verify(tool, local_copies(tmp_path, {"KillMode=mixed": "KillMode=mixd"}))
    assert "mixd" in proc.stderr


def test_systemd_service_hardening_and_stop_policy(tmp_path: Path) -> None:
    service = unit("heavyapp.service")["Service"]
    env = unit_environment()
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["KillMode"] == "mixed"
    graceful = int(env.get("GRACEFUL_TIMEOUT", GUNICORN_GRACEFUL_TIMEOUT))
    assert int(service["TimeoutStopSec"]) > graceful
    assert service["User"] not in ("root", "0") and service["Group"] not in ("root", "0")
    assert service["NoNewPrivileges"] == "true"
    assert service["ProtectSystem"] == "strict"
    assert service["Restart"] in ("on-failure", "always")
    assert env["HEAVYAPP_RUN_DIR"] == f"/run/{service['RuntimeDirectory']}"
    assert service["ExecStart"].endswith("gunicorn -c gunicorn_conf.py heavyapp:app")
    socket_unit = unit("heavyapp.socket")["Socket"]
    assert socket_unit["ListenStream"].startswith("127.0.0.1:"), "loopback: nginx in front"
    assert "heavyapp.socket" in unit("heavyapp.service")["Unit"]["Requires"]
    tool = systemd_analyze()
    units = local_copies(tmp_path)
    proc = subprocess.run(
        [tool, "security", "--offline=yes", str(units[0])],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    score = re.search(r"Overall exposure level for \S+: ([\d.]+)", proc.stdout + proc.stderr)
    assert score, proc.stdout + proc.stderr
    assert float(score.group(1)) < 5.0, "exposure at most 'OK' (systemd's scale, 0-10)"


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate not installed (Debian package systemd)",
)
def test_socket_activation_serves_with_the_units_settings() -> None:
    """The units' way of starting: systemd holds the socket, Gunicorn inherits it (LISTEN_FDS).

    systemd-socket-activate does what heavyapp.socket does: listen, and on the first
    connection exec the service's command with the socket as fd 3.
    """
    service = unit("heavyapp.service")["Service"]
    port = free_port()
    server = GunicornServer(port=port)
    env = {
        **unit_environment(),
        "HEAVYAPP_RUN_DIR": str(server.run_dir),  # the test's own, for /run/heavyapp
        "WEB_CONCURRENCY": "2",
        "PATH": os.environ["PATH"],
    }
    argv = service["ExecStart"].split()
    argv[0] = str(Path(server.command[0]))  # the venv's gunicorn for /opt/heavyapp/.venv's
    server.command = [
        shutil.which("systemd-socket-activate") or "systemd-socket-activate",
        "-l",
        f"127.0.0.1:{port}",
        *[f"-E{k}={v}" for k, v in env.items()],
        *argv,
    ]
    try:
        server.start()
        status, _, headers = http_get(f"{server.url}/healthz")
        assert status == 200
        assert int(headers["X-Worker-Pid"]) in server.worker_pids()
        assert len(server.worker_pids()) == 2
        assert server.wait_for_log(rf"Listening at: http://127\.0\.0\.1:{port} ")
        assert server.stop() == 0, server.tail()
    finally:
        server.cleanup()
