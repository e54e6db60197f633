"""The shipped Prometheus alert rules (deploy/prometheus/jetpipe-alerts.yml) are valid and name only metrics
that a running worker exports."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.ops.devstack import free_port
from tests.conftest import PROJECT, wait_for

RULES = PROJECT / "deploy" / "prometheus" / "jetpipe-alerts.yml"
#: PromQL words that are not metric names (functions, keywords), and series Prometheus makes itself.
NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
               "offset", "up"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords or label names."""
    bare = re.sub(r'"[^"]*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", bare)  # label matchers and range selectors
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)  # grouping label lists
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", bare))
    return {n for n in names if n not in NOT_METRICS and not re.fullmatch(r"\d+[smhd]?", n)}


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_every_rule_is_complete_and_says_what_to_do():
    seen = set()
    for rule in rules():
        assert rule["alert"].startswith("Jetpipe") and rule["alert"] not in seen
        seen.add(rule["alert"])
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert metric_names(rule["expr"]) or rule["expr"].startswith("up{"), rule["expr"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian: prometheus)")
def test_promtool_accepts_the_rules():
    proc = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_metric_the_rules_name_is_exported_by_a_running_worker(settings, worker_factory):
    port = free_port()
    worker_factory(settings, threads=1, PIPELINE_METRICS_PORT=port)

    def exposition() -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return None
        exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                    if line and not line.startswith("#")}
        return exported if "jetpipe_dead_letters" in exported else None  # the first inbox sweep has run

    exported = wait_for(exposition, timeout_s=60, interval_s=0.5, message="the worker's metrics")
    families = {re.sub(r"_(bucket|count|sum|created)$", "", name) for name in exported} | exported
    named = {name for rule in rules() for name in metric_names(rule["expr"])}
    assert named - families == set(), f"rules name metrics no worker exports: {sorted(named - families)}"
    assert {"jetpipe_results_parked", "jetpipe_dead_letters", "jetpipe_result_save_failures_total"} <= named


def test_metric_names_are_read_from_promql():
    assert metric_names('time() - max(a_b_seconds) > 300') == {"a_b_seconds"}
    assert metric_names('histogram_quantile(0.9, sum by (le) (rate(x_bucket{job="w"}[5m]))) > 30') == {"x_bucket"}
    assert metric_names('up{job="jetpipe-workers"} == 0') == set()


def test_the_rules_file_is_where_the_docs_say():
    assert "deploy/prometheus/jetpipe-alerts.yml" in (PROJECT / "docs" / "operations.md").read_text()
    assert Path(RULES).is_file()
