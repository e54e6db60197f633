"""A pipeline's backlog for autoscalers (pipeline/infra/backlog.py) on real servers: what it counts and the stats
API (the gauges a running worker exports, and the shipped KEDA example's query over them on a real Prometheus:
tests/test_monitoring.py)."""

from __future__ import annotations

import time

import httpx

from pipeline.infra import backlog, presence
from tests.conftest import PROJECT
from tests.helpers import dispatch, fake_job, pull_tasks
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
