"""Chaos scenarios (docs/chaos-scenarios.md) with real servers, `dramatiq pipeline.actors` worker
subprocesses and jobs enqueued through the CLI, as an operator would. Scenarios F (NATS unreachable
during a health tick) and G (late result after reconciliation) are in test_health.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import pytest
import redis

from models import Job, JobImage, JobStatus
from pipeline.infra.aio import LoopThread
from pipeline.ops import chaos
from pipeline.schemas import Task, encode
from pipeline.sdk import moth
from tests.conftest import wait_for
from tests.helpers import raw_service

pytestmark = pytest.mark.slow
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def slow_moth(task):
    time.sleep(0.05)
    return moth.process_task(task)


def finished(job_id: int):
    job = Job.get_by_id(job_id)
    return job if job.status in JobStatus.TERMINAL else None


def processed(job_id: int) -> int:
    return Job.get_by_id(job_id).progress["stages"]["process"]["processed"]


def assert_exact(env, job: Job, n: int, *, first: int = 0) -> None:
    """`job` (over urls[first:first + n]) ended SUCCESS with every count equal to the ground truth."""
    expected = sum(len(env.truth[u.rsplit("/", 1)[1]]) for u in env.urls[first:first + n])
    stages = job.progress["stages"]
    assert job.status == JobStatus.SUCCESS
    assert (stages["process"]["processed"], stages["process"]["failed"]) == (n, 0)
    assert (stages["results"]["detections"], stages["results"]["captures"]) == (expected, n)


def job_under_way(env, worker_factory, service_factory):
    """A worker, the reference service (slowed down), a 40-image job of project lab-a a quarter done, and a
    10-image high-priority job of project lab-b enqueued then (the service takes it first: the scenarios run
    with jobs re-ordered between projects): (worker, job id, other job id)."""
    worker = worker_factory(env.base)
    service_factory(env.base, moth.SLUG, slow_moth, concurrency=2)
    job_id = env.enqueue(env.base, env.urls[:40], "--project", "lab-a")
    wait_for(lambda: processed(job_id) >= 10, timeout_s=60, message="job to be under way")
    other_id = env.enqueue(env.base, env.urls[40:50], "--project", "lab-b", "--priority", "high")
    return worker, job_id, other_id


def both_exact(env, job_id: int, other_id: int, *, timeout_s: float, after: str) -> None:
    job = wait_for(lambda: finished(job_id), timeout_s=timeout_s, message=f"job to finish {after}")
    assert_exact(env, job, 40)
    other = wait_for(lambda: finished(other_id), timeout_s=timeout_s, message=f"other project's job to finish {after}")
    assert_exact(env, other, 10, first=40)


def test_a_redis_flush_mid_job_still_completes_with_exact_counts(chaos_env, worker_factory, service_factory):
    env = chaos_env
    _, job_id, other_id = job_under_way(env, worker_factory, service_factory)
    chaos.flush_redis(env.base.redis_url)  # job state, queued results, heartbeats: all gone
    both_exact(env, job_id, other_id, timeout_s=120, after="after the flush")


def test_a_nats_restart_mid_job_still_completes(chaos_env, worker_factory, service_factory):
    env = chaos_env
    _, job_id, other_id = job_under_way(env, worker_factory, service_factory)
    env.dev.nats.restart()  # SIGTERM, then the same port and store
    both_exact(env, job_id, other_id, timeout_s=120, after="after the restart")


def test_a_killed_worker_is_replaced_and_the_job_completes_within_a_minute(chaos_env, worker_factory,
                                                                          service_factory):
    env = chaos_env
    master, job_id, other_id = job_under_way(env, worker_factory, service_factory)
    wait_for(lambda: chaos.worker_pids(master.pid), timeout_s=10, message="worker process")
    assert chaos.kill_worker(master.pid)
    killed_at = time.monotonic()
    master.wait(30)  # the dramatiq master exits when a worker dies; a supervisor starts it again:
    worker_factory(env.base)
    both_exact(env, job_id, other_id, timeout_s=60, after="within 60 s of the kill")
    assert time.monotonic() - killed_at < 60


@SQLITE_ONLY  # about processes and NATS, not the database
@pytest.mark.parametrize("how", ["group", "main pid"])
def test_a_worker_stopped_by_sigterm_exits_within_10_s_and_another_finishes_the_job(
        chaos_env, worker_factory, service_factory, how):
    # Given a job under way on its only worker (a dramatiq master and its worker process)
    env = chaos_env
    master, job_id, other_id = job_under_way(env, worker_factory, service_factory)
    # When SIGTERM goes to its process group (systemd, docker, `kill -TERM -PGID`), or to the master alone
    stopped_at = time.monotonic()
    (os.killpg if how == "group" else os.kill)(master.pid, signal.SIGTERM)
    # Then it has stopped within 10 s, having shut down cleanly
    master.wait(10)
    assert time.monotonic() - stopped_at < 10
    logs = worker_factory.logs()
    assert "cannot schedule new futures" not in logs and "Killing worker process" not in logs
    # And a new worker finishes the job with exact counts
    worker_factory(env.base)
    both_exact(env, job_id, other_id, timeout_s=90, after="on the new worker")


@SQLITE_ONLY  # about processes and NATS, not the database
def test_a_second_stop_signal_ends_a_worker_at_once(chaos_env, worker_factory):
    # Given a worker that is busy stopping (Ctrl-C once: the master forwards SIGTERM to its worker process)
    env = chaos_env
    master = worker_factory(env.base)
    wait_for(lambda: "ready for action" in worker_factory.logs(), timeout_s=30, message="worker to boot")
    wait_for(lambda: chaos.worker_pids(master.pid), timeout_s=10, message="worker process")
    os.killpg(master.pid, signal.SIGINT)
    time.sleep(1.0)
    # When Ctrl-C is pressed again
    second_at = time.monotonic()
    os.killpg(master.pid, signal.SIGINT)
    # Then everything is gone within a few seconds
    master.wait(10)
    assert time.monotonic() - second_at < 5
    assert not chaos.worker_pids(master.pid)


@SQLITE_ONLY  # about processes, not the database
def test_a_worker_process_that_crashes_in_native_code_leaves_its_threads_tracebacks_in_the_log(
        chaos_env, worker_factory):
    # Given a running worker
    master = worker_factory(chaos_env.base)
    wait_for(lambda: "ready for action" in worker_factory.logs(), timeout_s=30, message="worker to boot")
    [child] = wait_for(lambda: chaos.worker_pids(master.pid), timeout_s=10, message="worker process")
    # When its worker process dies of a segmentation fault (a C extension's crash)
    os.kill(child, signal.SIGSEGV)
    # Then the master stops (its supervisor restarts it), and the log shows where every thread was
    assert master.wait(30) is not None
    logs = worker_factory.logs()
    assert "Fatal Python error: Segmentation fault" in logs
    assert "Thread 0x" in logs and "most recent call first" in logs


def test_images_exhausting_max_deliver_are_failed_within_seconds(chaos_env, worker_factory):
    # Given ack_wait 2 s, max_deliver 2, and a service that keeps pulling but drops 3 images' tasks
    env = chaos_env
    s = env.settings(PIPELINE_NATS_TASK_TTR=2, PIPELINE_NATS_MAX_DELIVER=2)
    worker_factory(s)
    urls = env.urls[:12]
    dropped = {u.rsplit("/", 1)[1] for u in urls[:3]}

    def answer(task):
        if task["image_url"].rsplit("/", 1)[1] in dropped:
            return None
        return json.loads(encode(moth.process_task(Task(**task))))

    loop = LoopThread()
    stop = asyncio.Event()
    service = loop.spawn(raw_service(s.nats_url, moth.SLUG, stop, answer))
    try:
        started = time.monotonic()
        job_id = env.enqueue(s, urls)
        job = wait_for(lambda: finished(job_id), timeout_s=60, message="job to finish")
        elapsed = time.monotonic() - started
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        service.result(timeout=10)
        loop.stop()
    # Then JetStream gave up after 2 deliveries (~4 s) and the fast path failed them within ack_wait + 10 s
    assert elapsed < 2 * 2 + 2 + 10, elapsed
    assert (job.status, job.progress["stages"]["process"]["failed"]) == (JobStatus.SUCCESS, 3)
    reasons = {r.error for r in JobImage.select().where((JobImage.job == job_id) & (JobImage.status == "failed"))}
    assert reasons == {"lost: JetStream gave up after 2 deliveries (max_deliver=2) without a result"}


def test_with_no_service_nothing_is_failed_and_health_says_why(chaos_env, worker_factory, service_factory):
    # Given workers checking health every second with a 3 s idle cutoff, and no processing service
    env = chaos_env
    s = env.settings(PIPELINE_NATS_TASK_TTR=1, PIPELINE_HEALTH_CHECK_SECONDS=1,
                     PIPELINE_STALLED_JOBS_MAX_MINUTES=0.05)
    worker_factory(s)
    assert env.cli(s, "health").returncode == 0  # healthy: nothing waits yet
    job_id = env.enqueue(s, env.urls[:5])
    # When several health checks have run past the cutoff
    time.sleep(8)
    last = json.loads(redis.Redis.from_url(s.redis_url).get("jetpipe:health:last"))
    assert last["lost_images"]["jobs"] == {str(job_id): "waiting"}
    # Then nothing was failed or revoked, and `health` is degraded and says why
    job = Job.get_by_id(job_id)
    assert (job.status, job.progress["stages"]["process"]["failed"]) == (JobStatus.STARTED, 0)
    report = env.cli(s, "health")
    assert report.returncode == 1, report.stdout + report.stderr
    assert f"job {job_id} waits: no processing service has pulled tasks for pipeline moth-demo" in report.stdout
    # When the service comes back, the job completes and health is healthy again
    service_factory(s, moth.SLUG, moth.process_task)
    wait_for(lambda: finished(job_id), timeout_s=60, message="job to finish once a service pulls")
    assert env.cli(s, "health").returncode == 0


def test_health_exits_3_when_a_dependency_is_unreachable(chaos_env):
    env = chaos_env
    env.dev.redis.stop()
    proc = env.cli(env.base, "health", "--json")
    assert proc.returncode == 3
    report = json.loads(proc.stdout)
    assert report["dependencies"]["redis"]["reachable"] is False
    assert report["dependencies"]["nats"]["reachable"] is True


@SQLITE_ONLY  # about processes and NATS, not the database
def test_health_names_a_worker_that_cannot_reach_nats_and_its_log_says_why_once(chaos_env, worker_factory):
    # Given a worker given a NATS address where nothing listens (the CLI's is right)
    env = chaos_env
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    worker_factory(env.base, PIPELINE_NATS_URL=f"nats://127.0.0.1:{dead_port}")
    # Then `health` is degraded and names the worker and the real cause
    def degraded():
        proc = env.cli(env.base, "health", "--json")
        report = json.loads(proc.stdout)
        return (proc.returncode, report) if report["workers"] and report["problems"] else None

    code, report = wait_for(degraded, timeout_s=40, interval_s=1, message="health to name the worker")
    assert code == 1 and report["workers"] == 1
    [problem] = report["problems"]
    assert "cannot reach NATS: cannot connect to NATS at" in problem and "connection refused" in problem
    # And the worker's log says so once, not once per attempt
    time.sleep(5)
    logs = worker_factory.logs()
    assert logs.count("connection refused") <= 3, logs[-3000:]  # the client's line, the bridge's: once each
    assert "TimeoutError" not in logs


@SQLITE_ONLY  # about processes and NATS, not the database
def test_chaos_exhaust_max_deliver_touches_only_its_targets(chaos_env):
    env = chaos_env
    s = env.settings(PIPELINE_NATS_TASK_TTR=1, PIPELINE_NATS_MAX_DELIVER=2)
    job_id = env.enqueue(s, env.urls[:3])  # no worker: dispatch it here
    from tests.helpers import dispatch

    env.rt.settings = s
    dispatch(env.rt, job_id)
    first, second, _ = (str(r.image_id) for r in
                            JobImage.select().where(JobImage.job == job_id).order_by(JobImage.id))
    # A target behind other tasks is refused, and nothing is delivered
    refused = env.cli(s, "chaos", "exhaust-max-deliver", "--job-id", str(job_id), "--image-ids", second)
    assert refused.returncode == 1 and "would deliver other tasks too" in refused.stderr, refused.stderr
    assert env.rt.tasks.consumer_state(job_id, "moth-demo").num_ack_pending == 0
    # The next task is exhausted; the other two are never delivered
    proc = env.cli(s, "chaos", "exhaust-max-deliver", "--job-id", str(job_id), "--image-ids", first, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["deliveries"] == {first: 2} and out["published"] == []
    assert out["num_redelivered"] >= 1
    assert out["num_pending"] == 2  # second and third: never delivered
    assert out["num_ack_pending"] == 0  # JetStream gave up on the target: no longer pending, as the help says
    missing = env.cli(s, "chaos", "exhaust-max-deliver", "--job-id", "999", "--image-ids", "1")
    assert missing.returncode == 1 and "has no consumer" in missing.stderr


@SQLITE_ONLY  # about processes and NATS, not the database
def test_chaos_exhaust_max_deliver_publishes_tasks_for_a_job_without_any(chaos_env):
    env = chaos_env
    s = env.settings(PIPELINE_NATS_TASK_TTR=1, PIPELINE_NATS_MAX_DELIVER=2)
    proc = env.cli(s, "chaos", "exhaust-max-deliver", "--job-id", "4242", "--image-ids", "7,8",
                   "--ensure-stream", "moth-demo", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["published"] == ["7", "8"] and out["deliveries"] == {"7": 2, "8": 2}
    assert out["num_pending"] == 0 and out["num_redelivered"] >= 1
