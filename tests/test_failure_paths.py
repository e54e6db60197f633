"""Failure paths (issue 3): deferred failure (invariant 7), poison messages, transient outages, cancel,
bad results terminated. Real Dramatiq workers on the real Redis broker, real NATS."""

from __future__ import annotations

import logging
import time

import dramatiq
import pytest

import models
from models import Job, JobImage, JobLog, JobStatus, ResultInbox
from pipeline import names
from pipeline.core.deferred_failure import DEFERRAL_MESSAGE
from pipeline.core.jobs import cancel, start_job
from pipeline.core.registry import register_pipeline
from pipeline.errors import TransientError
from pipeline.infra.runtime import get_runtime
from pipeline.schemas import PipelineSpec, decode_result
from tests.conftest import wait_for
from tests.helpers import (
    dispatch,
    fake_job,
    handle_result_message,
    pull_tasks,
    result_messages,
    stream_count,
    success_body,
)


@pytest.fixture
def inproc_worker(runtime):
    """A Dramatiq Worker in this process on jetpipe's broker (with all its middleware)."""
    from pipeline.actors import broker

    worker = dramatiq.Worker(broker, worker_timeout=100, worker_threads=4)
    worker.start()
    yield worker
    worker.stop()


def echo_handler(task):
    return decode_result(success_body(task, boxes=1))


def log_lines(job_id: int, text: str) -> int:
    return JobLog.select().where((JobLog.job == job_id) & JobLog.message.contains(text)).count()


@pytest.mark.dead_letters  # run_job failing for good (an injected bug), or a poison message
def test_dispatched_async_job_defers_failure_and_its_results_decide(
        inproc_worker, runtime, moth_pipeline, monkeypatch, service_factory):
    # Given run_job fails for good right after dispatching every task
    from actors.run_job import run_job

    monkeypatch.setenv("PIPELINE_RAISE_AT", "after_dispatch")
    job = fake_job(moth_pipeline, 6)
    run_job.send_with_options(args=(job.id,), max_retries=0)
    # Then the job is not failed: it stays STARTED and says why
    wait_for(lambda: log_lines(job.id, DEFERRAL_MESSAGE), timeout_s=30, message="deferral log line")
    assert Job.get_by_id(job.id).status == JobStatus.STARTED
    assert log_lines(job.id, "InjectedFault: fault injected at after_dispatch") == 1
    # When a processing service delivers every result
    service_factory(runtime.settings, moth_pipeline, echo_handler)
    job = wait_for(lambda: (j := Job.get_by_id(job.id)).status in JobStatus.TERMINAL and j, timeout_s=30,
                   message="job to finish")
    # Then the results decided: SUCCESS, and nothing afterwards turned it into FAILURE
    assert (job.status, job.error) == (JobStatus.SUCCESS, None)
    inproc_worker.join()
    assert Job.get_by_id(job.id).status == JobStatus.SUCCESS
    assert log_lines(job.id, DEFERRAL_MESSAGE) == 1


@pytest.mark.dead_letters  # run_job failing for good (an injected bug), or a poison message
def test_async_job_failing_before_dispatch_fails_at_once_with_cleanup(inproc_worker, runtime, moth_pipeline,
                                                                     monkeypatch):
    from actors.run_job import run_job

    monkeypatch.setenv("PIPELINE_RAISE_AT", "before_publish")
    job = fake_job(moth_pipeline, 6)
    run_job.send_with_options(args=(job.id,), max_retries=0)
    job = wait_for(lambda: (j := Job.get_by_id(job.id)).status == JobStatus.FAILURE and j.cleaned_up_at and j,
                   timeout_s=30, message="job FAILURE with cleanup")
    assert job.error == ("run_job failed before dispatching its tasks: InjectedFault: fault injected at "
                         "before_publish")
    rt = get_runtime()
    assert rt.tasks.consumer_state(job.id, "moth-demo").exists is False
    assert stream_count(rt, job.id, moth_pipeline) == 0  # tasks already published were purged
    assert rt.redis.keys(f"jetpipe:job:{job.id}:*") == []
    assert log_lines(job.id, DEFERRAL_MESSAGE) == 0


@pytest.mark.dead_letters  # run_job failing for good (an injected bug), or a poison message
@pytest.mark.parametrize(("chunk", "status"), [(6, JobStatus.SUCCESS), (4, JobStatus.FAILURE)])
def test_a_job_whose_run_job_fails_part_way_through_dispatch_is_in_flight(
        inproc_worker, runtime, moth_pipeline, monkeypatch, service_factory, chunk, status):
    # Given run_job failing for good after publishing its first chunk of tasks (of 10)
    from actors.run_job import run_job

    worker_runtime = get_runtime()  # the in-process worker's
    monkeypatch.setattr(worker_runtime, "settings", worker_runtime.settings.with_overrides(dispatch_chunk=chunk))
    monkeypatch.setenv("PIPELINE_RAISE_AT", "mid_publish")
    service_factory(runtime.settings, moth_pipeline, echo_handler)
    job = fake_job(moth_pipeline, 10)
    run_job.send_with_options(args=(job.id,), max_retries=0)
    # Then the job is deferred, not failed at once: the images never dispatched are failed with the reason,
    # the published ones are processed from their results, and the threshold decides the end
    job = wait_for(lambda: (j := Job.get_by_id(job.id)).status in JobStatus.TERMINAL and j, timeout_s=30,
                   message="job to finish")
    assert log_lines(job.id, DEFERRAL_MESSAGE) == 1
    rows = list(JobImage.select().where(JobImage.job == job.id).order_by(JobImage.id))
    assert [r.status for r in rows] == ["processed"] * chunk + ["failed"] * (10 - chunk)
    assert {r.error for r in rows[chunk:]} == {"not dispatched: run_job failed: InjectedFault: fault injected at "
                                               "mid_publish"}
    stages = job.progress["stages"]
    assert (job.status, stages["process"]["processed"], stages["process"]["failed"]) == (status, 10, 10 - chunk)


@pytest.mark.dead_letters  # run_job failing for good (an injected bug), or a poison message
@pytest.mark.parametrize("dispatched", [False, True])
def test_internal_jobs_are_never_deferred(inproc_worker, runtime, moth_pipeline, dispatched):
    # Given an internal-mode job of a pipeline with no built-in handler (run_job will raise)
    from actors.run_job import run_job
    from pipeline.schemas import AlgorithmSpec

    register_pipeline(PipelineSpec("remote-only", "R", [AlgorithmSpec("d", "D", "detection")]))
    job = fake_job("remote-only", 3, dispatch_mode="internal")
    if dispatched:  # even one that looks dispatched
        Job.update(dispatched_at=Job.created_at).where(Job.id == job.id).execute()
    run_job.send_with_options(args=(job.id,), max_retries=0)
    job = wait_for(lambda: (j := Job.get_by_id(job.id)).status == JobStatus.FAILURE and j, timeout_s=30,
                   message="job FAILURE")
    assert "run_job failed in internal mode: UserInputError" in job.error
    assert log_lines(job.id, DEFERRAL_MESSAGE) == 0


@pytest.mark.dead_letters  # run_job failing for good (an injected bug), or a poison message
def test_a_message_that_keeps_killing_workers_is_dead_lettered(inproc_worker, runtime, moth_pipeline):
    # Given a result message redelivered after killing its worker (Dramatiq requeues the same message id)
    from actors.results import process_pipeline_result
    from pipeline.actors import broker

    job = fake_job(moth_pipeline, 1)
    message = process_pipeline_result.message(job.id)
    for _ in range(4):  # the first delivery plus three crash redeliveries
        broker.enqueue(message)
        broker.join(names.RESULTS_QUEUE, timeout=10_000)
        inproc_worker.join()
    # Then the fourth delivery is dead-lettered with the reason in the job log
    assert log_lines(job.id, f"poison message: process_pipeline_result message {message.message_id} "
                             "killed its worker 3 time(s); dead-lettered") == 1
    dead = broker.client.zrange(names.dead_letter_keys(names.RESULTS_QUEUE)[0], 0, -1)
    assert len(dead) == 1


def test_ordinary_retries_are_not_mistaken_for_crashes(inproc_worker, runtime, moth_pipeline):
    from actors.results import process_pipeline_result
    from pipeline.actors import broker

    job = fake_job(moth_pipeline, 1)
    message = process_pipeline_result.message(job.id)
    for retries in range(5):  # five attempts scheduled by Retries, no crash
        broker.enqueue(message.copy(options={**message.options, "retries": retries}))
        broker.join(names.RESULTS_QUEUE, timeout=10_000)
        inproc_worker.join()
    assert log_lines(job.id, "poison message") == 0


def test_redis_outage_while_saving_keeps_the_result_in_the_inbox_and_the_job_running(private_runtime, caplog):
    rt, dev = private_runtime
    job = fake_job("moth-demo", 2)
    dispatch(rt, job.id)
    (task, reply), (task2, reply2) = pull_tasks(rt, job.id, 2)
    # When Redis is down while a result is handled
    dev.redis.stop()
    with caplog.at_level(logging.WARNING), pytest.raises(TransientError):
        handle_result_message(rt, job.id, success_body(task, boxes=2), reply, task.task_token)
    # Then the result waits in the inbox (its task is settled: no model runs twice), nothing is counted,
    # the job did not fail, and the log names job and image
    assert ResultInbox.select().where(ResultInbox.job_id == job.id).count() == 1
    assert stream_count(rt, job.id, "moth-demo") == 1
    assert JobImage.select().where(JobImage.status == "pending").count() == 2
    assert Job.get_by_id(job.id).status == JobStatus.STARTED
    assert f"job={job.id} image={task.image_id} transient error, result waits in the inbox" in caplog.text
    # When Redis comes back (empty: it kept nothing) and the next result is handled
    dev.redis.start()
    handle_result_message(rt, job.id, success_body(task2, boxes=1), reply2, task2.task_token)
    # Then the state was rebuilt from the database and counts are exact
    job = Job.get_by_id(job.id)
    assert (job.status, job.progress["stages"]["results"]["detections"]) == (JobStatus.SUCCESS, 3)
    assert stream_count(rt, job.id, "moth-demo") == 0


def test_nats_outage_at_ack_time_retries_without_double_counting(private_runtime, caplog):
    rt, dev = private_runtime
    job = fake_job("moth-demo", 2)
    dispatch(rt, job.id)
    (task, reply), _ = pull_tasks(rt, job.id, 2)
    rt.tasks.timeout_s = 8  # fail the ACK quickly while NATS is down
    dev.nats.stop()
    with caplog.at_level(logging.WARNING), pytest.raises(TransientError):
        handle_result_message(rt, job.id, success_body(task, boxes=2), reply, task.task_token)
    assert f"job={job.id} image={task.image_id} transient error while taking the result" in caplog.text
    dev.nats.start()
    wait_for(lambda: rt.tasks.queue.nc.is_connected, timeout_s=15, message="NATS reconnect")
    handle_result_message(rt, job.id, success_body(task, boxes=2), reply, task.task_token)
    snap = rt.state.snapshot(job.id)
    assert (snap.processed, snap.detections) == (1, 2)
    assert stream_count(rt, job.id, "moth-demo") == 1


@pytest.mark.parametrize("bad", ["a box too large for its key column", "a taxon of 5,000 characters",
                                 "a NUL character"])
def test_a_result_the_database_refuses_fails_its_image_and_the_others_are_saved(runtime, moth_pipeline, bad):
    # Given three results of one job waiting together, the first one with a value that cannot be stored
    import json

    from pipeline.core.inbox import Incoming, take
    from pipeline.core.saving import drain

    job = fake_job(moth_pipeline, 3)
    dispatch(runtime, job.id)
    tasks = pull_tasks(runtime, job.id, 3)
    body = json.loads(success_body(tasks[0][0], boxes=1))
    if "box" in bad:  # its dedupe key "x1,y1,x2,y2" is 300+ characters: PostgreSQL refuses it, SQLite not
        body["detections"][0]["bbox"]["x2"] = 1e300
    else:
        body["detections"][0]["classifications"][0]["taxon"] = "x" * 5000 if "5,000" in bad else "Noc\u0000tuidae"
    take(runtime, [Incoming.direct(job.id, json.dumps(body).encode(), tasks[0][1], tasks[0][0].task_token)] + [
        Incoming.direct(job.id, success_body(task, boxes=1), reply, task.task_token) for task, reply in tasks[1:]])
    # When they are saved
    drain(runtime, job.id)
    # Then that image is failed at once with the reason (no retry, nothing left in the inbox) — a NUL or
    # a taxon over 255 characters at validation, the box where the database refuses it (the drain finds
    # the message it refuses) — and the two others are saved
    rows = {str(r.image_id): r for r in JobImage.select()}
    job = Job.get_by_id(job.id)
    assert ResultInbox.select().count() == 0
    assert [rows[t.image_id].status for t, _ in tasks[1:]] == ["processed", "processed"]
    first = rows[tasks[0][0].image_id]
    if "NUL" in bad:
        assert (first.status, first.error) == ("failed", "bad result: result contains a NUL character (\\u0000), "
                                                         "which text cannot hold")
    elif "taxon" in bad:
        assert (first.status, first.error) == ("failed", "bad result: a taxon is at most 255 characters; got one "
                                                         "starting 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'")
    elif models.is_postgres():
        assert first.status == "failed"
        assert first.error.startswith("bad result: the database refused to store it (StringDataRightTruncation")
    else:
        assert first.status == "processed"
    assert job.status == JobStatus.SUCCESS


def test_cancel_revokes_removes_tasks_and_later_results_change_nothing(runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 4)
    dispatch(runtime, job.id)
    [(task, reply)] = pull_tasks(runtime, job.id, 1)
    assert cancel(runtime, job.id) == JobStatus.REVOKED
    assert runtime.tasks.consumer_state(job.id, "moth-demo").exists is False
    assert stream_count(runtime, job.id, moth_pipeline) == 0  # services receive nothing more
    handled = handle_result_message(runtime, job.id, success_body(task, boxes=5), reply, task.task_token)
    job = Job.get_by_id(job.id)
    assert (handled.action, job.status, job.progress["stages"]["results"]["detections"]) == ("late", "REVOKED", 0)
    # and its stages say they ended with it (collect had finished before)
    assert {name: stage["status"] for name, stage in job.progress["stages"].items()} == {
        "collect": "SUCCESS", "process": "REVOKED", "results": "REVOKED"}
    assert cancel(runtime, job.id) == JobStatus.REVOKED  # idempotent


def test_undeclared_algorithm_fails_the_image_and_terminates_its_task(runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)
    (task, reply), (task2, reply2) = pull_tasks(runtime, job.id, 2)
    handle_result_message(runtime, job.id, success_body(task, detector={"key": "yolo", "name": "?"}), reply,
                          task.task_token)
    row = JobImage.get(JobImage.image == int(task.image_id))
    assert row.status == "failed" and "undeclared algorithm(s) ['yolo']" in row.error
    assert stream_count(runtime, job.id, moth_pipeline) == 1  # its task was terminated, not left to retry
    handle_result_message(runtime, job.id, success_body(task2), reply2, task2.task_token)
    assert Job.get_by_id(job.id).status == JobStatus.SUCCESS


def test_an_enqueued_job_runs_through_an_in_process_worker(inproc_worker, runtime, moth_pipeline,
                                                         service_factory):
    service_factory(runtime.settings, moth_pipeline, echo_handler)
    job = fake_job(moth_pipeline, 5)
    start_job(runtime, job)
    job = wait_for(lambda: (j := Job.get_by_id(job.id)).status in JobStatus.TERMINAL and j, timeout_s=30,
                   message="job to finish")
    assert job.status == JobStatus.SUCCESS
    assert job.progress["stages"]["results"]["detections"] == 5


def test_an_image_the_reference_service_cannot_read_is_failed_and_the_rest_proceed(
        inproc_worker, runtime, moth_pipeline, trap_images, tmp_path, service_factory):
    from pipeline.core.jobs import create_job
    from pipeline.ops.sources import image_urls_from_dir
    from pipeline.sdk import moth

    directory, _ = trap_images
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    urls = image_urls_from_dir(str(directory))[:4] + [f"file://{broken}"]
    service_factory(runtime.settings, moth.SLUG, moth.process_task)
    job = create_job(moth.SLUG, urls)
    start_job(runtime, job)
    job = wait_for(lambda: (j := Job.get_by_id(job.id)).status in JobStatus.TERMINAL and j, timeout_s=30,
                   message="job to finish")
    assert (job.status, job.progress["stages"]["process"]["failed"]) == (JobStatus.SUCCESS, 1)
    failed = JobImage.get(JobImage.status == "failed")
    assert failed.error == ("processing service error: ImageUnreadable: not an image format the model can "
                            "decode")  # its URL is shown beside it, not in it


def test_workers_survive_postgres_dropping_their_connections(inproc_worker, runtime, moth_pipeline, db_url,
                                                             service_factory):
    if not db_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: the server terminates the worker's connections")
    import peewee
    import psycopg2

    import models
    from tests.conftest import PG_ADMIN_URL

    def status():
        try:
            return (j := Job.get_by_id(job.id)).status in JobStatus.TERMINAL and j
        except (peewee.OperationalError, peewee.InterfaceError):
            models.database.manual_close()  # this test's own connection was terminated too
            return None

    service_factory(runtime.settings, moth_pipeline, echo_handler)
    job = fake_job(moth_pipeline, 30)
    start_job(runtime, job)
    admin = psycopg2.connect(PG_ADMIN_URL)
    admin.autocommit = True
    killed = 0
    for _ in range(6):  # the database drops every connection of the job's workers, again and again
        cursor = admin.cursor()
        cursor.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                       "WHERE datname = %s AND pid <> pg_backend_pid()", (db_url.rsplit("/", 1)[1],))
        killed += cursor.fetchone()[0]
        time.sleep(0.2)
    admin.close()
    job = wait_for(status, timeout_s=60, message="job to finish")
    assert killed > 0
    assert (job.status, job.progress["stages"]["results"]["detections"]) == (JobStatus.SUCCESS, 30)


def test_the_reference_model_refuses_an_image_too_large_to_decode(tmp_path):
    # Given an 8,000 x 8,000 image (64 million pixels: a small file, gigabytes of work once decoded)
    from PIL import Image

    from pipeline.sdk import moth

    huge = tmp_path / "huge.png"
    Image.new("1", (8000, 8000)).save(huge)
    assert huge.stat().st_size < 1_000_000
    # When the model loads it, it refuses from the header, before decoding it
    with pytest.raises(moth.ImageUnreadable, match="8000 x 8000 pixels, more than 40000000"):
        moth.load_image(f"file://{huge}")


def test_a_task_whose_handler_hangs_is_failed_with_a_timeout_and_frees_its_slot(runtime, moth_pipeline,
                                                                               service_factory):
    # Given a service with one slot whose handler hangs on image 1 and a 1 s deadline per task
    import threading

    release = threading.Event()

    def handler(task):
        if task.image_id == "1":
            release.wait(30)  # a fetch that never returns
        return decode_result(success_body(task, boxes=1))

    job = fake_job(moth_pipeline, 3)
    dispatch(runtime, job.id)
    service_factory(runtime.settings, moth_pipeline, handler, concurrency=1, task_timeout_s=1.0, batch_size=1)
    # When results are saved as they come (no worker here: handled directly from the stream)
    messages = wait_for(lambda: (m := result_messages(runtime.settings, job.id)) and len(m) == 3 and m, timeout_s=30,
                        message="three result messages")
    release.set()
    # Then image 1 got a timeout error result and the other two were processed by the freed slot
    errors = [body for _, body in messages if "error" in body]
    assert [(e["image_id"], e["error"]) for e in errors] == [("1", "TimeoutError: the handler took longer than 1 s")]


def test_the_poison_guard_keeps_a_messages_count_for_an_hour_not_a_week(inproc_worker, runtime, moth_pipeline):
    from actors.results import process_pipeline_result
    from pipeline.actors import broker

    job = fake_job(moth_pipeline, 1)
    message = process_pipeline_result.message(job.id)
    broker.enqueue(message)
    broker.join(names.RESULTS_QUEUE, timeout=10_000)
    inproc_worker.join()
    ttl = broker.client.ttl(names.crash_delivery_key(message.message_id))
    assert 0 < ttl <= 3600


def test_a_lost_sweep_over_more_images_than_sqlite_takes_in_one_statement(runtime, moth_pipeline):
    # Given a running 40,000-image job whose images are all failed as lost at once (SQLite refuses more
    # than 32,766 variables in one statement)
    from pipeline.core.jobs import load_state_from_db
    from pipeline.core.lost import fail_lost
    from pipeline.core.outcomes import load_job

    job = fake_job(moth_pipeline, 40_000)
    Job.update(status=JobStatus.STARTED).where(Job.id == job.id).execute()
    load_state_from_db(runtime.state, job.id)
    ids = [str(i) for (i,) in JobImage.select(JobImage.image).where(JobImage.job == job.id).tuples()]
    outcomes, status = fail_lost(runtime, load_job(job.id), ids, "lost: test")
    assert (len(outcomes), status) == (40_000, JobStatus.FAILURE)
    assert JobImage.select().where(JobImage.status == "failed").count() == 40_000


def test_a_service_whose_nats_connection_never_comes_back_opens_a_new_one(runtime, moth_pipeline, service_factory,
                                                                          monkeypatch):
    # Given a running service whose connection dies for good (a client reconnect that stalled)
    from pipeline.sdk import nats_transport

    monkeypatch.setattr(nats_transport, "RECONNECT_WATCHDOG_S", 1.0)
    service = service_factory(runtime.settings, moth_pipeline, lambda task: decode_result(success_body(task)),
                              batch_size=1)
    transport = service.transport
    wait_for(lambda: transport._queue is not None and transport._queue.nc.is_connected, timeout_s=10,
             message="the service to connect")
    import asyncio

    nc = transport._queue.nc
    asyncio.run_coroutine_threadsafe(nc.close(), nc._reading_task.get_loop()).result(timeout=10)  # its own loop
    # When a job's tasks are dispatched
    job = fake_job(moth_pipeline, 3)
    dispatch(runtime, job.id)
    # Then the service opens a new connection and answers them
    wait_for(lambda: len(result_messages(runtime.settings, job.id)) == 3, timeout_s=30, message="three results")
