"""deploy/: the Kubernetes manifests and the Compose bench, checked without a cluster.

Kubernetes: every document under deploy/k8s/ is validated in strict mode (unknown fields are
errors) against the schemas that ``kubernetes-validate`` ships for the versions in K8S_VERSIONS,
then checked for the things a schema cannot see: the pool sizes to limits.cpu, the grace period
covers Gunicorn's graceful timeout, the uid is the Dockerfile's, the labels line up.

Compose: deploy/compose.yaml is checked structurally here and by ``docker-compose config -q``
(Debian bookworm's docker-compose 1.29, which validates against the Compose specification
schema) or ``docker compose config -q`` where the v2 plugin exists, and brought up (marker
``container`` and ``swarm``: the app and the front, on the images built from local bases).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.server import free_port
from helpers import http_get, poll_until, unavailable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dockerkit

yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate (dev extra)")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip install kubernetes-validate (dev extra)"
)

REPO = Path(__file__).resolve().parent.parent
K8S_DIR = REPO / "deploy" / "k8s"
COMPOSE = REPO / "deploy" / "compose.yaml"
# The oldest release we claim (autoscaling/v2, policy/v1 and the probes used are all GA there)
# and a recent one; kubernetes-validate ships schemas for both.
K8S_VERSIONS = ["1.30.0", "1.33.0"]
GUNICORN_GRACEFUL_TIMEOUT_DEFAULT = 30


QUEUE_HPA_DIR = K8S_DIR / "queue-hpa"
#: The Prometheus Operator's resources (PrometheusRule, ServiceMonitor), apart so that
#: `kubectl apply -f deploy/k8s/` works on a cluster without the operator. They are CRDs, and
#: kubernetes-validate ships schemas for built-in kinds only: they are checked field by field
#: in test_monitoring_resources_have_the_operators_shape instead.
MONITORING_DIR = K8S_DIR / "monitoring"
OPERATOR_API = "monitoring.coreos.com/v1"


def manifests(where: Path = K8S_DIR) -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(where.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                docs.append((f"{path.name}#{i}", doc))
    return docs


def by_kind(kind: str) -> dict:
    found = [doc for _, doc in manifests() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def dockerfile_uid() -> int:
    users = re.findall(r"^USER\s+(\d+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert users, "the Dockerfile should switch to a numeric non-root USER"
    return int(users[-1])


def app_container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


# --------------------------------------------------------------------------- Kubernetes


def test_k8s_has_deployment_service_and_hpa():
    kinds = {doc["kind"] for _, doc in manifests()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate_strictly(version):
    for name, doc in manifests() + manifests(QUEUE_HPA_DIR):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} ({doc['kind']}) is invalid for Kubernetes {version}: {exc}")


def test_strict_validation_catches_a_typo():
    """The validator really checks: a misspelt field in the Deployment is rejected."""
    doc = by_kind("Deployment")
    doc["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 40
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_pool_sizes_to_the_cpu_limit():
    container = app_container(by_kind("Deployment"))
    res = container["resources"]
    assert res["limits"]["cpu"] == res["requests"]["cpu"], "requests == limits: Guaranteed QoS"
    assert re.fullmatch(r"\d+", str(res["limits"]["cpu"])), "whole CPUs: one worker each"
    assert "memory" in res["limits"]
    assert "WEB_CONCURRENCY" not in env_of(container), "the worker count comes from the quota"


def test_grace_period_covers_gunicorns_graceful_timeout():
    deployment = by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = app_container(deployment)
    graceful = int(env_of(container).get("GRACEFUL_TIMEOUT", GUNICORN_GRACEFUL_TIMEOUT_DEFAULT))
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    pre_stop_seconds = 0
    if "exec" in pre_stop:
        cmd = pre_stop["exec"]["command"]
        assert cmd[0] == "sleep"
        pre_stop_seconds = int(cmd[1])
    elif "sleep" in pre_stop:
        pre_stop_seconds = int(pre_stop["sleep"]["seconds"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop_seconds + graceful


PROBES = ("readinessProbe", "livenessProbe", "startupProbe")


def test_probes_hit_the_app_port_and_liveness_is_never_shed():
    """Liveness and startup ask /healthz, which the queue gate never refuses; readiness asks
    /readyz, which it does, so an overloaded pod leaves rotation but is not restarted."""
    container = app_container(by_kind("Deployment"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == 8000
    paths = {probe: container[probe]["httpGet"]["path"] for probe in PROBES}
    assert paths == {
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
        "startupProbe": "/healthz",
    }
    assert all(container[probe]["httpGet"]["port"] in ("http", 8000) for probe in PROBES)
    from workers.gates.queue import EXEMPT

    assert b"/healthz" in EXEMPT and b"/readyz" not in EXEMPT


def test_queue_hpa_scales_the_deployment_on_metrics_the_adapter_serves():
    """The variant replaces hpa.yaml (same name); each Pods metric it asks for is one the
    adapter config defines, from series the kit exports."""
    deployment = by_kind("Deployment")
    docs = {doc["kind"]: doc for _, doc in manifests(QUEUE_HPA_DIR)}
    hpa, adapter = docs["HorizontalPodAutoscaler"], docs["ConfigMap"]
    assert hpa["metadata"]["name"] == by_kind("HorizontalPodAutoscaler")["metadata"]["name"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    served = {rule["name"]["as"] for rule in rules}
    assert wanted == served == {"heavyapp_queue_wait_seconds", "heavyapp_shed_per_second"}
    source = (REPO / "workers" / "gates" / "__init__.py").read_text()  # the gates' metrics
    for rule in rules:
        series = re.findall(r"(heavyapp_[a-z_]+?)(?:_sum|_count)?\{", rule["metricsQuery"])
        assert series and all(f'"{name}"' in source for name in series), rule
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_runs_non_root_on_a_read_only_root_filesystem():
    deployment = by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = app_container(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid()
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "a writable /tmp for the run directory"
    run_dir = env_of(container).get("HEAVYAPP_RUN_DIR", "/tmp/heavyapp")
    assert run_dir.startswith("/tmp/"), "run dir (control socket, crash journal) on the emptyDir"


def test_service_and_hpa_point_at_the_deployment():
    deployment = by_kind("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = by_kind("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in app_container(deployment)["ports"]}
    assert all(p["targetPort"] in port_names | {8000} for p in service["spec"]["ports"])
    hpa = by_kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    metrics = [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert metrics == ["cpu"]
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"]


def test_monitoring_resources_have_the_operators_shape() -> None:
    """The fields the operator's CRDs (v1) define and this kit uses, nothing else: a
    ServiceMonitor that selects the Service and scrapes its named port's /metrics, and a
    PrometheusRule whose every rule is a record or an alert with an expr (the rules themselves
    are checked by promtool in tests/test_alerts.py)."""
    docs = {doc["kind"]: doc for _, doc in manifests(MONITORING_DIR)}
    assert docs.keys() == {"ServiceMonitor", "PrometheusRule"}
    assert all(doc["apiVersion"] == OPERATOR_API for doc in docs.values())
    for doc in docs.values():
        assert doc.keys() == {"apiVersion", "kind", "metadata", "spec"}
        assert doc["metadata"].keys() <= {"name", "namespace", "labels", "annotations"}
    monitor = docs["ServiceMonitor"]["spec"]
    service = by_kind("Service")
    assert monitor.keys() <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    assert endpoint.keys() <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings"}
    # The kit labels requests by `endpoint` (the route): the operator's own `endpoint` target
    # label must go, or Prometheus renames the kit's and the alert rules' filters miss.
    assert {"action": "labeldrop", "regex": "endpoint"} in endpoint["relabelings"]
    assert '"endpoint"' in (REPO / "workers" / "flask_ext.py").read_text()
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert (
        endpoint["path"]
        == by_kind("Deployment")["spec"]["template"]["metadata"]["annotations"][
            "prometheus.io/path"
        ]
    )
    assert seconds(endpoint["scrapeTimeout"]) < seconds(endpoint["interval"])
    groups = docs["PrometheusRule"]["spec"]["groups"]
    assert docs["PrometheusRule"]["spec"].keys() == {"groups"}
    for group in groups:
        assert group.keys() <= {"name", "interval", "rules"} and group["rules"]
        for rule in group["rules"]:
            assert rule.keys() <= {"record", "alert", "expr", "for", "labels", "annotations"}
            assert ("record" in rule) != ("alert" in rule) and isinstance(rule["expr"], str)


# --------------------------------------------------------------------------- Compose


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m)", str(duration))
    assert m, duration
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


def test_compose_bench_has_app_locust_master_and_workers():
    services = compose()["services"]
    assert {"app", "locust-master", "locust-worker"} <= services.keys()
    app = services["app"]
    assert (REPO / app["build"]["context"].replace("..", ".") / app["build"]["dockerfile"]).exists()
    assert seconds(app["stop_grace_period"]) >= GUNICORN_GRACEFUL_TIMEOUT_DEFAULT
    assert all(p.startswith("127.0.0.1:") for p in app["ports"]), "loopback only by default"
    master = services["locust-master"]["command"]
    worker = services["locust-worker"]["command"]
    assert "--master" in master and "http://app:8000" in master
    assert "--worker" in worker and worker[worker.index("--master-host") + 1] == "locust-master"
    for cmd in (master, worker):
        locustfile = cmd[cmd.index("-f") + 1]
        assert (REPO / locustfile).exists(), f"{locustfile} should be at the top of the repo"


def test_compose_monitoring_profile_runs_prometheus_with_the_shipped_rules() -> None:
    """The optional Prometheus (``--profile monitoring``) reads deploy/prometheus/ as its
    /etc/prometheus, where the image looks for prometheus.yml, which loads the alert rules and
    scrapes the app service at the port it listens on; it publishes on loopback only."""
    services = compose()["services"]
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"], "optional: the bench runs without it"
    (volume,) = prometheus["volumes"]
    assert volume == "./prometheus:/etc/prometheus:ro"
    assert "command" not in prometheus, "the image's own --config.file=/etc/prometheus/..."
    config = yaml.safe_load((COMPOSE.parent / "prometheus" / "prometheus.yml").read_text())
    assert all((COMPOSE.parent / "prometheus" / f).exists() for f in config["rule_files"])
    (job,) = config["scrape_configs"]
    app_port = services["app"]["ports"][0].rsplit(":", 1)[1]
    assert job["static_configs"] == [{"targets": [f"app:{app_port}"]}]
    assert all(p.startswith("127.0.0.1:") for p in prometheus["ports"]), "loopback only"


def compose_cli() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return [docker, "compose"]
    return None


def test_compose_file_passes_compose_config():
    cli = compose_cli()
    if cli is None:
        unavailable(
            "no docker-compose / docker compose (apt-get install -y docker-compose)",
            "HEAVYAPP_REQUIRE_DOCKER",
        )
    proc = subprocess.run(
        [*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_puts_nginx_in_front_with_the_shipped_config():
    """nginx renders deploy/nginx/heavyapp.conf (through the template symlink) aimed at the app,
    listens where its port is published (loopback only) and waits for a healthy app."""
    services = compose()["services"]
    nginx = services["nginx"]
    env = {k: str(v) for k, v in nginx["environment"].items()}
    source, target, mode = nginx["volumes"][0].split(":")
    assert (source, mode) == ("./nginx", "ro")
    template_dir = env["NGINX_ENVSUBST_TEMPLATE_DIR"]
    assert template_dir.startswith(target + "/")
    host_templates = COMPOSE.parent / "nginx" / template_dir[len(target) + 1 :]
    (template,) = host_templates.glob("*.template")
    assert template.resolve() == (COMPOSE.parent / "nginx" / "heavyapp.conf").resolve()
    assert env["NGINX_ENVSUBST_FILTER"] == "HEAVYAPP_", "nginx's own $variables stay as written"
    app_port = services["app"]["ports"][0].rsplit(":", 1)[1]
    assert env["HEAVYAPP_UPSTREAM"] == f"app:{app_port}"
    (published,) = nginx["ports"]
    assert published.startswith("127.0.0.1:"), "loopback only by default"
    assert published.rsplit(":", 1)[1] == env["HEAVYAPP_LISTEN"]
    assert nginx["depends_on"]["app"]["condition"] == "service_healthy"


def compose_cpus() -> int:
    cpus = compose()["services"]["app"]["cpus"]
    assert float(cpus) == int(cpus), "whole CPUs: one worker each"
    return int(cpus)


@pytest.mark.container
@pytest.mark.swarm
def test_compose_comes_up_with_the_local_images_and_the_pool_matches_cpus(app_image, front_image):
    """The app and the front from deploy/compose.yaml, on the images built from local bases:
    the front answers, and the app's pool is ``cpus:`` workers (its CFS quota)."""
    cli = compose_cli()
    if cli is None:
        unavailable(
            "no docker-compose (apt-get install -y docker-compose)", "HEAVYAPP_REQUIRE_DOCKER"
        )
    project = f"heavyapp-compose-test-{os.getpid()}"
    front_port = free_port()
    env = {
        **os.environ,
        "HEAVYAPP_IMAGE": app_image,
        "NGINX_IMAGE": front_image,
        "APP_PORT": str(free_port()),
        "FRONT_PORT": str(front_port),
    }
    base = [*cli, "-f", str(COMPOSE), "-p", project]

    def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )

    try:
        up = run("up", "-d", "--no-build", "app", "nginx")
        assert up.returncode == 0, up.stdout + up.stderr
        url = f"http://127.0.0.1:{front_port}/healthz"
        status, body, _ = poll_until(
            lambda: http_get(url, timeout=5), 60, "the front's /healthz", 0.2, ignore=(OSError,)
        )
        assert status == 200 and body["status"] == "ok", body
        (app,) = run("ps", "-q", "app").stdout.split()
        nano = dockerkit.docker("inspect", "--format", "{{.HostConfig.NanoCpus}}", app).stdout
        assert int(nano) == compose_cpus() * 10**9
        pool = dockerkit.docker("exec", app, "heavyctl", "status").stdout
        workers = compose_cpus()
        assert re.search(rf"\b{workers}/{workers} workers\b", pool), pool
        logs = dockerkit.docker("logs", app).stderr
        assert f"usable {workers} " in logs, logs
    finally:
        down = run("down", "-v", "--remove-orphans", timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
