"""Write deploy/k8s/monitoring/prometheus-rule.yaml: heavyapp-rules.yaml, as it is, as the
``spec`` of a kube-prometheus ``PrometheusRule`` (the operator loads its spec as a rule file).

Run it after changing the rules: ``python deploy/prometheus/prometheusrule.py``;
tests/test_alerts.py fails while the two differ.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE / "heavyapp-rules.yaml"
TARGET = HERE.parent / "k8s" / "monitoring" / "prometheus-rule.yaml"
HEADER = """\
# GENERATED from deploy/prometheus/heavyapp-rules.yaml by deploy/prometheus/prometheusrule.py:
# edit the rules file, then run the script. The heavyapp alerts for the Prometheus Operator
# (kube-prometheus). Its Prometheus picks PrometheusRules by label (ruleSelector): kube-prometheus
# selects prometheus=k8s and role=alert-rules, as below; the kube-prometheus-stack Helm chart
# selects release=<its release name> unless ruleSelectorNilUsesHelmValues is false. The
# ServiceMonitor (servicemonitor.yaml) makes job="heavyapp", which HeavyappDown matches. Apply
# this directory only where the operator's CRDs exist: kubectl apply -f deploy/k8s/monitoring/
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: heavyapp
  labels:
    app.kubernetes.io/name: heavyapp
    app.kubernetes.io/component: web
    prometheus: k8s
    role: alert-rules
spec:
"""


def render() -> str:
    """The manifest: the header, then every line of the rules file below ``spec:``."""
    lines = [line for line in RULES.read_text().splitlines() if not line.startswith("#")]
    body = "\n".join(f"  {line}" if line else "" for line in lines).strip("\n")
    return HEADER + body + "\n"


if __name__ == "__main__":
    TARGET.write_text(render())
    print(f"wrote {TARGET}")
