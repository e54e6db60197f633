"""A pipeline's backlog for autoscalers (pipeline/infra/backlog.py) on real servers: the stats API, the gauges a
running worker exports, and the shipped KEDA example's query over them."""

from __future__ import annotations

import re
import time
import urllib.request

import httpx
import pytest
import yaml

from pipeline.infra import backlog, presence
from pipeline.ops.devstack import free_port
from tests.conftest import PROJECT, wait_for
from tests.helpers import dispatch, fake_job, pull_tasks
from tests.test_alert_rules import metric_names
from tests.web_helpers import TOKENS_SETTING, WebServer, bearer

KEDA = PROJECT / "deploy" / "keda" / "processing-service-scaledobject.yaml"


def test_a_pipelines_backlog_counts_waiting_and_in_flight_tasks_and_the_oldest_ones_age(runtime, moth_pipeline):
    first = fake_job(moth_pipeline, 5)
    dispatch(runtime, first.id)
    second = fake_job(moth_pipeline, 3, prefix="file:///nowhere/other")
    dispatch(runtime, second.id)
    time.sleep(1.2)
    assert len(pull_tasks(runtime, first.id, 2)) == 2
    presence.service_seen(runtime.redis, "gpu-lab", pipeline=moth_pipeline, job_id=first.id, reserved=1)
    got = backlog.backlogs(runtime.tasks, runtime.redis)[moth_pipeline]
    assert (got.jobs, got.tasks_waiting, got.tasks_in_flight, got.http_services) == (2, 6, 2, 1)
    assert 1.0 <= got.oldest_waiting_s < 60 and got.last_delivery_s is not None and got.last_delivery_s < 30
    assert backlog.backlogs(runtime.tasks, pipeline="other") == {"other": backlog.Backlog("other")}


def test_the_stats_api_answers_a_pipelines_backlog(settings, runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 4)
    dispatch(runtime, job.id)
    server = WebServer(settings.with_overrides(web_tokens=TOKENS_SETTING), runtime).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as web:
            stats = web.get(f"/api/v1/pipelines/{moth_pipeline}/stats", headers=bearer("vic")).json()
            assert (stats["pipeline"], stats["tasks_waiting"], stats["tasks_in_flight"]) == (moth_pipeline, 4, 0)
            assert web.get("/api/v1/pipelines/nope/stats", headers=bearer("vic")).status_code == 404
            assert web.get(f"/api/v1/pipelines/{moth_pipeline}/stats", headers=bearer("lab")).status_code == 403
    finally:
        server.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_keda_examples_query_returns_the_backlog_a_running_worker_exports(settings, runtime, moth_pipeline,
                                                                             worker_factory):
    scaled = yaml.safe_load(KEDA.read_text())
    assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] and scaled["spec"]["maxReplicaCount"] >= 1
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and float(trigger["metadata"]["threshold"]) > 0
    query = trigger["metadata"]["query"]
    # Given a job of 5 tasks, 2 of them taken by a service, and a worker exporting its metrics
    job = fake_job(moth_pipeline, 5)
    dispatch(runtime, job.id)
    pull_tasks(runtime, job.id, 2)
    port = free_port()
    worker_factory(settings, threads=1, PIPELINE_METRICS_PORT=port)

    def samples() -> dict[str, float] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return None
        found = {m.group(1): float(m.group(2)) for m in re.finditer(
            r'^(jetpipe_pipeline_\w+)\{pipeline="moth-demo"\} (\S+)$', text, re.MULTILINE)}
        return found or None

    exported = wait_for(samples, timeout_s=60, interval_s=0.5, message="the worker's backlog gauges")
    # Then every metric the query names is exported, and the query (a sum of two series) is the backlog
    assert metric_names(query) <= set(exported), (metric_names(query), exported)
    assert sum(exported[name] for name in metric_names(query)) == 5
    assert (exported["jetpipe_pipeline_tasks_waiting"], exported["jetpipe_pipeline_tasks_in_flight"]) == (3, 2)
    assert "deploy/keda/processing-service-scaledobject.yaml" in (PROJECT / "docs" / "operations.md").read_text()
