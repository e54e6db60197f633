"""Pause and resume (pipeline/core/scheduling.py) on real servers: a paused job hands out no task while the
other jobs of its pipeline run, its tasks in flight finish and are saved, no idle-time verdict counts the
paused time against it, the pause holds across a worker restart and a NATS restart, and a resumed job
ends with exact counts."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

import pytest

from models import Job, JobLog, JobStatus, utcnow
from pipeline.core import scheduling
from pipeline.core.jobs import create_job
from pipeline.core.reconciler import HealthCheck
from pipeline.errors import NothingToDo, TransientError, UserInputError
from pipeline.sdk import moth
from tests.conftest import kill_group, wait_for
from tests.helpers import dispatch, fake_job, pull_tasks
from tests.test_nats_store_loss import SYSTEM_NATS

pytestmark = pytest.mark.slow


def processed(job_id: int) -> int:
    return Job.get_by_id(job_id).progress["stages"]["process"]["processed"]


def finished(job_id: int) -> Job | None:
    job = Job.get_by_id(job_id)
    return job if job.status in JobStatus.TERMINAL else None


def in_flight(runtime, job_id: int) -> int:
    return runtime.tasks.consumer_state(job_id, moth.SLUG).num_ack_pending


def delivered(runtime, job_id: int) -> int:
    return runtime.tasks.consumer_state(job_id, moth.SLUG).num_delivered


def exact(env, job: Job, urls: list[str]) -> None:
    expected = sum(len(env.truth[u.rsplit("/", 1)[1]]) for u in urls)
    stages = job.progress["stages"]
    assert job.status == JobStatus.SUCCESS
    assert (stages["process"]["processed"], stages["process"]["failed"]) == (len(urls), 0)
    assert (stages["results"]["detections"], stages["results"]["captures"]) == (expected, len(urls))


def settled_paused(env, job_id: int) -> int:
    """Wait until the paused job's tasks in flight are answered and saved: its processed count then."""
    wait_for(lambda: in_flight(env.rt, job_id) == 0, timeout_s=60, message="tasks in flight to finish")
    time.sleep(1)  # their results reach the database
    return processed(job_id)


def test_a_paused_job_makes_no_progress_while_another_job_of_its_pipeline_runs_then_resumed_ends_exact(
        chaos_env, worker_factory, service_factory):
    env = chaos_env

    watching = threading.Event()
    watching.set()

    def slow(task):  # 50 images two at a time keep the other job busy for the 30 s watched; then at full speed
        time.sleep(1.2 if watching.is_set() else 0.05)
        return moth.process_task(task)

    worker_factory(env.base)
    service_factory(env.base, moth.SLUG, slow, concurrency=2)
    # Given a job under way, paused through the CLI
    paused_id = env.enqueue(env.base, env.urls[:40], "--project", "lab-a")
    wait_for(lambda: processed(paused_id) >= 2, timeout_s=60, message="job to be under way")
    result = env.cli(env.base, "pause", str(paused_id), "--reason", "GPU maintenance")
    assert result.returncode == 0, result.stderr
    # And another job of the same pipeline, of another project, enqueued then
    other_id = env.enqueue(env.base, env.urls, "--project", "lab-b")
    before = settled_paused(env, paused_id)
    sent = delivered(env.rt, paused_id)
    # Then for 30 s the paused job gets no task and makes no progress while the other one does
    other_start = processed(other_id)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert (processed(paused_id), delivered(env.rt, paused_id)) == (before, sent)
        assert Job.get_by_id(paused_id).status == JobStatus.STARTED
        time.sleep(1)
    assert processed(other_id) >= other_start + 10
    watching.clear()
    # When it is resumed
    result = env.cli(env.base, "resume", str(paused_id))
    assert result.returncode == 0, result.stderr
    # Then both end with exact counts, and the job log says who paused it, why, and when it was resumed
    exact(env, wait_for(lambda: finished(paused_id), timeout_s=180, message="resumed job to end"), env.urls[:40])
    exact(env, wait_for(lambda: finished(other_id), timeout_s=180, message="other job to end"), env.urls)
    log = [line.message for line in JobLog.select().where(JobLog.job == paused_id).order_by(JobLog.id)]
    assert any(line.startswith("paused by cli:") and "GPU maintenance" in line and "NATS server holds" in line
               for line in log), log
    assert any(line.startswith("resumed by cli:") for line in log), log


def test_a_pause_holds_across_a_worker_restart_and_a_nats_restart(chaos_env, worker_factory, service_factory):
    env = chaos_env

    def slow(task):
        time.sleep(0.2)
        return moth.process_task(task)

    worker = worker_factory(env.base)
    service_factory(env.base, moth.SLUG, slow, concurrency=2)
    job_id = env.enqueue(env.base, env.urls[:40])
    wait_for(lambda: processed(job_id) >= 4, timeout_s=60, message="job to be under way")
    assert env.cli(env.base, "pause", str(job_id)).returncode == 0
    before = settled_paused(env, job_id)
    # When its worker is killed and started again, and NATS restarts
    kill_group(worker)
    env.dev.nats.restart()
    worker_factory(env.base)
    # Then it stays paused: no task goes out for 10 s, the database and the consumer both say so
    wait_for(lambda: env.rt.tasks.consumer_state(job_id, moth.SLUG).exists, timeout_s=30, message="NATS back")
    sent = delivered(env.rt, job_id)
    assert sent >= before
    time.sleep(10)
    assert (processed(job_id), delivered(env.rt, job_id)) == (before, sent)
    assert Job.get_by_id(job_id).paused_at is not None
    assert any(c.paused for c in env.rt.tasks.job_consumers(moth.SLUG) if c.job_id == job_id)
    # And resumed, it ends with exact counts
    assert env.cli(env.base, "resume", str(job_id)).returncode == 0
    exact(env, wait_for(lambda: finished(job_id), timeout_s=120, message="job to end"), env.urls[:40])


def test_no_idle_verdict_counts_paused_time_and_resuming_moves_the_deadline_on(runtime, moth_pipeline):
    # Given a dispatched job with a 10-minute deadline, paused
    job = fake_job(moth_pipeline, 4, deadline_s=600, pickup_timeout_s=60)
    dispatch(runtime, job.id)
    scheduling.pause(runtime, job.id, by="test", reason="night")
    # Then NATS hands out none of its tasks
    assert pull_tasks(runtime, job.id, 4, timeout_s=1) == []
    # And a health check long past its deadline, its pickup timeout and the stalled-job cutoff judges it not
    report = HealthCheck(runtime, now=utcnow() + dt.timedelta(hours=3)).run()
    assert str(job.id) not in report["deadlines"]["jobs"] and str(job.id) not in report["lost_images"]["jobs"]
    assert str(job.id) not in report["stale_jobs"]["jobs"]
    assert Job.get_by_id(job.id).status == JobStatus.STARTED and processed(job.id) == 0
    # When it is resumed after two hours paused
    was = Job.get_by_id(job.id)
    Job.update(paused_at=was.paused_at - dt.timedelta(hours=2)).where(Job.id == job.id).execute()
    scheduling.resume(runtime, job.id, by="test")
    # Then its deadline and its idle clock moved on by those two hours, and its tasks go out again
    now = Job.get_by_id(job.id)
    moved = (now.deadline_at - was.deadline_at).total_seconds()
    assert 7200 <= moved < 7230
    assert now.last_progress_at > utcnow() - dt.timedelta(minutes=5) and now.paused_s >= 7200
    assert len(pull_tasks(runtime, job.id, 4)) == 4


def test_a_job_paused_before_dispatch_gets_a_paused_consumer(runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 3)
    scheduling.pause(runtime, job.id, by="test")
    dispatch(runtime, job.id)
    consumer = next(c for c in runtime.tasks.job_consumers(moth_pipeline) if c.job_id == job.id)
    assert consumer.paused and consumer.metadata["paused"] == "true"
    assert pull_tasks(runtime, job.id, 3, timeout_s=1) == []
    scheduling.resume(runtime, job.id, by="test")
    consumer = next(c for c in runtime.tasks.job_consumers(moth_pipeline) if c.job_id == job.id)
    assert not consumer.paused and consumer.metadata["paused"] == "false"
    assert len(pull_tasks(runtime, job.id, 3)) == 3


def test_what_cannot_be_paused_or_resumed_says_why(runtime, moth_pipeline, trap_images):
    internal = create_job(moth.SLUG, [f"file://{trap_images[0]}/x.png"], dispatch_mode="internal")
    with pytest.raises(UserInputError, match="only async_api jobs"):
        scheduling.pause(runtime, internal.id, by="test")
    job = fake_job(moth_pipeline, 2)
    with pytest.raises(NothingToDo, match="is not paused"):
        scheduling.resume(runtime, job.id, by="test")
    scheduling.pause(runtime, job.id, by="test")
    with pytest.raises(NothingToDo, match="already paused"):
        scheduling.pause(runtime, job.id, by="test")
    Job.update(status=JobStatus.REVOKED).where(Job.id == job.id).execute()
    with pytest.raises(NothingToDo, match="already ended"):
        scheduling.resume(runtime, job.id, by="test")


@pytest.mark.skipif(SYSTEM_NATS is None, reason="no system nats-server (older than 2.11) here")
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_on_a_nats_server_that_cannot_pause_a_consumer_the_job_log_says_so(make_stack, db_url, moth_pipeline):
    from pipeline.infra.runtime import Runtime, set_runtime
    from tests.conftest import make_settings

    rt = Runtime(make_settings(db_url, make_stack(SYSTEM_NATS)), name="jetpipe-old-nats")
    previous = set_runtime(rt)
    try:
        job = fake_job(moth_pipeline, 2)
        dispatch(rt, job.id)
        scheduling.pause(rt, job.id, by="test")
        line = JobLog.select().where(JobLog.job == job.id).order_by(JobLog.id.desc()).get()
        assert line.level == logging.getLevelName(logging.INFO)
        assert "cannot pause a consumer" in line.message and "the gateway hands out none" in line.message
        report = HealthCheck(rt, now=utcnow() + dt.timedelta(days=2)).run()  # past the 24 h pickup timeout
        assert Job.get_by_id(job.id).status == JobStatus.STARTED, report
    finally:
        set_runtime(previous)
        rt.close()


def test_pause_and_resume_through_the_cli_say_what_they_did_and_refuse_clearly(chaos_env):
    env = chaos_env
    job_id = env.enqueue(env.base, env.urls[:2])
    paused = env.cli(env.base, "pause", str(job_id), "--json")
    assert paused.returncode == 0 and '"paused": true' in paused.stdout
    again = env.cli(env.base, "pause", str(job_id))
    assert again.returncode == 0 and "already paused" in again.stdout
    missing = env.cli(env.base, "resume", "999999")
    assert missing.returncode == 1 and missing.stderr.strip() == "error: no job 999999"
    assert env.cli(env.base, "resume", str(job_id)).returncode == 0
    assert Job.get_by_id(job_id).paused_at is None


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_with_nats_unreachable_a_pause_or_a_resume_changes_nothing_and_says_so(private_runtime):
    rt, dev = private_runtime
    job = fake_job(moth.SLUG, 2)
    dispatch(rt, job.id)
    rt.tasks.timeout_s = 5  # fail quickly while NATS is down
    dev.nats.stop()
    with pytest.raises(TransientError, match=f"job {job.id} was not paused"):
        scheduling.pause(rt, job.id, by="test")
    assert Job.get_by_id(job.id).paused_at is None
    dev.nats.start()
    wait_for(lambda: rt.tasks.queue.nc.is_connected, timeout_s=15, message="NATS reconnect")
    scheduling.pause(rt, job.id, by="test")
    was = Job.get_by_id(job.id)
    dev.nats.stop()
    with pytest.raises(TransientError, match=f"job {job.id} is still paused"):
        scheduling.resume(rt, job.id, by="test")
    now = Job.get_by_id(job.id)
    assert (now.paused_at, now.paused_s, now.last_progress_at) == (was.paused_at, was.paused_s, was.last_progress_at)
