"""Job insight and recovery from the CLI: failures, retry-failed, the dead-letter queue."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from models import Job, JobStatus
from pipeline import names
from pipeline.core.jobs import retry_failed
from pipeline.infra.dlq import list_dead, replay
from tests.conftest import PROJECT, subprocess_env
from tests.helpers import dispatch, error_body, fake_job, handle_result_message, pull_tasks, success_body


def finished_with_failures(runtime, n: int, failed: int) -> Job:
    job = fake_job("moth-demo", n)
    dispatch(runtime, job.id)
    for i, (task, reply) in enumerate(sorted(pull_tasks(runtime, job.id, n), key=lambda t: int(t[0].image_id))):
        body = error_body(task.image_id, f"cannot open {task.image_id}") if i < failed else success_body(task)
        handle_result_message(runtime, job.id, body, reply, task.task_token)
    return Job.get_by_id(job.id)


def cli(settings, *args):
    return subprocess.run([sys.executable, "cli.py", *args], cwd=PROJECT, capture_output=True, text=True,
                          env={**subprocess_env(settings), "COLUMNS": "200"}, timeout=60)


def test_failures_lists_each_failed_image_with_its_reason(runtime, moth_pipeline):
    job = finished_with_failures(runtime, 6, 2)
    out = json.loads(cli(runtime.settings, "failures", str(job.id), "--json").stdout)
    assert [(r["image_id"], r["reason"]) for r in out] == [
        ("1", "processing service error: cannot open 1"), ("2", "processing service error: cannot open 2")]
    assert "cannot open 1" in cli(runtime.settings, "failures", str(job.id)).stdout


def test_watch_of_a_job_with_failures_ends_every_bar_full(runtime, moth_pipeline):
    job = finished_with_failures(runtime, 6, 2)
    proc = cli(runtime.settings, "watch", str(job.id))
    assert proc.returncode == 0, proc.stderr
    bars = {line.split()[0]: line for line in proc.stdout.splitlines() if line.split()[:1] in
            (["collect"], ["process"], ["results"])}
    assert all("6/6" in bars[name] for name in ("collect", "process", "results")), proc.stdout
    assert "failed 2" in bars["process"] and "captures 4" in bars["results"]


def test_retry_failed_completes_a_job_made_of_the_failures_of_another(runtime, moth_pipeline):
    job = finished_with_failures(runtime, 6, 2)
    assert job.status == JobStatus.SUCCESS
    retry = retry_failed(job.id)
    assert (retry.total_images, retry.name) == (2, f"retry of job {job.id} ({job.name})")
    dispatch(runtime, retry.id)
    for task, reply in pull_tasks(runtime, retry.id, 2):
        handle_result_message(runtime, retry.id, success_body(task), reply, task.task_token)
    retry = Job.get_by_id(retry.id)
    assert (retry.status, retry.progress["stages"]["process"]["failed"]) == (JobStatus.SUCCESS, 0)


def test_retry_failed_refuses_running_jobs_and_says_when_there_is_nothing_to_retry(runtime, moth_pipeline):
    running = fake_job("moth-demo", 2)
    proc = cli(runtime.settings, "retry-failed", str(running.id))
    assert proc.returncode == 1 and "is still CREATED" in proc.stderr
    # A job without failures: not an error, nothing done, and it says so
    clean = finished_with_failures(runtime, 2, 0)
    proc = cli(runtime.settings, "retry-failed", str(clean.id))
    assert proc.returncode == 0 and f"job {clean.id} has no failed images: nothing to retry" in proc.stdout
    proc = cli(runtime.settings, "retry-failed", str(clean.id), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout) == {
        "nothing_to_do": f"job {clean.id} has no failed images: nothing to retry"}
    # Cancelling an ended job changes nothing, and says so
    proc = cli(runtime.settings, "cancel", str(clean.id))
    assert proc.returncode == 0 and f"job {clean.id} already ended SUCCESS: nothing to cancel" in proc.stdout
    assert Job.get_by_id(clean.id).status == JobStatus.SUCCESS
    assert Job.select().count() == 2  # nothing was created


@pytest.fixture
def dead_run_job(runtime, moth_pipeline):
    """A run_job message dead-lettered the way Dramatiq does it, on the real broker."""
    from actors.run_job import run_job
    from pipeline.actors import broker

    job = fake_job("moth-demo", 2)
    message = run_job.message(job.id)
    broker.client.zadd(f"{names.DRAMATIQ_NAMESPACE}:{names.JOBS_QUEUE}.XQ", {"rid-1": 1_700_000_000_000})
    broker.client.hset(f"{names.DRAMATIQ_NAMESPACE}:{names.JOBS_QUEUE}.XQ.msgs", "rid-1",
                       message.copy(options={"retries": 3, "traceback": "Traceback...\nValueError: boom"}).encode())
    return job, message, broker


@pytest.mark.dead_letters  # a dead letter made on purpose, to list and replay
def test_dlq_lists_and_replays_with_a_fresh_retry_budget(runtime, dead_run_job):
    job, message, broker = dead_run_job
    [dead] = list_dead(runtime.redis)
    assert dead.as_dict()["actor"] == "run_job" and dead.as_dict()["last_error"] == "ValueError: boom"
    listing = json.loads(cli(runtime.settings, "dlq", "list", "--json").stdout)
    assert listing[0]["args"] == [job.id] and listing[0]["retries"] == 3
    [replayed] = replay(broker, runtime.redis, {"rid-1"})
    assert list_dead(runtime.redis) == []
    queued = broker.client.hvals(f"{names.DRAMATIQ_NAMESPACE}:{names.JOBS_QUEUE}.msgs")
    assert len(queued) == 1 and "retries" not in json.loads(queued[0])["options"]
    assert replayed.message.message_id == message.message_id


@pytest.mark.dead_letters  # a dead letter made on purpose, to list and replay
def test_dlq_replay_needs_ids_or_all(runtime, dead_run_job):
    proc = cli(runtime.settings, "dlq", "replay")
    assert proc.returncode == 2 and "or pass --all" in proc.stderr  # usage
    proc = cli(runtime.settings, "dlq", "replay", "nope")
    assert proc.returncode == 1 and "not in any dead-letter queue: nope" in proc.stderr
    assert "replayed 1 message(s)" in cli(runtime.settings, "dlq", "replay", "--all").stdout
