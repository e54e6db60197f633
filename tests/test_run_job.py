"""run_job: collect -> load state -> publish -> dispatched; retries are safe; internal mode."""

from __future__ import annotations

import logging
import time

import pytest

from models import ImageStatus, Job, JobImage, JobLog, JobStatus, Pipeline, TaskRun
from pipeline import names
from pipeline.core import task_runs
from pipeline.core.jobs import create_job
from pipeline.ops.sources import image_urls_from_dir
from pipeline.sdk import moth
from tests.helpers import dispatch, fake_job, handle_result_message, pull_tasks, stream_count, success_body


def test_a_job_with_zero_images_finishes_at_once(runtime, moth_pipeline):
    job = Job.create(name="empty", pipeline=Pipeline.get(slug=moth_pipeline), total_images=0)
    dispatch(runtime, job.id)
    job = Job.get_by_id(job.id)
    assert job.status == JobStatus.SUCCESS and job.finished_at is not None
    assert runtime.tasks.consumer_state(job.id, "moth-demo").exists is False


def test_dispatch_publishes_one_task_per_image_with_contract_headers(runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 7)
    dispatch(runtime, job.id)
    job = Job.get_by_id(job.id)
    assert job.status == JobStatus.STARTED and job.dispatched_at is not None
    assert stream_count(runtime, job.id, moth_pipeline) == 7
    state = runtime.tasks.consumer_state(job.id, "moth-demo")
    assert (state.exists, state.num_pending) == (True, 7)
    tasks = pull_tasks(runtime, job.id, 7)
    assert sorted(int(t.image_id) for t, _ in tasks) == list(range(1, 8))
    assert all(t.pipeline == moth_pipeline and t.job_id == job.id for t, _ in tasks)


def test_a_retried_run_job_resets_nothing_and_publishes_nothing_twice(runtime, moth_pipeline):
    # Given a dispatched job with one result counted
    job = fake_job(moth_pipeline, 4)
    dispatch(runtime, job.id)
    [(task, reply)] = pull_tasks(runtime, job.id, 1)
    handle_result_message(runtime, job.id, success_body(task, boxes=3), reply, task.task_token)
    # When run_job runs again, even with its dispatch checkpoint lost
    Job.update(dispatched_at=None, dispatch_cursor=0).where(Job.id == job.id).execute()
    dispatch(runtime, job.id)
    # Then counters are intact and the stream holds no duplicate task (Nats-Msg-Id dedupe)
    snap = runtime.state.snapshot(job.id)
    assert (snap.processed, snap.detections) == (1, 3)
    assert stream_count(runtime, job.id, moth_pipeline) == 3
    assert JobLog.select().where(JobLog.message.contains("dispatched 3 task(s) (0 new)")).count() == 1


def test_an_existing_consumer_with_other_settings_is_reported(runtime, moth_pipeline, caplog):
    job = fake_job(moth_pipeline, 1)
    runtime.tasks.ensure_tasks_stream(moth_pipeline)
    runtime.tasks.ensure_job_consumer(job.id, moth_pipeline, max_deliver=5, ack_wait_s=10)
    with caplog.at_level(logging.WARNING):
        dispatch(runtime, job.id)
    assert f"job={job.id} consumer job-{job.id} exists with different settings: max_deliver=5" in caplog.text
    assert names.job_consumer(job.id) in caplog.text


def test_internal_mode_runs_the_model_in_the_worker(runtime, moth_pipeline, trap_images, tmp_path):
    directory, truth = trap_images
    urls = image_urls_from_dir(str(directory))[:10] + [f"file://{tmp_path}/missing.png"]
    job = create_job(moth.SLUG, urls, dispatch_mode="internal")
    dispatch(runtime, job.id)
    job = Job.get_by_id(job.id)
    expected = sum(len(truth[u.rsplit("/", 1)[1]]) for u in urls[:10])
    stages = job.progress["stages"]
    assert job.status == JobStatus.SUCCESS
    assert (stages["process"]["processed"], stages["process"]["failed"]) == (11, 1)
    assert stages["results"]["detections"] == expected
    missing = JobImage.get(JobImage.status == ImageStatus.FAILED)
    # (its URL is beside it wherever it is shown; why it could not be read is in the worker's log only)
    assert missing.error == "processing service error: ImageUnreadable: cannot read the image"


def test_the_tasks_stream_allows_as_many_job_consumers_as_configured(runtime, moth_pipeline, monkeypatch):
    # NATS 2.15 gives a stream 1,000 consumers unless it sets its own limit: one per running job
    import pytest

    from pipeline.errors import TransientError

    def limit():
        js = runtime.tasks.queue.js
        return runtime.runner.run(js.stream_info(names.tasks_stream("moth-demo")), timeout=10).config.max_consumers

    runtime.tasks.ensure_tasks_stream(moth_pipeline)  # made as the pipeline's first job is dispatched
    assert (limit(), runtime.settings.nats_max_jobs) == (10_000, None)  # the variable unset: 10,000
    # Given PIPELINE_NATS_MAX_JOBS=2: the existing stream's limit is lowered at the next dispatch
    monkeypatch.setattr(runtime, "settings", runtime.settings.with_overrides(nats_max_jobs=2))
    jobs = [fake_job(moth_pipeline, 1, prefix=f"file:///limit{k}") for k in range(3)]
    dispatch(runtime, jobs[0].id)
    assert limit() == 2
    # and a process without the variable (a CLI elsewhere) does not undo it
    runtime.tasks.ensure_streams(**runtime.settings.with_overrides(nats_max_jobs=None).stream_options())
    assert limit() == 2
    dispatch(runtime, jobs[1].id)
    # When a third job's consumer is created, the error says what to do
    with pytest.raises(TransientError, match="holds its maximum of job consumers.*PIPELINE_NATS_MAX_JOBS"):
        runtime.tasks.ensure_job_consumer(jobs[2].id, moth_pipeline, max_deliver=2, ack_wait_s=30)
    # And raising the limit again lets it through
    runtime.tasks.ensure_streams(max_jobs=10_000)
    assert runtime.tasks.ensure_job_consumer(jobs[2].id, moth_pipeline, max_deliver=2, ack_wait_s=30).max_deliver == 2


def test_a_job_ends_cleanly_when_waking_a_waiting_job_meets_a_redis_error(runtime, moth_pipeline, monkeypatch,
                                                                         caplog):
    import redis

    from pipeline.core.jobs import cancel

    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)

    def down(*args, **kwargs):
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(runtime.redis, "zpopmin", down)
    with caplog.at_level(logging.WARNING):
        assert cancel(runtime, job.id) == JobStatus.REVOKED
    assert Job.get_by_id(job.id).cleaned_up_at is not None
    assert not runtime.tasks.consumer_state(job.id, "moth-demo").exists
    assert "could not wake a job waiting for a slot" in caplog.text


def assert_health_names_the_wait(runtime) -> None:
    from pipeline.infra.aio import LoopThread
    from pipeline.ops.health import build_report

    loop = LoopThread()
    try:
        status, health = build_report(runtime.settings, loop)
    finally:
        loop.stop()
    assert health["dependencies"]["nats"]["job_slots"] == {"used": 1, "max": 1, "full": ["moth-demo"]}
    assert ("1 job(s) wait for a free job slot: the tasks stream of pipeline(s) moth-demo holds its maximum of 1 job "
            "consumers") in " ".join(health["problems"])


def test_a_job_past_the_job_limit_waits_unstarted_and_starts_when_a_slot_frees(runtime, moth_pipeline, monkeypatch):
    from actors.run_job import execute
    from pipeline.core.jobs import cancel
    from pipeline.core.slots import SLOT_RETRY_MS

    # Given PIPELINE_NATS_MAX_JOBS=1 and a dispatched job holding the only slot
    monkeypatch.setattr(runtime, "settings", runtime.settings.with_overrides(nats_max_jobs=1))
    first, second = fake_job(moth_pipeline, 2, prefix="file:///slot-a"), fake_job(moth_pipeline, 3, prefix="file:///b")
    dispatch(runtime, first.id)
    sent = []
    monkeypatch.setattr(runtime, "send", lambda actor, *args, delay_ms=None: sent.append((actor, args, delay_ms)))
    try:
        # When run_job meets the second job (twice: it looks again by itself)
        before = Job.get_by_id(second.id).status
        execute(runtime, second.id)
        execute(runtime, second.id)
        # Then the job waits as it was, not started, not failed, and run_job is queued to look again
        job = Job.get_by_id(second.id)
        assert (job.status, job.dispatched_at, job.error) == (before, None, None)
        assert sent == [(names.RUN_JOB, (second.id,), SLOT_RETRY_MS)]  # one delayed look at a time
        waiting = [line.message for line in JobLog.select().where(JobLog.job == second.id)
                   if "waiting for a free job slot" in line.message]
        assert len(waiting) == 1 and "PIPELINE_NATS_MAX_JOBS" in waiting[0]  # said once, with what to do
        assert_health_names_the_wait(runtime)
        # (a waiting job whose deadline passes ends FAILURE saying why, and is not looked at again)
        late = fake_job(moth_pipeline, 1, prefix="file:///late", deadline_s=60)
        Job.update(deadline_at=late.created_at).where(Job.id == late.id).execute()
        execute(runtime, late.id)
        assert Job.get_by_id(late.id).status == JobStatus.FAILURE and len(sent) == 1
        assert "still waiting for a free job slot" in Job.get_by_id(late.id).error
        # And when the first job ends, its cleanup sends run_job for the waiting job, which starts it
        cancel(runtime, first.id)
        assert sent[-1] == (names.RUN_JOB, (second.id,), None)
        execute(runtime, second.id)
        assert Job.get_by_id(second.id).status == JobStatus.STARTED
        assert stream_count(runtime, second.id, moth_pipeline) == 3
    finally:
        runtime.tasks.ensure_streams(max_jobs=10_000)


def test_freed_slots_wake_the_oldest_waiters_one_each_whatever_is_queued_before_them(runtime, moth_pipeline,
                                                                                    monkeypatch):
    from actors.run_job import execute
    from pipeline.core.jobs import cancel
    from pipeline.core.slots import wake_a_waiting_job

    # Given two job slots, both held, 120 jobs enqueued before the waiters whose run_job has not run yet,
    # and three jobs waiting for a slot
    monkeypatch.setattr(runtime, "settings", runtime.settings.with_overrides(nats_max_jobs=2))
    holders = [fake_job(moth_pipeline, 1, prefix=f"file:///hold{k}") for k in range(2)]
    for job in holders:
        dispatch(runtime, job.id)
    for k in range(120):
        fake_job(moth_pipeline, 1, prefix=f"file:///queued{k}")
    waiters = [fake_job(moth_pipeline, 1, prefix=f"file:///wait{k}") for k in range(3)]
    sent = []
    monkeypatch.setattr(runtime, "send", lambda actor, *args, delay_ms=None: sent.append((actor, args, delay_ms)))
    try:
        for job in waiters:
            execute(runtime, job.id)
        sent.clear()
        # When both slots are freed at once
        for job in holders:
            cancel(runtime, job.id)
        # Then the two oldest waiters are woken, one each: not a job queued before them, not one twice
        assert sent == [(names.RUN_JOB, (waiters[0].id,), None), (names.RUN_JOB, (waiters[1].id,), None)]
        # and a waiter canceled meanwhile is never woken
        cancel(runtime, waiters[2].id)
        assert wake_a_waiting_job(runtime) is None and len(sent) == 2
    finally:
        runtime.tasks.ensure_streams(max_jobs=10_000)


def test_dispatching_while_results_are_saved_never_meets_a_locked_database(runtime, moth_pipeline, monkeypatch):
    # Given every SQLite statement traced (a transaction that reads and then writes must have begun with
    # the write lock: upgrading a read lock fails at once when another connection committed meanwhile)
    import threading

    import peewee

    from actors.run_job import execute
    from models import database, is_postgres

    statements: list[str] = []
    connect = peewee.sqlite3.connect

    def traced(*args, **kwargs):
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(peewee.sqlite3, "connect", traced)
    database.close()
    # and a 600-image job dispatched 20 tasks per round while two threads answer and save its results
    runtime.settings = runtime.settings.with_overrides(dispatch_chunk=20)
    job = fake_job(moth_pipeline, 600)
    errors, dispatched = [], threading.Event()

    def dispatcher():
        try:
            execute(runtime, job.id)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)
        finally:
            dispatched.set()

    def service():
        import nats.js.errors

        try:
            while Job.get_by_id(job.id).status == JobStatus.STARTED or not dispatched.is_set():
                if Job.get_by_id(job.id).dispatch_cursor == 0:
                    time.sleep(0.01)
                    continue
                try:
                    tasks = pull_tasks(runtime, job.id, 25, timeout_s=0.5)
                except (nats.js.errors.NotFoundError, nats.js.errors.ServiceUnavailableError):
                    break  # the job ended: its consumer is gone
                for task, reply in tasks:
                    handle_result_message(runtime, job.id, success_body(task, boxes=1), reply, task.task_token)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            database.close()

    threads = [threading.Thread(target=dispatcher)] + [threading.Thread(target=service) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    # Then nothing failed on a lock, and the job ended exactly
    assert errors == []
    job = Job.get_by_id(job.id)
    assert (job.status, job.progress["stages"]["process"]["processed"]) == (JobStatus.SUCCESS, 600)
    assert job.progress["stages"]["results"]["detections"] == 600
    # And on SQLite every transaction took the write lock when it began
    if not is_postgres():
        begins = [s for s in statements if s.upper().startswith("BEGIN")]
        assert begins and all(s.upper() == "BEGIN IMMEDIATE" for s in begins), sorted(set(begins))


def test_run_job_retries_outages_for_minutes_and_never_a_permanent_error():
    import peewee

    from actors.run_job import OUTAGE_RETRIES, run_job
    from pipeline.errors import TransientError, UserInputError

    _retry_when = run_job.options["retry_when"]

    # Outages are retried: the database locked or unreachable, Redis or NATS down
    for outage in (peewee.OperationalError("database is locked"), peewee.InterfaceError("connection already closed"),
                   TransientError("nats: publish failed"), ConnectionRefusedError()):
        assert _retry_when(0, outage) and _retry_when(OUTAGE_RETRIES - 1, outage)
        assert not _retry_when(OUTAGE_RETRIES, outage)
    # A permanent error is not retried: it fails for good at once, and deferred failure decides
    for permanent in (peewee.IntegrityError("duplicate key"), UserInputError("no handler"), KeyError("bug")):
        assert not _retry_when(0, permanent)
    # And the retries span minutes, not 30 s (Dramatiq's backoff doubles from min_backoff up to max_backoff)
    options = run_job.options
    total_ms = sum(min(options["min_backoff"] * 2 ** n, options["max_backoff"]) for n in range(OUTAGE_RETRIES))
    assert total_ms >= 15 * 60 * 1000


def test_a_job_canceled_while_it_is_dispatched_leaves_no_task_in_nats(runtime, moth_pipeline, monkeypatch):
    # Given a 1,000-image job dispatched 50 tasks per round, slowly
    import threading

    from actors.run_job import execute
    from pipeline.core.jobs import cancel

    runtime.settings = runtime.settings.with_overrides(dispatch_chunk=50)
    monkeypatch.setenv("PIPELINE_DELAY_AT", "mid_publish=0.05")
    job = fake_job(moth_pipeline, 1000)
    dispatching = threading.Thread(target=execute, args=(runtime, job.id))
    dispatching.start()
    # When it is canceled after its first rounds
    while Job.get_by_id(job.id).dispatch_cursor == 0:
        time.sleep(0.01)
    assert cancel(runtime, job.id) == JobStatus.REVOKED
    dispatching.join(timeout=60)
    # Then dispatch stopped, and no task of it is left in NATS (not even one published after the cancel's
    # purge), nor its consumer
    job = Job.get_by_id(job.id)
    assert (job.status, job.dispatched_at) == (JobStatus.REVOKED, None)
    assert stream_count(runtime, job.id, moth_pipeline) == 0
    assert runtime.tasks.consumer_state(job.id, "moth-demo").exists is False
    assert JobLog.select().where((JobLog.job == job.id) & JobLog.message.contains("dispatch stopped")).count() == 1


def test_an_internal_job_stops_processing_when_canceled(runtime, moth_pipeline, monkeypatch):
    # Given an internal-mode job whose handler takes a while per image
    import threading

    from actors.run_job import execute
    from pipeline.core.jobs import cancel
    from pipeline.schemas import decode_result
    from pipeline.sdk import handlers

    calls = []

    def slow(task):
        calls.append(task.image_id)
        time.sleep(0.05)
        return decode_result(success_body(task, boxes=1))

    monkeypatch.setitem(handlers.HANDLERS, moth_pipeline, slow)
    job = fake_job(moth_pipeline, 200, dispatch_mode="internal")
    running = threading.Thread(target=execute, args=(runtime, job.id))
    running.start()
    # When it is canceled after a few images
    while len(calls) < 5:
        time.sleep(0.01)
    assert cancel(runtime, job.id) == JobStatus.REVOKED
    running.join(timeout=60)
    # Then the worker ran the model on at most one more image, and nothing changed after the cancel
    ran = len(calls)
    assert ran < 20
    job = Job.get_by_id(job.id)
    assert job.status == JobStatus.REVOKED
    assert JobImage.select().where((JobImage.job == job.id) & (JobImage.status == "processed")).count() < ran + 1


def test_the_single_tasks_stream_of_earlier_versions_is_removed_so_pipelines_get_their_own(runtime, moth_pipeline,
                                                                                          caplog):
    # Given the one tasks stream of every pipeline an earlier jetpipe made, holding a task
    js = runtime.tasks.queue.js

    async def legacy():
        await js.add_stream(name=names.LEGACY_TASKS_STREAM, subjects=["pipeline.tasks.>"], retention="workqueue")
        await js.publish("pipeline.tasks.moth-demo.99", b"{}")

    runtime.runner.run(legacy(), timeout=10)
    # When a worker of this version starts (it makes the streams), the old stream goes with a warning that
    # says what becomes of its tasks, and a job dispatches into its pipeline's own stream
    with caplog.at_level(logging.WARNING):
        runtime.tasks.ensure_streams()
    assert "removed stream PIPELINE_TASKS of an earlier jetpipe" in caplog.text and "its 1 task(s)" in caplog.text
    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)
    assert runtime.tasks.consumer_state(job.id, moth_pipeline).num_pending == 2
    streams = [info.config.name for info in runtime.runner.run(js.streams_info(), timeout=10)]
    assert names.LEGACY_TASKS_STREAM not in streams and names.tasks_stream(moth_pipeline) in streams


@pytest.mark.parametrize(("chunk", "rounds"), [(5000, [500, 700]), (300, [300, 300, 300, 300]), (200, [200] * 6)])
def test_the_first_dispatch_round_is_small_so_services_start_while_the_rest_is_published(
        runtime, moth_pipeline, monkeypatch, chunk, rounds):
    # Given a 1,200-image job dispatched PIPELINE_DISPATCH_CHUNK tasks a round
    from pipeline.core import jobs

    runtime.settings = runtime.settings.with_overrides(dispatch_chunk=chunk)
    recorded = []
    original = jobs.record_published

    def record(job_id, image_ids, seqs, cursor):
        recorded.append(len(image_ids))
        return original(job_id, image_ids, seqs, cursor)

    monkeypatch.setattr(jobs, "record_published", record)
    job = fake_job(moth_pipeline, 1200)
    dispatch(runtime, job.id)
    # Then its first round is at most 500 tasks, the others a chunk each, and every task went out once, in order
    assert recorded == rounds
    assert stream_count(runtime, job.id, moth_pipeline) == 1200
    images = [str(i) for i, in JobImage.select(JobImage.image).where(JobImage.job == job.id).order_by(JobImage.id)
              .tuples()]
    runs = TaskRun.select().where(TaskRun.job == job.id).order_by(TaskRun.first_seq)
    assert len(runs) == len(rounds)  # a run a round: no other job published meanwhile
    seqs = [seq for run in runs for seq in range(run.first_seq, run.last_seq + 1)]
    image_of = task_runs.images_of(job.id, seqs)
    assert [image_of[seq] for seq in seqs] == images  # stored in id order, each recorded at its sequence


def test_publishing_reads_each_pub_ack_new_duplicate_or_refused(runtime, moth_pipeline):
    import nats.js.errors

    from pipeline.schemas import Task

    runtime.tasks.ensure_tasks_stream(moth_pipeline)
    queue = runtime.tasks.queue
    tasks = [Task(job_id=424242, image_id=str(i), image_url=f"file:///puback/{i}.png", pipeline=moth_pipeline)
             for i in range(3)]
    # Given three tasks published: each new, at its own sequence
    first = runtime.runner.run(queue.publish_tasks(tasks), timeout=10)
    assert [p.new for p in first] == [True, True, True]
    assert len({p.seq for p in first}) == 3
    # When they are published again: each a duplicate at the sequence it was stored at
    again = runtime.runner.run(queue.publish_tasks(tasks), timeout=10)
    assert [(p.seq, p.new) for p in again] == [(p.seq, False) for p in first]
    # And a publish the stream refuses raises the server's error, whatever the others said
    with pytest.raises(nats.js.errors.APIError, match="wrong last sequence"):
        runtime.runner.run(queue.publish_tasks(tasks[:1], headers={"Nats-Expected-Last-Sequence": "1"}), timeout=10)
