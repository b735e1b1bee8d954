"""Alert rules: the plain rules file (Compose's Prometheus) and the
PrometheusRule (infra/k8s) hold the same rules; each has what an operator
needs; promtool, where installed, checks them and runs their unit tests
(tests/infra/alert_rules_test.yml). Their expressions are checked against
live /metrics in tests/infra/test_dashboard.py."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "infra" / "prometheus" / "rules" / "genq.rules.yml"
PROMETHEUS_RULE = ROOT / "infra" / "k8s" / "prometheus-rule.yaml"
UNIT_TESTS = Path(__file__).with_name("alert_rules_test.yml")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus)")

# What the issue asks to be alerted on, by the alert that does it.
REQUIRED = {"GenqOldestQueuedJobTooOld", "GenqPoolHasNoWorker", "GenqWebhookFailureRateHigh",
            "GenqJobFailureRateHigh", "GenqApi5xxRateHigh"}


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_the_prometheus_rule_holds_the_same_groups_as_the_rules_file():
    doc = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["name"]
    assert doc["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], \
        "infra/k8s/prometheus-rule.yaml and infra/prometheus/rules/genq.rules.yml differ: edit both"


def test_every_alert_the_issue_asks_for_is_there_with_severity_and_words():
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names))
    assert REQUIRED <= set(names), REQUIRED - set(names)
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        # A `for` keeps a blip (one scrape, a pool's cold start) from paging anyone.
        assert rule.get("for"), rule["alert"]


@needs_promtool
def test_promtool_checks_the_rules():
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_checks_the_compose_prometheus_config():
    config = ROOT / "infra" / "prometheus" / "prometheus.yml"
    out = subprocess.run([PROMTOOL, "check", "config", "--syntax-only", str(config)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_the_alerts_fire_when_and_only_when_they_should(tmp_path):
    # The unit tests state labels, not annotation texts: promtool compares
    # annotations too, so it gets the rules without them.
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(doc))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    out = subprocess.run([PROMTOOL, "test", "rules", UNIT_TESTS.name], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
