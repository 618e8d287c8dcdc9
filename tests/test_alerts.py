"""deploy/prometheus/ and deploy/grafana/: the alert rules, their runbook and the dashboard.

- ``promtool check rules`` and ``promtool test rules`` (Debian's ``prometheus`` package) on the
  shipped rules and their unit tests; every alert has a test where it fires, one where it stays
  quiet, and the idle test;
- each alert's severity, ``for:``, summary naming the instance, and a ``runbook_url`` whose
  anchor is a heading of docs/operating.md;
- every ``heavyapp_*`` name a rule, an annotation or a panel uses is one the kit declares (read
  from the code's metric declarations) and one a live server exports (read from a real scrape),
  so a metric renamed in the code fails here rather than leaving an alert that never fires;
- a real Prometheus (Debian's binary, on a free loopback port, its own TSDB in a tmp dir) scrapes
  a real kit server every second with the shipped rules: idle, nothing is pending or firing and
  every rule evaluates without error; 4 workers SIGKILLed in 8 s make HeavyappWorkerCrashes
  pending or firing within 60 s, and every dashboard panel has data. The config is the shipped
  prometheus.yml with its target and intervals replaced; no rule's ``for:`` is changed.

In CI (``HEAVYAPP_REQUIRE_PROMETHEUS=1``, set by .ci/run) a missing promtool or prometheus fails.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from gunicorn.config import Backlog
from prometheus_client.parser import text_string_to_metric_families

from harness.process import ChildServer, free_port
from harness.server import GunicornServer, serving
from helpers import poll_until, unavailable

yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate (dev extra)")
# The dashboard generator's library, pinned in the dev extra that make test installs: missing, the
# module fails to import (never skips), as the dashboard checks would otherwise pass unseen.
from grafana_foundation_sdk.models import dashboard as grafana  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROM_DIR = REPO / "deploy" / "prometheus"
RULES = PROM_DIR / "heavyapp-rules.yaml"
RULE_TESTS = sorted(PROM_DIR.glob("*.test.yaml"))
PROM_CONFIG = PROM_DIR / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "heavyapp-dashboard.json"
OPERATING = REPO / "docs" / "operating.md"
REQUIRED_BY = "HEAVYAPP_REQUIRE_PROMETHEUS"
#: Calls that declare a metric family in prometheus_client, and how each exposes its samples.
DECLARATIONS = {
    "Counter": ("_total",),
    "CounterMetricFamily": ("_total",),
    "Gauge": ("",),
    "GaugeMetricFamily": ("",),
    "Histogram": ("_bucket", "_sum", "_count"),
    "HistogramMetricFamily": ("_bucket", "_sum", "_count"),
    "Summary": ("", "_sum", "_count"),
}
NAME = re.compile(r"\bheavyapp_[a-z0-9_]+")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"no {name} (apt-get install -y prometheus)", REQUIRED_BY)
    return path


def rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


# --------------------------------------------------------------------------- promtool


def test_promtool_checks_the_rules_and_the_config() -> None:
    promtool = tool("promtool")
    for args in (["check", "rules", str(RULES)], ["check", "config", str(PROM_CONFIG)]):
        proc = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_pass() -> None:
    promtool = tool("promtool")
    proc = subprocess.run(
        [promtool, "test", "rules", *map(str, RULE_TESTS)],
        capture_output=True,
        text=True,
        cwd=PROM_DIR,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """The unit tests bite: with HeavyappWorkerCrashes' threshold raised past the test's four
    kills, promtool reports the missing alert."""
    promtool = tool("promtool")
    broken = RULES.read_text().replace('planned="false"}[5m])) >= 3', 'planned="false"}[5m])) >= 5')
    assert broken != RULES.read_text()
    (tmp_path / RULES.name).write_text(broken)
    test_file = tmp_path / "crashes.test.yaml"
    tests = yaml.safe_load((PROM_DIR / "heavyapp-rules.test.yaml").read_text())
    tests["tests"] = [t for t in tests["tests"] if t["name"] == "worker crashes"]
    test_file.write_text(yaml.safe_dump(tests))
    proc = subprocess.run(
        [promtool, "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=30,
    )
    assert proc.returncode != 0 and "HeavyappWorkerCrashes" in proc.stdout + proc.stderr


def test_every_alert_fires_stays_quiet_and_is_quiet_when_idle_in_a_unit_test() -> None:
    """Quiet means a scenario of its own, not the idle one: an instance of that scenario's
    series that the case leaves out of ``exp_alerts`` (promtool fails if it fired)."""
    fires: set[str] = set()
    quiet: set[str] = set()
    idle: set[str] = set()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            instances = {
                match
                for series in test["input_series"]
                for match in re.findall(r'instance="([^"]+)"', series["series"])
            }
            for case in test.get("alert_rule_test", []):
                name = case["alertname"]
                expected = case.get("exp_alerts") or []
                if expected:
                    fires.add(name)
                if test["name"] == "idle":
                    if not expected:
                        idle.add(name)
                elif instances - {a["exp_labels"]["instance"] for a in expected}:
                    quiet.add(name)
    names = {rule["alert"] for rule in alerts()}
    assert len(names) >= 5
    assert names - fires == set(), "alerts no unit test sees firing"
    assert names - quiet == set(), "alerts no unit test sees quiet"
    assert names - idle == set(), "alerts the idle test does not cover"


# --------------------------------------------------------------------------- the rules' shape


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives headings: lower case, punctuation dropped, spaces to dashes."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def duration_seconds(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)([smhd])", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(int(n) * units[u] for n, u in parts)


@pytest.mark.parametrize("rule", alerts(), ids=lambda r: r["alert"])
def test_alert_has_severity_for_summary_and_a_runbook_section(rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in {"critical", "warning"}
    assert "for" in rule, "a `for:`, with its reason in a comment"
    duration_seconds(rule["for"])
    summary = rule["annotations"]["summary"]
    assert summary.startswith("{{ $labels.instance }}"), "the summary names the instance"
    page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
    assert (REPO / page).resolve() == OPERATING.resolve()
    assert anchor == rule["alert"].lower() and anchor in github_anchors(OPERATING.read_text())


def test_each_for_has_its_reason_in_a_comment() -> None:
    """Right under each ``- alert:`` line, a comment opens with ``# for <its for>:``."""
    text = RULES.read_text()
    for rule in alerts():
        after = text.split(f"- alert: {rule['alert']}\n", 1)[1].lstrip()
        assert after.startswith(f"# for {rule['for']}:"), rule["alert"]


def test_the_prometheus_rule_is_the_rules_file_as_is() -> None:
    """deploy/k8s/monitoring/prometheus-rule.yaml is rendered from the rules file, and its spec
    parses to the same groups (so kube-prometheus loads exactly what promtool tested)."""
    module = load_module(PROM_DIR / "prometheusrule.py", "prometheusrule")
    assert module.TARGET.read_text() == module.render(), (
        f"{module.TARGET} is stale: python deploy/prometheus/prometheusrule.py"
    )
    (doc,) = yaml.safe_load_all(module.TARGET.read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["spec"] == yaml.safe_load(RULES.read_text())


# --------------------------------------------------------------------------- metric names


def declared(where: list[Path]) -> dict[str, set[str]]:
    """Family name -> its sample names, for every ``heavyapp_*`` metric declared under ``where``."""
    families: dict[str, set[str]] = {}
    for root in where:
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                func = node.func
                kind = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                first = node.args[0]
                if kind in DECLARATIONS and isinstance(first, ast.Constant):
                    name = str(first.value)
                    if name.startswith("heavyapp_"):
                        base = name.removesuffix("_total") if "Counter" in kind else name
                        families[base] = {base + suffix for suffix in DECLARATIONS[kind]}
    return families


KIT = declared([REPO / "workers"])


def queried(text: str) -> set[str]:
    return set(NAME.findall(text))


def rule_names() -> set[str]:
    names = set()
    for rule in rules():
        names |= queried(rule["expr"])
        names |= queried(" ".join(rule.get("annotations", {}).values()))
    return names


def dashboard_names() -> set[str]:
    return {
        name for expr in panel_queries(json.loads(DASHBOARD.read_text())) for name in queried(expr)
    }


def panel_queries(dashboard: dict) -> list[str]:
    """Every PromQL expression of the dashboard: the panels' targets and the variables'."""
    targets = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    variables = [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return targets + variables


def test_declarations_are_found() -> None:
    """The scan sees the kit's families (or every name check below would pass vacuously)."""
    assert {"heavyapp_worker_exits", "heavyapp_http_request_duration_seconds"} <= KIT.keys()
    assert len(KIT) >= 8


def samples_of(families: dict[str, set[str]]) -> set[str]:
    """Every name a query may use: the samples' names, and a histogram's family name (as the
    annotations write it)."""
    return set().union(*families.values()) | {
        name for name, samples in families.items() if f"{name}_bucket" in samples
    }


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_name_queried_is_declared_by_the_kit(source: str) -> None:
    names = rule_names() if source == "rules" else dashboard_names()
    assert names, f"no heavyapp_ name found in the {source}"
    assert names - samples_of(KIT) == set(), (
        f"the {source} query names the kit does not declare (renamed?)"
    )


# --------------------------------------------------------------------------- the dashboard

#: What an operator looks for first (issue 18), by a word of each panel's title.
PANELS = {
    "pool size and target": "Pool",
    "requests by status": "Requests by status",
    "5xx": "5xx",
    "latency quantiles": "Latency",
    "queue-wait quantiles": "Queue wait",
    "refusals by reason": "Refusals by reason",
    "worker exits by cause": "Worker exits by cause",
    "native threads": "Native threads",
    "memory per worker": "Memory per worker",
}


def load_module(path: Path, name: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboard_json_is_what_its_generator_builds() -> None:
    generator = load_module(DASHBOARD.with_name("dashboard.py"), "dashboard")
    assert generator.TARGET == DASHBOARD
    assert DASHBOARD.read_text() == generator.render(), (
        "deploy/grafana/heavyapp-dashboard.json is stale: python deploy/grafana/dashboard.py"
    )


def test_dashboard_loads_and_has_the_panels_and_a_datasource_variable() -> None:
    data = json.loads(DASHBOARD.read_text())
    model = grafana.Dashboard.from_json(data)  # Grafana's schema, as the SDK types it
    assert model.title and model.uid and len(model.panels) == len(data["panels"])
    titles = [p["title"] for p in data["panels"]]
    missing = {want for want, word in PANELS.items() if not any(word in t for t in titles)}
    assert missing == set(), f"panels missing: {missing}"
    assert len({p["id"] for p in data["panels"]}) == len(titles), "unique panel ids"
    (source,) = [v for v in data["templating"]["list"] if v["type"] == "datasource"]
    assert source["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": f"${{{source['name']}}}"}
    for p in data["panels"]:
        assert p["type"] == "timeseries" and p["datasource"] == ref, p["title"]
        assert p["targets"] and all(t["datasource"] == ref for t in p["targets"]), p["title"]
        assert all("$job" in t["expr"] and "$instance" in t["expr"] for t in p["targets"])
    cells = [
        (x, y)
        for p in data["panels"]
        for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
        for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])
    ]
    assert len(cells) == len(set(cells)) and max(x for x, _ in cells) < 24, "panels overlap"


# --------------------------------------------------------------------------- a real Prometheus


class PrometheusError(RuntimeError):
    """Prometheus did not start (its log's tail in the message)."""


class Prometheus(ChildServer):
    """Debian's ``prometheus`` on 127.0.0.1, its own TSDB in ``workdir``, stopped by pid."""

    Error = PrometheusError
    what = "prometheus"
    stop_timeout = 15.0

    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        super().__init__(free_port(), workdir, workdir / "prometheus.log")
        config = yaml.safe_load(PROM_CONFIG.read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(RULES)]
        (job,) = config["scrape_configs"]
        job["static_configs"] = [{"targets": [target]}]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.command = [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]

    def start(self) -> Prometheus:
        self.launch(self.command, cwd=self.directory, env=None, timeout=30, give_up=signal.SIGKILL)
        return self

    def ready(self) -> bool:
        try:
            return bool(self.get("/-/ready", raw=True))
        except OSError:
            return False

    def get(self, path: str, raw: bool = False) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=5) as resp:
            body = resp.read()
        return body if raw else json.loads(body)["data"]

    def alerts(self) -> list[dict[str, Any]]:
        return self.get("/api/v1/alerts")["alerts"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))["result"]

    def rule_groups(self) -> list[dict[str, Any]]:
        return self.get("/api/v1/rules")["groups"]


def panel_exprs(panel: dict) -> list[str]:
    """A panel's queries as Grafana sends them with every server picked (rate window 1m)."""
    return [
        t["expr"]
        .replace('"$job"', '".*"')
        .replace('"$instance"', '".*"')
        .replace("$__rate_interval", "1m")
        for t in panel["targets"]
    ]


def scrape(server: GunicornServer) -> list[Any]:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as resp:
        return list(text_string_to_metric_families(resp.read().decode()))


def scrape_names(server: GunicornServer) -> set[str]:
    families = scrape(server)
    histograms = {f.name for f in families if f.type == "histogram"}
    return histograms | {s.name for family in families for s in family.samples}


def shed_some(server: GunicornServer) -> None:
    """Eight slow requests at once on two workers with a 50 ms queue timeout: some are refused
    (``heavyapp_shed_total`` appears in the scrape)."""
    from concurrent.futures import ThreadPoolExecutor

    def get(_: int) -> int:
        try:
            with urllib.request.urlopen(f"{server.url}/heavy?n=3000000", timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(get, range(8)))
    assert 503 in statuses and 200 in statuses, statuses


@pytest.mark.server
def test_pool_metrics_match_the_kernel(server: GunicornServer) -> None:
    """The figures the dashboard and the saturation alert read, against psutil and the socket:
    each worker's resident memory and threads by id, and the accept queue's limit."""
    import psutil

    values = {
        (s.name, s.labels.get("worker_id")): s.value for f in scrape(server) for s in f.samples
    }
    ids = server.worker_ids()
    assert len(ids) == 2
    for pid, wid in ids.items():
        proc = psutil.Process(pid)
        rss = values[("heavyapp_worker_resident_bytes", str(wid))]
        assert abs(rss - proc.memory_info().rss) < 0.2 * rss, (wid, rss)
        assert values[("heavyapp_worker_threads", str(wid))] == proc.num_threads()
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    backlog = Backlog.default  # gunicorn_conf.py leaves Gunicorn's `backlog` as it is
    assert values[("heavyapp_listen_backlog_limit", None)] == min(backlog, somaxconn)


@pytest.mark.server
def test_real_prometheus_fires_the_worker_death_alert_and_nothing_when_idle(tmp_path: Path) -> None:
    binary = tool("prometheus")
    server = GunicornServer(workers=2, env={"HEAVYAPP_QUEUE_TIMEOUT": "0.05"})
    with serving(server):
        prom = Prometheus(binary, tmp_path, f"127.0.0.1:{server.port}")
        try:
            prom.start()
            # Idle: the target is up, and every rule has been evaluated at least twice since.
            poll_until(
                lambda: any(
                    t["health"] == "up" for t in prom.get("/api/v1/targets")["activeTargets"]
                ),
                20,
                "the kit server scraped",
            )
            seen: dict[str, set[str]] = {}

            def evaluated_twice_since_up() -> bool:
                for group in prom.rule_groups():
                    seen.setdefault(group["name"], set()).add(group["lastEvaluation"])
                return len(seen) == 2 and all(len(stamps) >= 3 for stamps in seen.values())

            poll_until(evaluated_twice_since_up, 20, "the rules evaluated on the idle server", 0.2)
            groups = prom.rule_groups()
            broken = [
                (r["name"], r.get("lastError"))
                for g in groups
                for r in g["rules"]
                if r["health"] != "ok"
            ]
            assert broken == [], f"rules that fail to evaluate: {broken}\n{prom.tail()}"
            assert prom.alerts() == [], "an idle server fires nothing"
            idle_names = scrape_names(server)

            # Four SIGKILLs in 8 s, each of a worker alive at that moment.
            started = time.monotonic()
            for i in range(4):
                victim = server.worker_pids()[0]
                os.kill(victim, signal.SIGKILL)
                server.wait_for_workers(2, timeout=10, exclude={victim})
                if i < 3:
                    time.sleep(max(0.0, started + 2 * (i + 1) - time.monotonic()))
            killed_in = time.monotonic() - started
            assert killed_in <= 8.5, f"4 kills took {killed_in:.1f}s"

            def death_alert() -> dict | None:
                for alert in prom.alerts():
                    if alert["labels"]["alertname"] == "HeavyappWorkerCrashes":
                        return alert
                return None

            alert = poll_until(death_alert, 60, "HeavyappWorkerCrashes pending or firing")
            print(
                f"HeavyappWorkerCrashes {alert['state']} {time.monotonic() - started:.1f}s after "
                f"the first of 4 kills in {killed_in:.1f}s: {alert['annotations']['summary']}; "
                f"all: {sorted((a['labels']['alertname'], a['state']) for a in prom.alerts())}"
            )
            assert alert["state"] in {"pending", "firing"}
            assert alert["labels"]["cause"] == "killed"
            assert alert["labels"]["severity"] == "warning"
            assert str(server.port) in alert["annotations"]["summary"], "names the instance"

            delayed = [
                s.value
                for f in scrape(server)
                for s in f.samples
                if s.name == "heavyapp_worker_restart_delays_total"
            ]
            assert delayed and delayed[0] >= 1, "each id died twice in 30 s: backoff engaged"
            # Refusals twice: the first makes the series (a counter born at 6 has no rate yet),
            # the second, once Prometheus holds them, moves them between two scrapes.
            shed_some(server)
            poll_until(lambda: prom.query("heavyapp_shed_total"), 15, "refusals scraped")
            shed_some(server)
            live = idle_names | scrape_names(server)
            # Every panel's query is valid PromQL to this Prometheus (a 400 raises), and every
            # panel has data once the requests above were scraped.
            board = json.loads(DASHBOARD.read_text())
            for panel in board["panels"]:
                poll_until(
                    lambda panel=panel: any(map(prom.query, panel_exprs(panel))),
                    15,
                    f"data for the panel {panel['title']!r}",
                    every=0.5,
                )
        finally:
            prom.stop()
    assert prom.proc is not None and prom.proc.poll() is not None, "Prometheus stopped"
    kit_live = {n for n in live if n.startswith("heavyapp_")}
    everything = samples_of(declared([REPO / "workers", REPO / "heavyapp"]))
    assert kit_live - everything == set(), "exported names the declaration scan missed"
    for source, names in (("rules", rule_names()), ("dashboard", dashboard_names())):
        assert names - kit_live == set(), f"the {source} query names the live server lacks"
