"""Docker engine and base-image management for the container tests.

Kept apart from the tests so it can be run by hand too:

    python tests/dockerkit.py engine      # start dockerd if it is not running
    python tests/dockerkit.py base        # build (or reuse) the stand-in base image
    python tests/dockerkit.py build       # build the app image on that base
    python tests/dockerkit.py front       # build the front image (Debian's nginx) on that base
    python tests/dockerkit.py images      # all three: what deploy/swarm and deploy/compose.yaml run
    python tests/dockerkit.py stop        # stop a dockerd this module started

Why a stand-in base: there is no image registry on the CI machine, so
``FROM python:3.12-slim`` cannot be pulled.  We build an equivalent Debian
bookworm image with debootstrap (python3, pip, venv, CA certificates), carry the
host's CA bundle and pip cert setting into it (the machine reaches PyPI through
a TLS proxy with its own CA), ``docker import`` it and pass it to the build via
``--build-arg PYTHON_IMAGE=...`` -- the Dockerfile itself is built as a user
would build it, with only the base swapped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE_TAG = os.environ.get("HEAVYAPP_BASE_IMAGE", "heavyapp-base:bookworm")
APP_TAG = os.environ.get("HEAVYAPP_TEST_IMAGE", "heavyapp:test")
FRONT_TAG = os.environ.get("HEAVYAPP_FRONT_TEST_IMAGE", "heavyapp-front:test")
FRONT_DOCKERFILE = REPO / "deploy" / "nginx" / "Dockerfile"
PROMETHEUS_TAG = os.environ.get("HEAVYAPP_PROMETHEUS_TEST_IMAGE", "heavyapp-prometheus:test")
PROMETHEUS_DIR = REPO / "deploy" / "swarm" / "prometheus"
NGINX_CONF = REPO / "deploy" / "nginx" / "heavyapp.conf"
# Docker's embedded DNS server, in every container on a user-defined or overlay network.
DOCKER_DNS = "127.0.0.11"
# How long the front trusts an answer from it: the longest a task that left stays in rotation
# (the app's drain window must cover it) and the longest a new task waits for its first request.
RESOLVE_VALID = "5s"
# The front's connect timeout to a task (the shipped file's is for a server that is always there).
CONNECT_TIMEOUT = "2s"
SUITE = "bookworm"
BASE_PACKAGES = ["python3", "python3-pip", "python3-venv", "ca-certificates"]
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
STATE_DIR = Path(os.environ.get("HEAVYAPP_DOCKER_STATE", "/tmp/heavyapp-docker"))
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# bump to force a rebuild of cached base images when the recipe changes
BASE_RECIPE_VERSION = "1"


class DockerUnavailable(RuntimeError):
    """Docker cannot be used on this machine; the message says why."""


def docker_cli() -> str:
    """The Docker client to use.

    /usr/local/bin/docker (if present) has no buildx plugin, so BuildKit builds
    (``RUN --mount``) fail with it; Debian's /usr/bin/docker builds with
    DOCKER_BUILDKIT=1.
    """
    explicit = os.environ.get("HEAVYAPP_DOCKER_CLI")
    if explicit:
        return explicit
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    found = shutil.which("docker")
    if not found:
        raise DockerUnavailable("no docker client installed (apt-get install -y docker.io)")
    return found


def docker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["DOCKER_BUILDKIT"] = "1"
    return env


def docker(
    *args: str,
    check: bool = True,
    timeout: float = 120,
    capture: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess:
    cmd = [docker_cli(), *args]
    proc = subprocess.run(
        cmd,
        env=docker_env(),
        text=True,
        timeout=timeout,
        input=input,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
    )
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc


# --------------------------------------------------------------------------- engine


def engine_running() -> bool:
    try:
        return (
            docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=20).returncode
            == 0
        )
    except (DockerUnavailable, subprocess.TimeoutExpired, OSError):
        return False


def start_engine(timeout: float = 60) -> int | None:
    """Make sure a Docker engine answers.

    Returns the pid of the dockerd this call started, or None when one was
    already running.  Raises DockerUnavailable with a human reason otherwise.
    """
    docker_cli()  # raises when there is no client at all
    if engine_running():
        return None
    dockerd = shutil.which("dockerd") or (
        "/usr/sbin/dockerd" if Path("/usr/sbin/dockerd").exists() else None
    )
    if not dockerd:
        raise DockerUnavailable("dockerd is not installed (apt-get install -y docker.io)")
    if os.geteuid() != 0:
        raise DockerUnavailable("no Docker engine is running and starting dockerd needs root")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / "dockerd.log", "ab") as log:  # the child keeps its own copy of the fd
        proc = subprocess.Popen(
            [dockerd],
            # Swarm tasks start from the local image: without this the engine asks the registry
            # for every task it starts (there is none here), and waits for its DNS to give up.
            env={**os.environ, "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    (STATE_DIR / "dockerd.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (STATE_DIR / "dockerd.log").read_text(errors="replace")[-2000:]
            raise DockerUnavailable(f"dockerd exited with code {proc.returncode}:\n{tail}")
        if engine_running():
            return proc.pid
        time.sleep(0.5)
    stop_engine(proc.pid)
    raise DockerUnavailable(
        f"dockerd did not answer within {timeout:.0f} s (log: {STATE_DIR}/dockerd.log)"
    )


def is_dockerd(pid: int) -> bool:
    """Whether ``pid`` is a dockerd now: a stale pidfile's pid may belong to anything since."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "dockerd"
    except OSError:
        return False


def stop_engine(pid: int, timeout: float = 30) -> None:
    """Stop a dockerd we started (by its pid only, and only if it still is a dockerd)."""
    if is_dockerd(pid):
        _terminate(pid, timeout)
    pidfile = STATE_DIR / "dockerd.pid"
    if pidfile.exists() and pidfile.read_text().strip() == str(pid):
        pidfile.unlink()


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # reap if it is our child, otherwise just probe
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return
        except ChildProcessError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- base image


def apt_mirror() -> str:
    """The Debian mirror apt already uses for the main suite (one-line or deb822 sources)."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.split()
                if SUITE in fields.get("suites", []) and "main" in fields.get("components", []):
                    return fields["uris"][0]
        else:
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)", line)
                if m and m.group(2) == SUITE and "main" in m.group(3).split():
                    return m.group(1)
    return DEFAULT_MIRROR


def host_pip_index_lines() -> list[str]:
    """Index settings from the host's pip config that a container can use too.

    file:// indexes and find-links point at the host's disk and are dropped;
    http(s) index-url / extra-index-url / trusted-host are carried over.
    """
    lines: list[str] = []
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            text=True,
            capture_output=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return lines
    for line in out.splitlines():
        m = re.match(r"[^.]+\.(index-url|extra-index-url|trusted-host)='(.*)'$", line.strip())
        if not m:
            continue
        key, value = m.groups()
        values = [v for v in value.split() if not v.startswith("file:")]
        if values:
            lines.append(f"{key} = {' '.join(values)}")
    return lines


def base_recipe() -> str:
    ca = HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.exists() else b""
    h = hashlib.sha256()
    h.update(BASE_RECIPE_VERSION.encode())
    h.update(" ".join(BASE_PACKAGES).encode())
    h.update(apt_mirror().encode())
    h.update("\n".join(host_pip_index_lines()).encode())
    h.update(ca)
    return h.hexdigest()[:16]


def image_label(tag: str, label: str) -> str | None:
    proc = docker(
        "image",
        "inspect",
        "--format",
        f'{{{{index .Config.Labels "{label}"}}}}',
        tag,
        check=False,
        timeout=30,
    )
    if proc.returncode != 0:
        return None
    return proc.stdout.strip()


@contextlib.contextmanager
def _lock(name: str):
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_base_image(tag: str = BASE_TAG, log=print) -> str:
    """Build the stand-in for python:3.12-slim once per machine (cached by tag + recipe label)."""
    recipe = base_recipe()
    with _lock("base"):
        if image_label(tag, "heavyapp.base.recipe") == recipe:
            return tag
        if not shutil.which("debootstrap"):
            raise DockerUnavailable("debootstrap is not installed (apt-get install -y debootstrap)")
        if os.geteuid() != 0:
            raise DockerUnavailable("building the base image with debootstrap needs root")
        mirror = apt_mirror()
        t0 = time.monotonic()
        workdir = Path(tempfile.mkdtemp(prefix="heavyapp-base-", dir="/var/tmp"))
        root = workdir / "rootfs"
        try:
            log(f"[dockerkit] debootstrap {SUITE} from {mirror} into {root}")
            subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    "--include=" + ",".join(BASE_PACKAGES),
                    SUITE,
                    str(root),
                    mirror,
                ],
                check=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=900,
            )
            _prepare_rootfs(root)
            tar = workdir / "rootfs.tar"
            subprocess.run(
                ["tar", "--numeric-owner", "-C", str(root), "-cf", str(tar), "."], check=True
            )
            changes = [
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "ENV LANG=C.UTF-8",
                f"ENV PIP_CERT={HOST_CA_BUNDLE} SSL_CERT_FILE={HOST_CA_BUNDLE}",
                f"ENV REQUESTS_CA_BUNDLE={HOST_CA_BUNDLE}",
                f"LABEL heavyapp.base.recipe={recipe}",
                "LABEL org.opencontainers.image.description=stand-in-for-python:3.12-slim",
                'CMD ["python3"]',
            ]
            args = ["import"]
            for c in changes:
                args += ["--change", c]
            docker(*args, str(tar), tag, timeout=600)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        log(f"[dockerkit] base image {tag} built in {time.monotonic() - t0:.0f} s")
        return tag


def _prepare_rootfs(root: Path) -> None:
    # the host's CA bundle (it includes the TLS proxy's CA) replaces the image's
    if HOST_CA_BUNDLE.exists():
        dest = root / str(HOST_CA_BUNDLE).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink():
            dest.unlink()
        shutil.copyfile(HOST_CA_BUNDLE, dest)
    pip_conf = ["[global]", f"cert = {HOST_CA_BUNDLE}", "disable-pip-version-check = true"]
    pip_conf += host_pip_index_lines()
    (root / "etc/pip.conf").write_text("\n".join(pip_conf) + "\n")
    # slim it down like the official slim images
    for sub in [
        "var/lib/apt/lists",
        "var/cache/apt/archives",
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "var/log",
    ]:
        p = root / sub
        if p.is_dir():
            for child in p.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        child.unlink()
    # debootstrap leaves the host's resolv.conf/hostname; docker manages these at run time
    for f in ["etc/resolv.conf", "etc/hostname"]:
        with contextlib.suppress(OSError):
            (root / f).unlink()


# --------------------------------------------------------------------------- app image


def build_app_image(tag: str = APP_TAG, base: str = BASE_TAG, log=print) -> float:
    """``docker build`` the repo's Dockerfile with only the base swapped. Returns seconds taken."""
    return _build(["--build-arg", f"PYTHON_IMAGE={base}", str(REPO)], tag, log)


# --------------------------------------------------------------------------- front image


def front_conf(template: str, app: str = "app:8000", listen: str = "8080") -> str:
    """deploy/nginx/heavyapp.conf as the front of a Compose project or swarm stack runs it.

    The shipped file names its upstream once, in an ``upstream {}`` block, which nginx resolves
    at start only: a stack whose tasks come and go (new IPs on every update, scale or restart)
    would keep sending to addresses that left, and nginx refuses to start at all while the app
    has no task yet. So the block goes and ``proxy_pass`` takes a variable, which nginx resolves
    per request through Docker's DNS (cached ``RESOLVE_VALID``). The service name resolves to
    every task (``endpoint_mode: dnsrr``), nginx round-robins over the answers and
    ``proxy_next_upstream`` retries a failed GET on another task. Everything else (buffering,
    timeouts, retry rules, error pages) is the shipped file unchanged.
    """
    sys.path.insert(0, str(REPO))
    from harness.nginx import render

    text = render(template, {"HEAVYAPP_LISTEN": listen, "HEAVYAPP_UPSTREAM": app})
    blocks = re.findall(r"^upstream\s+(\w+)\s*\{.*?^\}\n", text, re.MULTILINE | re.DOTALL)
    if len(blocks) != 1:
        raise ValueError(f"{NGINX_CONF.name}: expected one upstream block, found {len(blocks)}")
    (name,) = blocks
    text = re.sub(r"^upstream\s+\w+\s*\{.*?^\}\n\n?", "", text, flags=re.MULTILINE | re.DOTALL)
    passes = re.compile(rf"^(\s*)proxy_pass\s+http://{name}\s*;", re.MULTILINE)
    if not passes.search(text):
        raise ValueError(f"{NGINX_CONF.name}: no proxy_pass to the upstream {name}")
    text = passes.sub(
        rf"\1# The app's tasks, resolved per request (see the resolver above).\n"
        rf"\1set $heavyapp_app {app};\n\1proxy_pass http://$heavyapp_app;",
        text,
    )
    # An address that left the network answers nothing (no reset): each try at it costs the
    # whole connect timeout. Inside a Docker network a connect takes well under a millisecond.
    connect = re.compile(r"^(\s*)proxy_connect_timeout\s+\S+;", re.MULTILINE)
    if not connect.search(text):
        raise ValueError(f"{NGINX_CONF.name}: no proxy_connect_timeout to shorten")
    text = connect.sub(rf"\1proxy_connect_timeout {CONNECT_TIMEOUT};", text)
    server = re.compile(r"^server\s*\{\n", re.MULTILINE)
    if len(server.findall(text)) != 1:
        raise ValueError(f"{NGINX_CONF.name}: expected one server block")
    resolver = (
        "server {\n"
        "    # Rendered for a Compose project or swarm stack (tests/dockerkit.py front_conf):\n"
        "    # Docker's DNS, answers trusted for RESOLVE_VALID, IPv4 only (tasks have no AAAA).\n"
        f"    resolver {DOCKER_DNS} valid={RESOLVE_VALID} ipv6=off;\n"
        "    resolver_timeout 2s;\n"
    )
    return server.sub(lambda _: resolver, text)


def build_front_image(tag: str = FRONT_TAG, base: str = BASE_TAG, log=print) -> float:
    """``docker build`` deploy/nginx/Dockerfile with the stack's config. Returns seconds taken."""
    context = Path(tempfile.mkdtemp(prefix="heavyapp-front-", dir="/var/tmp"))
    try:
        shutil.copyfile(FRONT_DOCKERFILE, context / "Dockerfile")
        (context / "heavyapp.conf").write_text(front_conf(NGINX_CONF.read_text()))
        return _build(["--build-arg", f"BASE_IMAGE={base}", str(context)], tag, log)
    finally:
        shutil.rmtree(context, ignore_errors=True)


def build_prometheus_image(tag: str = PROMETHEUS_TAG, base: str = BASE_TAG, log=print) -> float:
    """``docker build`` deploy/swarm/prometheus/Dockerfile (Debian's prometheus). Seconds taken."""
    return _build(["--build-arg", f"BASE_IMAGE={base}", str(PROMETHEUS_DIR)], tag, log)


def _build(args: list[str], tag: str, log) -> float:
    """``docker build -t tag ARGS`` under the build lock; seconds taken."""
    t0 = time.monotonic()
    cmd = ["build", "-t", tag, *args]
    log(f"[dockerkit] DOCKER_BUILDKIT=1 {docker_cli()} " + " ".join(cmd))
    with _lock("build"):
        previous = image_id(tag)
        proc = docker(*cmd, check=False, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(
                f"docker build failed ({proc.returncode}):\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
            )
        if previous and previous != image_id(tag):
            # our own tag's previous build, now untagged: don't let test runs pile them up
            docker("rmi", previous, check=False)
    return time.monotonic() - t0


def image_id(tag: str) -> str | None:
    proc = docker("image", "inspect", "--format", "{{.Id}}", tag, check=False, timeout=30)
    return proc.stdout.strip() if proc.returncode == 0 else None


def image_size_mb(tag: str) -> float:
    out = docker("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip()
    return int(out) / 1e6


def main(argv: list[str]) -> int:
    what = argv[1] if len(argv) > 1 else "build"
    if what == "engine":
        pid = start_engine()
        print(f"dockerd started, pid {pid}" if pid else "dockerd already running")
    elif what == "base":
        start_engine()
        print(ensure_base_image())
    elif what == "build":
        start_engine()
        ensure_base_image()
        took = build_app_image()
        print(f"built {APP_TAG} in {took:.1f} s, {image_size_mb(APP_TAG):.0f} MB")
    elif what == "front":
        start_engine()
        took = build_front_image(base=ensure_base_image())
        print(f"built {FRONT_TAG} in {took:.1f} s, {image_size_mb(FRONT_TAG):.0f} MB")
    elif what == "images":
        start_engine()
        base = ensure_base_image()
        for tag, build in ((APP_TAG, build_app_image), (FRONT_TAG, build_front_image)):
            took = build(tag, base)
            print(f"built {tag} in {took:.1f} s, {image_size_mb(tag):.0f} MB")
    elif what == "stop":
        pidfile = STATE_DIR / "dockerd.pid"
        if pidfile.exists():
            stop_engine(int(pidfile.read_text()))
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
