"""Monitoring as deployed: scrape configuration in deploy/, and the alert rules, unit-tested
with promtool.

promtool comes with Debian's `prometheus` package. Without it these tests skip, unless
REQUIRE_SYSTEM_TOOLS=1 (CI) makes its absence a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
UNIT_TESTS = Path(__file__).with_name("alerts_test.yaml")


def deployment(component: str) -> dict:
    documents = yaml.safe_load_all((ROOT / "deploy" / f"{component}.yaml").read_text())
    return next(d for d in documents if d["kind"] == "Deployment")


@pytest.mark.parametrize("component", ["api", "worker"])
def test_both_processes_serve_metrics_where_prometheus_looks(component):
    pod = deployment(component)["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["METRICS_PORT"] == str(port)
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    # The Prometheus Operator alternative scrapes the same named port on the same pods.
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_the_monitoring_kustomization_lists_its_files():
    listed = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())["resources"]
    present = {p.name for p in MONITORING.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == present


@pytest.fixture
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        reason = "promtool is not on PATH (apt-get install prometheus)"
        if os.environ.get("REQUIRE_SYSTEM_TOOLS") == "1":
            pytest.fail(f"{reason}; REQUIRE_SYSTEM_TOOLS=1 requires it")
        pytest.skip(reason)
    return found


@pytest.fixture
def rules_dir(tmp_path) -> Path:
    """The PrometheusRule's `spec` as the plain rules file a Prometheus without the operator
    loads, beside the unit tests that name it."""
    spec = yaml.safe_load(ALERTS.read_text())["spec"]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    return tmp_path


def run(promtool: str, *args: str, cwd: Path) -> str:
    done = subprocess.run(  # noqa: S603
        [promtool, *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_rules_are_valid(promtool, rules_dir):
    assert "SUCCESS" in run(promtool, "check", "rules", "rules.yml", cwd=rules_dir)


def test_each_alert_fires_when_it_should_and_not_before(promtool, rules_dir):
    assert "SUCCESS" in run(promtool, "test", "rules", UNIT_TESTS.name, cwd=rules_dir)


def test_every_alert_is_unit_tested():
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["spec"]["groups"]
              for r in g["rules"]}  # fmt: skip
    tested = {
        case["alertname"]
        for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert alerts == tested, f"alerts never seen firing in {UNIT_TESTS.name}: {alerts - tested}"
