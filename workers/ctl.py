"""heavyctl: ``pm2 list``, ``pm2 reload`` and ``pm2 scale`` for a heavyapp server, and
``upgrade``, Gunicorn's USR2 binary upgrade done and waited for.

Everything goes through Gunicorn's own control socket (``gunicorn.ctl`` in the server's run
directory: ``show workers``, ``show stats``; reload and scale are Gunicorn's HUP, TTIN and TTOU to
the master pid the socket names); what Gunicorn does
not know comes from the kit: worker ids and request counts from the process titles, CPU and
memory from psutil, restarts and the last crash of each id from the master's ``roster.json``,
crashes from the journal. The server is found from the same variables the config reads
(``HEAVYAPP_RUN_DIR``, else ``HOST``/``PORT``/``BIND``), or ``--run-dir``/``--socket``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from gunicorn.ctl.client import ControlClient, ControlClientError

from workers.crashes import read_journal
from workers.settings import RUN_DIR, Settings
from workers.shared import titles
from workers.shared.exits import ExitCause

POLL = 0.1  # seconds between looks at the pool while waiting for a reload or a scale
SEND_ATTEMPTS = 20  # tries of a control-socket command (POLL apart) before giving up


class CtlError(Exception):
    """Something heavyctl cannot do; the message says what and what to try."""


@dataclass(frozen=True)
class Server:
    """Where one server's control socket and state live, and how we came to look there."""

    run_dir: Path
    socket: Path
    found_by: str

    @classmethod
    def locate(
        cls, run_dir_opt: str | None, socket_opt: str | None, bind_opt: str | None = None
    ) -> Server:
        if socket_opt:
            sock = Path(socket_opt)
            return cls(Path(run_dir_opt) if run_dir_opt else sock.parent, sock, "--socket")
        if run_dir_opt:
            return cls(Path(run_dir_opt), Path(run_dir_opt) / "gunicorn.ctl", "--run-dir")
        settings = Settings.from_env()
        if bind_opt:
            where = settings.run_dir(bind=bind_opt)
            return cls(where, where / "gunicorn.ctl", "--bind")
        found_by = RUN_DIR if settings.run_dir_path else "HOST/PORT/BIND"
        where = settings.run_dir()
        return cls(where, where / "gunicorn.ctl", found_by)

    def send(self, command: str, *, retry: bool = True) -> dict[str, Any]:
        """One command on the control socket; a socket that stays missing or dead: no server.

        Gunicorn closes and removes the socket around each fork of a worker, so for a moment it
        can be missing, refuse or reset a connection. A command that never connected is sent
        again; one whose connection was reset only with ``retry`` (safe for ``show`` commands).
        """
        for attempt in range(SEND_ATTEMPTS):
            last = attempt == SEND_ATTEMPTS - 1
            if not self.socket.exists():
                if last:
                    raise CtlError(self._no_server("no control socket"))
            else:
                try:
                    with ControlClient(str(self.socket), timeout=10.0) as client:
                        return client.send_command(command)
                except ControlClientError as exc:
                    refused = "Failed to connect" in str(exc)
                    if not refused and "Communication error" not in str(exc):
                        raise CtlError(f"{command!r} failed: {exc}") from None
                    if last and refused:
                        raise CtlError(self._no_server("nothing answers on it")) from None
                    if last or not (retry or refused):
                        raise CtlError(f"{command!r} failed: {exc}") from None
            time.sleep(POLL)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _no_server(self, why: str) -> str:
        return (
            f"no heavyapp server is running at {self.socket} ({why}; looked there because of "
            f"{self.found_by}). Start one, or point heavyctl at it with --run-dir or --socket."
        )

    def roster(self) -> dict[str, Any]:
        """The master's per-id history (written at each worker exit; none before the first)."""
        try:
            return json.loads((self.run_dir / "roster.json").read_text())
        except FileNotFoundError:
            return {"generation": 0, "slots": {}}

    @functools.cached_property
    def settings(self) -> Settings:
        """The kit's settings with this server's run directory; read once, when first needed."""
        return dataclasses.replace(Settings.from_env(), run_dir_path=self.run_dir)

    def crash_log(self) -> Path:
        return self.settings.crash_log_path()


# -- status ----------------------------------------------------------------------------------


def _own_memory(proc: psutil.Process) -> tuple[float | None, float | None]:
    """USS (pages only this process has) and PSS (its own plus its share of the pages it shares,
    e.g. a model preloaded in the master), in MB: PSS summed over processes is what they use."""
    try:
        full = proc.memory_full_info()
    except psutil.AccessDenied:
        return None, None
    return round(full.uss / 2**20, 1), round(full.pss / 2**20, 1)


def _sample_processes(pids: Sequence[int], interval: float) -> dict[int, dict[str, Any]]:
    """Title, uptime, memory and CPU % over ``interval`` seconds of each live pid."""
    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            procs[pid] = psutil.Process(pid)
            procs[pid].cpu_percent(None)  # starts the measuring window
        except psutil.NoSuchProcess:
            continue
    time.sleep(interval)
    facts = {}
    for pid, proc in procs.items():
        try:
            with proc.oneshot():
                facts[pid] = {
                    "title": titles.read(pid),
                    "uptime_s": round(time.time() - proc.create_time(), 1),
                    "cpu_percent": proc.cpu_percent(None),
                    "memory_mb": round(proc.memory_info().rss / 2**20, 1),
                    **dict(zip(("uss_mb", "pss_mb"), _own_memory(proc), strict=True)),
                    "zombie": proc.status() == psutil.STATUS_ZOMBIE,
                }
        except psutil.NoSuchProcess:
            continue
    return facts


def _worker_status(gunicorn: dict[str, Any], title: dict[str, Any], proc: dict | None) -> str:
    """Gunicorn's ``booted`` is set in the child only: the worker's own title says it is up."""
    if proc is None or proc["zombie"]:
        return "exited"
    if gunicorn["aborted"]:
        return "timeout"
    if title["waiting"]:
        return "waiting"  # sitting out a crash-loop delay
    return "online" if title["id"] is not None else "booting"


def _mark_stopping(rows: list[dict[str, Any]]) -> None:
    """During a reload an id briefly has two processes: the older one is on its way out."""
    newest: dict[int, int] = {}
    for row in rows:
        if row["id"] is not None:
            newest[row["id"]] = max(newest.get(row["id"], row["age"]), row["age"])
    for row in rows:
        if row["id"] is not None and row["age"] < newest[row["id"]] and row["status"] == "online":
            row["status"] = "stopping"


def queue_figures(metrics_dir: Path) -> dict[str, Any]:
    """Queue wait and shed counts since the server started, summed over its workers' metrics
    files (``workers/gates/queue.py`` writes them); the p95 is the bucket bound it falls in."""
    from prometheus_client import CollectorRegistry, multiprocess

    figures: dict[str, Any] = {"requests": 0, "mean_wait_ms": None, "p95_wait_ms": None}
    shed: dict[str, int] = {}
    buckets: list[tuple[float, float]] = []
    total = 0.0
    if metrics_dir.is_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))
        for metric in registry.collect():
            for sample in metric.samples:
                if sample.name == "heavyapp_shed_total":
                    shed[sample.labels["reason"]] = int(sample.value)
                elif sample.name == "heavyapp_queue_wait_seconds_count":
                    figures["requests"] = int(sample.value)
                elif sample.name == "heavyapp_queue_wait_seconds_sum":
                    total = sample.value
                elif sample.name == "heavyapp_queue_wait_seconds_bucket":
                    buckets.append((float(sample.labels["le"]), sample.value))
    if count := figures["requests"]:
        figures["mean_wait_ms"] = round(total / count * 1000, 3)
        bound = next(le for le, n in sorted(buckets) if n >= 0.95 * count)
        figures["p95_wait_ms"] = None if bound == float("inf") else bound * 1000
    figures["shed"] = shed
    return figures


def status(server: Server, interval: float) -> dict[str, Any]:
    stats = server.send("show stats")
    workers = server.send("show workers")["workers"]
    listeners = server.send("show listeners")["listeners"]
    roster = server.roster()
    facts = _sample_processes([stats["pid"], *(w["pid"] for w in workers)], interval)
    rows = []
    for w in workers:
        proc = facts.get(w["pid"])
        title = titles.parse(proc["title"] if proc else "")
        slot = roster["slots"].get(str(title["id"]), {})
        rows.append(
            {
                "id": title["id"],
                "pid": w["pid"],
                "age": w["age"],
                "status": _worker_status(w, title, proc),
                "uptime_s": proc["uptime_s"] if proc else None,
                "restarts": slot.get("restarts", 0),
                "crashes": slot.get("crashes", 0),
                "cpu_percent": proc["cpu_percent"] if proc else None,
                "memory_mb": proc["memory_mb"] if proc else None,
                "uss_mb": proc["uss_mb"] if proc else None,
                "pss_mb": proc["pss_mb"] if proc else None,
                "requests": title["requests"],
                "last_crash": slot.get("last_crash"),
                "last_crash_time": slot.get("last_crash_time"),
            }
        )
    _mark_stopping(rows)
    rows.sort(key=lambda r: (r["id"] is None, r["id"], r["age"]))
    master = facts.get(stats["pid"], {})
    pss = [master.get("pss_mb"), *(r["pss_mb"] for r in rows)]
    return {
        "master": {
            "pid": stats["pid"],
            "uptime_s": master.get("uptime_s", stats["uptime"]),  # measured as the workers' are
            "bind": [lnr["address"] for lnr in listeners],
            "workers": stats["workers_current"],
            "target": stats["workers_target"],
            "reloads": stats["reloads"],
            "generation": roster.get("generation", 0),
            "memory_mb": master.get("memory_mb"),
            "uss_mb": master.get("uss_mb"),
            "pss_mb": master.get("pss_mb"),
            "pss_mb_total": round(sum(pss), 1) if None not in pss else None,
            "native_threads": roster.get("native_threads"),
            "native_threads_detail": roster.get("native_threads_detail"),
            "run_dir": str(server.run_dir),
        },
        "workers": rows,
        "queue": queue_figures(server.settings.metrics_path()),
    }


def human_duration(seconds: float | None) -> str:
    """pm2-style: ``42s``, ``3m05s``, ``2h03m``, ``4d02h``."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _last_crash(row: dict[str, Any], now: float) -> str:
    if not row["last_crash"]:
        return "-"
    return f"{row['last_crash']} {human_duration(now - row['last_crash_time'])} ago"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} MB"


def render_status(data: dict[str, Any]) -> str:
    m = data["master"]
    now = time.time()
    head = (
        f"master pid {m['pid']}, up {human_duration(m['uptime_s'])}, "
        f"bind {', '.join(m['bind'])}, {m['workers']}/{m['target']} workers, "
        f"generation {m['generation']}, {m['reloads']} reloads, run dir {m['run_dir']}, "
        f"native threads per worker {m['native_threads_detail'] or '-'}, "
        f"memory (PSS) {_mb(m['pss_mb_total'])} in all, master {_mb(m['pss_mb'])}; "
        f"{render_queue(data['queue'])}"
    )
    header = [
        "id", "pid", "status", "uptime", "restarts", "cpu", "mem", "uss", "pss", "requests",
        "last crash",
    ]  # fmt: skip
    rows = [
        [
            "?" if r["id"] is None else str(r["id"]),
            str(r["pid"]),
            r["status"],
            human_duration(r["uptime_s"]),
            str(r["restarts"]),
            "-" if r["cpu_percent"] is None else f"{r['cpu_percent']:.1f}%",
            _mb(r["memory_mb"]),
            _mb(r["uss_mb"]),
            _mb(r["pss_mb"]),
            "-" if r["requests"] is None else str(r["requests"]),
            _last_crash(r, now),
        ]
        for r in data["workers"]
    ]
    return f"{head}\n{table(header, rows)}"


def render_queue(q: dict[str, Any]) -> str:
    shed = ", ".join(f"{why} {n}" for why, n in sorted(q["shed"].items()) if n) or "none"
    if not q["requests"]:
        return f"queue: no request timed yet; shed: {shed}"
    p95 = "over 10 s" if q["p95_wait_ms"] is None else f"<= {q['p95_wait_ms']:g} ms"
    return (
        f"queue: {q['requests']} requests timed, mean wait {q['mean_wait_ms']:.1f} ms, "
        f"p95 {p95}; shed: {shed}"
    )


# -- reload and scale ------------------------------------------------------------------------


def _titled(pids: set[int]) -> bool:
    """Every pid has set its heavyapp title, which a worker does once it runs its own code."""
    return all(titles.parse(titles.read(pid))["id"] is not None for pid in pids)


def _wait_for_pool(
    server: Server, done: Callable[[set[int], int], bool], timeout: float, what: str
) -> list[int]:
    """Poll the pool until ``done(pids, target)`` and every worker is up; its pids then."""
    deadline = time.monotonic() + timeout
    while True:
        pids = {w["pid"] for w in server.send("show workers")["workers"]}
        target = server.send("show stats")["workers_target"]
        if done(pids, target) and _titled(pids):
            return sorted(pids)
        if time.monotonic() > deadline:
            raise CtlError(f"{what} not finished within {timeout:.0f}s: workers {sorted(pids)}")
        time.sleep(POLL)


def reload(server: Server, timeout: float) -> dict[str, Any]:
    """Gunicorn's graceful reload (SIGHUP, as the socket's ``reload`` sends it): new workers
    first, then the old ones finish their requests and leave."""
    stats = server.send("show stats")
    before = {w["pid"] for w in server.send("show workers")["workers"]}
    started = time.monotonic()
    os.kill(stats["pid"], signal.SIGHUP)  # not resent on a reset socket: a signal arrives once
    new_pids = _wait_for_pool(
        server, lambda pids, target: len(pids) == target and not pids & before, timeout, "reload"
    )
    return {
        "old_pids": sorted(before),
        "new_pids": new_pids,
        "seconds": round(time.monotonic() - started, 2),
    }


def _gone(pid: int) -> bool:
    """Has ``pid`` exited (a zombie counts: it no longer runs)?"""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _live_children(pid: int) -> set[int]:
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return set()
    return {c.pid for c in children if not _gone(c.pid)}


def _poll(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            raise CtlError(f"{what}: not within {timeout:.0f}s")
        time.sleep(POLL)
    return found


def upgrade(server: Server, timeout: float) -> dict[str, Any]:
    """Gunicorn's binary upgrade, for new code on a bare VM: SIGUSR2 makes the master re-exec
    itself (a new master loads the code and configuration on disk and shares the listening
    socket), then, once the new pool is up, SIGTERM to the old master: its workers finish their
    requests while the new ones already take the queue. Waits for all of it."""
    stats = server.send("show stats")
    old, target = stats["pid"], stats["workers_target"]
    old_workers = {w["pid"] for w in server.send("show workers")["workers"]}
    started = time.monotonic()
    os.kill(old, signal.SIGUSR2)

    def new_master() -> int | None:
        born = _live_children(old) - old_workers
        return next(iter(born), None)

    new = _poll(new_master, timeout, "the new master after SIGUSR2 (the master logs why)")

    def new_pool() -> set[int]:
        if _gone(new):
            raise CtlError(
                f"the new master pid={new} exited before its workers were up (its log says "
                f"why); the old master pid={old} keeps serving"
            )
        pids = _live_children(new)
        return pids if len(pids) == target and _titled(pids) else set()

    pids = _poll(new_pool, timeout, f"the new master pid={new}'s {target} workers")
    os.kill(old, signal.SIGTERM)  # its workers finish their requests; the queue stays
    _poll(lambda: _gone(old), timeout, f"the old master pid={old} to leave")
    _poll(lambda: server.send("show stats")["pid"] == new, timeout, "the new control socket")
    return {
        "old_master": old,
        "new_master": new,
        "old_pids": sorted(old_workers),
        "new_pids": sorted(pids),
        "seconds": round(time.monotonic() - started, 2),
    }


def scale_target(spec: str, current: int) -> int:
    """``N`` (absolute), ``+k`` or ``-k`` (relative) to a worker count of at least 1."""
    if not re.fullmatch(r"[+-]?\d+", spec):
        raise CtlError(f"scale wants N, +k or -k, got {spec!r}")
    target = current + int(spec) if spec[0] in "+-" else int(spec)
    if target < 1:
        raise CtlError(f"scale {spec} would leave {target} workers; the least is 1")
    return target


def _set_target(server: Server, target: int, timeout: float) -> None:
    """Step the master's worker count to ``target`` with TTIN/TTOU, one worker at a time.

    Signals are handled on the master's main loop, where Gunicorn sizes the pool; the socket's
    ``worker add|remove`` changes the count from the socket's own thread, racing that loop and
    the kit's scale-down hook. Two identical signals sent together merge into one, hence one
    at a time, each confirmed on the socket before the next.
    """
    stats = server.send("show stats")
    master, current = stats["pid"], stats["workers_target"]
    deadline = time.monotonic() + timeout
    while current != target:
        before = current
        os.kill(master, signal.SIGTTIN if target > before else signal.SIGTTOU)
        while (current := server.send("show stats")["workers_target"]) == before:
            if time.monotonic() > deadline:
                raise CtlError(f"the master did not take the worker count {target}")
            time.sleep(POLL)
        if abs(target - current) >= abs(target - before):  # a HUP or another scale meanwhile
            raise CtlError(f"the worker count was changed by someone else (now {current})")


def scale(server: Server, spec: str, timeout: float) -> dict[str, Any]:
    previous = server.send("show stats")["workers_target"]
    target = scale_target(spec, previous)
    _set_target(server, target, timeout)
    pids = _wait_for_pool(
        server, lambda pids, now: len(pids) == now == target, timeout, f"scale to {target}"
    )
    return {"previous": previous, "target": target, "pids": pids}


# -- crashes ---------------------------------------------------------------------------------


def render_crash(c: dict[str, Any]) -> str:
    how = f"signal {c['signal']}" if c.get("signal") else f"exit code {c.get('exit_code')}"
    if c.get("cause") == ExitCause.EXCEPTION:
        how = "answered 500"
    parts = [
        c.get("time", "?"),
        f"worker {c.get('worker_id', '?')} pid {c.get('pid', '?')}",
        f"{c.get('cause')} ({how})",
    ]
    if c.get("uptime_s") is not None:
        parts.append(f"up {c['uptime_s']:.1f}s, {c.get('requests', 0)} requests")
    if c.get("request"):
        parts.append(f"serving {c['request']}")
    if c.get("detail"):
        parts.append(str(c["detail"]))
    return "  ".join(parts)


# -- the command line ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    common.add_argument("--run-dir", help="the server's run directory (default: from the env)")
    common.add_argument("--socket", help="the server's control socket (default: in the run dir)")
    common.add_argument("--bind", help="the address the server was started with, e.g. by -b")
    parser = argparse.ArgumentParser(
        prog="heavyctl", description="Look at and steer a running heavyapp server."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", parents=[common], help="master and workers, like pm2 list")
    st.add_argument("--interval", type=float, default=0.5, help="CPU sampling window, seconds")
    rl = sub.add_parser("reload", parents=[common], help="graceful reload, no failed requests")
    rl.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it")
    up = sub.add_parser(
        "upgrade", parents=[common], help="new code: USR2, wait for the new pool, TERM the old"
    )
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each step")
    sc = sub.add_parser("scale", parents=[common], help="set the worker count: N, +k or -k")
    sc.add_argument("count", help="N, +k or -k")
    sc.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it")
    cr = sub.add_parser("crashes", parents=[common], help="recent entries of the crash journal")
    cr.add_argument("-n", "--last", type=int, default=20, help="how many (default 20)")
    return parser


def _run(args: argparse.Namespace, server: Server) -> tuple[Any, str]:
    """(the JSON answer, the text answer) of one command."""
    if args.command == "status":
        data = status(server, args.interval)
        return data, render_status(data)
    if args.command == "reload":
        data = reload(server, args.timeout)
        return data, (
            f"reloaded in {data['seconds']}s: workers {data['old_pids']} replaced by "
            f"{data['new_pids']}"
        )
    if args.command == "upgrade":
        data = upgrade(server, args.timeout)
        return data, (
            f"upgraded in {data['seconds']}s: master pid={data['old_master']} replaced by "
            f"pid={data['new_master']}, workers {data['new_pids']}"
        )
    if args.command == "scale":
        data = scale(server, args.count, args.timeout)
        return data, f"scaled from {data['previous']} to {data['target']} workers: {data['pids']}"
    entries = read_journal(server.crash_log(), last=args.last)
    text = "\n".join(map(render_crash, entries)) or f"no crashes in {server.crash_log()}"
    return entries, text


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # "scale -1": argparse takes -1 for a number, not a flag
    server = Server.locate(args.run_dir, args.socket, args.bind)
    try:
        data, text = _run(args, server)
    except CtlError as exc:
        print(f"heavyctl: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
