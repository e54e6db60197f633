"""What ships for the operator's monitoring (deploy/): the Prometheus alert rules, the Grafana dashboard and the
KEDA ScaledObject are valid, name only metrics a running worker exports, and, on a real Prometheus scraping a
real worker, every rule evaluates, every dashboard query runs and the KEDA query returns the backlog."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline import names
from pipeline.ops.devstack import free_port
from tests.conftest import PROJECT, wait_for
from tests.helpers import dispatch, fake_job, pull_tasks
from tests.prometheus import BINARY, Prometheus

RULES = PROJECT / "deploy" / "prometheus" / "jetpipe-alerts.yml"
DASHBOARD = PROJECT / "deploy" / "grafana" / "jetpipe-dashboard.json"
KEDA = PROJECT / "deploy" / "keda" / "processing-service-scaledobject.yaml"
#: Where the KEDA ScaledObject CRD can be read from (a file or URL; the tests do without it if it cannot).
KEDA_CRD = os.environ.get("JETPIPE_KEDA_CRD") or \
    "https://raw.githubusercontent.com/kedacore/keda/v2.16.0/config/crd/bases/keda.sh_scaledobjects.yaml"
#: PromQL words that are not metric names (functions, keywords), and series Prometheus makes itself.
NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
               "offset", "up"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords or label names."""
    bare = re.sub(r'"[^"]*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", bare)  # label matchers and range selectors
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)  # grouping label lists
    names_ = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", bare))
    return {n for n in names_ if n not in NOT_METRICS and not re.fullmatch(r"\d+[smhd]?", n)}


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_queries() -> dict[str, str]:
    """Each dashboard query, by `<panel title> / <refId>`, with the dashboard's `$pipeline` variable at All."""
    dashboard = json.loads(DASHBOARD.read_text())
    return {f"{panel['title']} / {target['refId']}": target["expr"].replace("$pipeline", ".*")
            for panel in dashboard["panels"] for target in panel["targets"]}


def keda_query() -> str:
    [trigger] = yaml.safe_load(KEDA.read_text())["spec"]["triggers"]
    return trigger["metadata"]["query"]


def shipped_exprs() -> dict[str, str]:
    return {**{f"rule {r['alert']}": r["expr"] for r in rules()}, **dashboard_queries(), "keda": keda_query()}


# ---- the files themselves -------------------------------------------------------------------------------
def test_every_rule_is_complete_and_says_what_to_do():
    seen = set()
    for rule in rules():
        assert rule["alert"].startswith("Jetpipe") and rule["alert"] not in seen
        seen.add(rule["alert"])
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert metric_names(rule["expr"]) or rule["expr"].startswith(("up{", "sum(up{")), rule["expr"]
    # the alerts the operator's toolbox asks for
    assert {"JetpipeNoWorker", "JetpipeBacklogGrowing", "JetpipeNoServiceServing", "JetpipeResultsNotSaved",
            "JetpipeDeadLetters", "JetpipeJobStuck", "JetpipeOutage"} <= seen


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian: prometheus)")
def test_promtool_accepts_the_rules():
    proc = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_dashboard_covers_what_an_operator_watches():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for topic in ("throughput", "backlog", "oldest", "failures by reason", "saving latency", "dead letters",
                  "outages"):
        assert topic in titles, topic
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"]
    for panel in dashboard["panels"]:  # every query through the dashboard's datasource variable
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"]
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "pipeline"}


def test_the_keda_example_is_a_scaled_object_on_the_backlog():
    scaled = yaml.safe_load(KEDA.read_text())
    assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] and scaled["spec"]["maxReplicaCount"] >= 1
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and float(trigger["metadata"]["threshold"]) > 0
    assert all(isinstance(value, str) for value in trigger["metadata"].values())  # KEDA reads strings only
    assert metric_names(keda_query()) == {"jetpipe_pipeline_tasks_waiting", "jetpipe_pipeline_tasks_in_flight"}


def strict(schema: dict) -> dict:
    """A CRD's structural schema as JSON Schema that refuses unknown fields (Kubernetes prunes them silently,
    so a misspelt key would be lost without a word), except where the schema keeps unknown fields."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if (schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        return [strict(item) for item in schema]  # type: ignore[return-value]
    return schema


def crd_schema(crd: dict, version: str) -> dict:
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return strict(served["schema"]["openAPIV3Schema"])


def test_a_crd_schema_refuses_a_misspelt_field():
    crd = {"spec": {"versions": [{"name": "v1alpha1", "schema": {"openAPIV3Schema": {
        "type": "object", "properties": {"spec": {"type": "object", "required": ["scaleTargetRef"], "properties": {
            "scaleTargetRef": {"type": "object", "properties": {"name": {"type": "string"}}},
            "triggers": {"type": "array", "items": {"type": "object", "properties": {
                "metadata": {"type": "object", "additionalProperties": {"type": "string"}}}}}}}}}}}]}}
    schema = crd_schema(crd, "v1alpha1")
    jsonschema.validate({"spec": {"scaleTargetRef": {"name": "x"}, "triggers": [{"metadata": {"query": "q"}}]}},
                        schema)
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        jsonschema.validate({"spec": {"scaleTargetRef": {"name": "x"}, "maxReplicas": 3}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"spec": {"scaleTargetRef": {"name": "x"}, "triggers": [{"metadata": {"t": 200}}]}},
                            schema)


def test_the_keda_example_validates_against_keda_s_crd():
    try:
        if re.match(r"https?://", KEDA_CRD):
            with urllib.request.urlopen(KEDA_CRD, timeout=5) as response:
                text = response.read().decode()
        else:
            text = Path(KEDA_CRD).read_text()
    except OSError as exc:
        pytest.skip(f"KEDA's ScaledObject CRD cannot be read here ({KEDA_CRD}: {exc}); set JETPIPE_KEDA_CRD to a copy")
    scaled = yaml.safe_load(KEDA.read_text())
    jsonschema.validate(scaled, crd_schema(yaml.safe_load(text), scaled["apiVersion"].split("/")[1]))


# ---- on a running worker ----------------------------------------------------------------------------------
def exported_names(port: int) -> set[str] | None:
    """The metric names a worker's /metrics exports, once its first sweep has exported its gauges."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    return exported if {"jetpipe_dead_letters", "jetpipe_pipeline_tasks_waiting"} <= exported else None


def test_every_metric_the_rules_and_the_dashboard_name_is_exported_by_a_running_worker(settings, moth_pipeline,
                                                                                       runtime, worker_factory):
    port = free_port()
    worker_factory(settings, threads=1, PIPELINE_METRICS_PORT=port)
    runtime.send(names.RUN_JOB, 999_999)  # a message for Dramatiq's own metrics (no such job: nothing to do)
    exported = wait_for(lambda: (found := exported_names(port)) and "dramatiq_messages_total" in found and found,
                        timeout_s=60, interval_s=0.5, message="the worker's metrics")
    named = {name for expr in shipped_exprs().values() for name in metric_names(expr)}
    assert named - exported == set(), f"deploy/ names metrics no worker exports: {sorted(named - exported)}"
    assert {"jetpipe_results_parked", "jetpipe_dead_letters", "jetpipe_image_failures_total",
            "jetpipe_outage", "jetpipe_task_ack_wait_seconds", "jetpipe_job_longest_idle_seconds"} <= named


@pytest.mark.skipif(BINARY is None, reason="prometheus is not installed (Debian: prometheus; .ci/run installs it)")
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_on_a_real_prometheus_every_rule_evaluates_every_query_runs_and_keda_reads_the_backlog(
        settings, runtime, moth_pipeline, worker_factory, tmp_path):
    # Given a job of 5 tasks, 2 of them in a service's hands, and a worker Prometheus scrapes
    job = fake_job(moth_pipeline, 5)
    dispatch(runtime, job.id)
    pull_tasks(runtime, job.id, 2)
    port = free_port()
    worker_factory(settings, threads=1, PIPELINE_METRICS_PORT=port)
    runtime.send(names.RUN_JOB, job.id)  # (already running: nothing to do, but Dramatiq's metrics appear)
    prometheus = Prometheus(tmp_path, [f"127.0.0.1:{port}"], [RULES]).ready()
    try:
        # Then the KEDA query answers the backlog: tasks waiting plus tasks in flight
        wait_for(lambda: prometheus.value(keda_query()) == 5, timeout_s=60, interval_s=0.5,
                 message=f"the KEDA query to return 5 (it returns {prometheus.query(keda_query())})")
        assert prometheus.value('max(jetpipe_pipeline_tasks_in_flight{pipeline="moth-demo"})') == 2
        assert prometheus.value("max(jetpipe_task_ack_wait_seconds)") == settings.nats_task_ttr
        # every dashboard query runs
        for expr in dashboard_queries().values():
            prometheus.query(expr)  # (raises naming the query if Prometheus refuses it)
        # and every rule is evaluated without an error
        def evaluated() -> list[dict] | None:
            found = [r for r in prometheus.rules() if r["type"] == "alerting"]
            return found if found and all(r.get("lastEvaluation", "").startswith("2") and
                                          not r["lastEvaluation"].startswith("0001") for r in found) else None

        evaluated_rules = wait_for(evaluated, timeout_s=30, interval_s=0.5, message="every rule to be evaluated")
        assert {r["name"] for r in evaluated_rules} == {r["alert"] for r in rules()}
        assert [(r["name"], r["lastError"]) for r in evaluated_rules if r["health"] != "ok"] == []
        # a worker is up: the "no worker" alert's expression finds nothing
        assert prometheus.query(next(r["expr"] for r in rules() if r["alert"] == "JetpipeNoWorker")) == []
    finally:
        prometheus.stop()


def test_metric_names_are_read_from_promql():
    assert metric_names('time() - max(a_b_seconds) > 300') == {"a_b_seconds"}
    assert metric_names('histogram_quantile(0.9, sum by (le) (rate(x_bucket{job="w"}[5m]))) > 30') == {"x_bucket"}
    assert metric_names('up{job="jetpipe-workers"} == 0') == set()
    assert metric_names('10 * scalar(max(y_seconds)) and max by (pipeline) (z) == 0') == {"y_seconds", "z"}


def test_the_shipped_files_are_where_the_docs_say():
    operations = (PROJECT / "docs" / "operations.md").read_text()
    for path in (RULES, DASHBOARD, KEDA):
        assert str(path.relative_to(PROJECT)) in operations
