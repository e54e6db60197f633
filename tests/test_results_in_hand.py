"""A result in hand is never thrown away (invariants 8, 9 and 11), with real worker processes, a service
written from the contract alone that sends one image per result message, and deterministic backlogs
(throttled workers and a short ack_wait, rather than machine speed)."""

from __future__ import annotations

import asyncio
import time

import pytest

from models import Classification, Detection, Job, JobImage, JobStatus, ResultInbox
from pipeline.core.jobs import create_job, start_job
from pipeline.sdk import moth
from tests.conftest import kill_group, make_settings, wait_for
from tests.helpers import answer_one_box

pytestmark = pytest.mark.slow

#: Tasks redelivered after 2 s and given up after 2 deliveries: a backlog of saving longer than 4 s
#: failed images as "lost" before results were taken into the inbox on arrival.
QUICK = {"PIPELINE_NATS_TASK_TTR": 2, "PIPELINE_NATS_MAX_DELIVER": 2}
#: Each result message costs a worker this much more (seconds): 800 messages take at least 8 s to save.
THROTTLE = "after_validation=0.01"


def enqueue(runtime, images: int, *, name: str) -> int:
    job = create_job(moth.SLUG, [f"https://example.invalid/{name}/img-{i}.jpg" for i in range(images)], name=name)
    start_job(runtime, job)
    return job.id


def finished(job_id: int, timeout_s: float = 120) -> Job:
    return wait_for(lambda: (j := Job.get_by_id(job_id)).status in JobStatus.TERMINAL and j.cleaned_up_at and j,
                    timeout_s=timeout_s, message=f"job {job_id} to finish")


def processed(job_id: int) -> int:
    return JobImage.select().where((JobImage.job == job_id) & (JobImage.status == "processed")).count()


def assert_exact(job: Job, images: int) -> None:
    """SUCCESS, every image processed and none failed, and counters == rows == one box per image."""
    stages = job.progress["stages"]
    assert job.status == JobStatus.SUCCESS, job.error
    assert (stages["process"]["processed"], stages["process"]["failed"]) == (images, 0)
    failed = JobImage.select().where((JobImage.job == job.id) & (JobImage.status == "failed"))
    assert [(r.image_id, r.error) for r in failed[:5]] == []
    assert processed(job.id) == images
    boxes = Detection.select().join(JobImage, on=(Detection.image == JobImage.image)).where(
        (JobImage.job == job.id) & (Detection.bbox_key != ""))
    classifications = Classification.select().join(Detection).join(JobImage, on=(Detection.image == JobImage.image))\
        .where(JobImage.job == job.id)
    counted = stages["results"]
    assert (counted["detections"], counted["classifications"], counted["captures"]) == (images, images, images)
    assert (boxes.count(), classifications.count()) == (images, images)
    # duplicates taken after the end are refused by the next drain, within seconds
    wait_for(lambda: not ResultInbox.select().where(ResultInbox.job_id == job.id).exists(), timeout_s=30,
             message="the inbox to be drained")


def test_a_backlog_longer_than_the_task_lease_fails_nothing_and_reruns_nothing(
        runtime, db_url, stack, moth_pipeline, worker_factory, services):
    # Given a service that answers every task at once, one image per message, and a throttled worker
    # that needs at least 8 s to save what the service produces in about one (tasks expire after 2 s)
    settings = make_settings(db_url, stack, **QUICK)
    worker_factory(settings, threads=2, PIPELINE_DELAY_AT=THROTTLE)
    seen = services(settings)
    # When an 800-image job runs
    job_id = enqueue(runtime, 800, name="backlog")
    # Then it ends SUCCESS with nothing failed and counters equal to rows, and no model ran twice: each
    # task was settled when its result was taken, before the backlog was saved
    assert_exact(finished(job_id), 800)
    assert len(seen) == 800 and max(seen.values()) == 1


def test_a_worker_killed_mid_job_costs_no_image(runtime, db_url, stack, moth_pipeline, worker_factory, services):
    # Given a throttled worker saving a 600-image job, one image per result message
    settings = make_settings(db_url, stack, PIPELINE_NATS_TASK_TTR=3, PIPELINE_NATS_MAX_DELIVER=2)
    first = worker_factory(settings, threads=2, PIPELINE_DELAY_AT=THROTTLE)
    services(settings)
    job_id = enqueue(runtime, 600, name="sigkill")
    # When it is SIGKILLed at 30 % and a new worker starts at once
    wait_for(lambda: processed(job_id) >= 180, timeout_s=60, message="30 % saved")
    kill_group(first)
    worker_factory(settings, threads=2)
    # Then the job ends SUCCESS with no image failed and exact counts
    assert_exact(finished(job_id), 600)


def test_a_redis_flush_mid_job_costs_no_image(runtime, db_url, stack, moth_pipeline, worker_factory, services):
    # Given a throttled worker with a backlog of results waiting to be saved
    settings = make_settings(db_url, stack, **QUICK)
    worker_factory(settings, threads=2, PIPELINE_DELAY_AT=THROTTLE)
    seen = services(settings)
    job_id = enqueue(runtime, 600, name="flush")
    wait_for(lambda: processed(job_id) >= 180, timeout_s=60, message="30 % saved")
    # When Redis loses everything (job state, Dramatiq's queues, locks)
    runtime.redis.flushall()
    # Then the job ends SUCCESS, exact, and no model ran twice: the results were safe in the inbox
    assert_exact(finished(job_id), 600)
    assert max(seen.values()) == 1


def test_every_result_published_twice_to_two_workers_counts_once(runtime, db_url, stack, moth_pipeline,
                                                                  worker_factory, services):
    # Given two worker processes and a service that publishes every result twice
    settings = make_settings(db_url, stack, **QUICK)
    worker_factory(settings, threads=2)
    worker_factory(settings, threads=2)
    services(settings, copies=2)
    # When a 600-image job runs
    job_id = enqueue(runtime, 600, name="twice")
    # Then each image is counted once, none failed, and counters equal rows
    assert_exact(finished(job_id), 600)


def test_results_queued_behind_another_jobs_backlog_are_not_lost(runtime, db_url, stack, moth_pipeline,
                                                                 worker_factory, services):
    # Given one busy worker thread, a job whose results take it a long time to save, and a short idle
    # window (6 s) checked every second
    settings = make_settings(db_url, stack, **QUICK, PIPELINE_STALLED_JOBS_MAX_MINUTES=0.1,
                             PIPELINE_HEALTH_CHECK_SECONDS=1)
    worker_factory(settings, threads=1, PIPELINE_DELAY_AT="after_validation=0.015")
    services(settings)
    big = enqueue(runtime, 1000, name="big")
    wait_for(lambda: processed(big) > 0, timeout_s=60, message="the big job's first results saved")
    # When a 6-image job's results arrive behind that backlog and wait longer than the idle window
    small = enqueue(runtime, 6, name="small")
    # Then the idle reconciler does not fail them as lost: they are in hand, and they decide
    assert_exact(finished(small, timeout_s=180), 6)
    assert_exact(finished(big, timeout_s=180), 1000)


def test_a_late_result_after_a_lost_verdict_supersedes_it(runtime, db_url, stack, moth_pipeline, worker_factory):
    # Given a 3-image job and a service that answers image A at once, holds image B past its only delivery
    # (B is failed as lost) and keeps C alive with +WPI meanwhile (the job still runs)
    import json

    import nats

    from pipeline import names

    settings = make_settings(db_url, stack, PIPELINE_NATS_TASK_TTR=1, PIPELINE_NATS_MAX_DELIVER=1)
    worker_factory(settings, threads=2)
    job_id = enqueue(runtime, 3, name="late")

    def status_of(msg) -> str:
        image = int(json.loads(msg.data)["image_id"])
        return JobImage.get((JobImage.job == job_id) & (JobImage.image == image)).status

    async def answer(js, msg):
        await js.publish(names.result_subject("moth-demo", job_id),
                         json.dumps(answer_one_box(json.loads(msg.data))).encode(),
                         headers={names.HDR_TASK_REPLY: msg.reply,
                                  names.HDR_TASK_TOKEN: json.loads(msg.data)["task_token"]})

    async def until(predicate, keep_alive, timeout_s=30):
        deadline = time.monotonic() + timeout_s
        while not predicate() and time.monotonic() < deadline:
            await keep_alive.in_progress()
            await asyncio.sleep(0.2)

    async def service():
        nc = await nats.connect(settings.nats_url)
        js = nc.jetstream()
        while True:
            try:
                sub = await js.pull_subscribe_bind(names.job_consumer(job_id), stream=names.tasks_stream("moth-demo"))
                break
            except Exception:  # noqa: BLE001 - not dispatched yet
                await asyncio.sleep(0.1)
        msgs = []
        while len(msgs) < 3:
            try:
                msgs += await sub.fetch(3 - len(msgs), timeout=1)
            except Exception:  # noqa: BLE001
                pass
        a, b, c = sorted(msgs, key=lambda m: int(json.loads(m.data)["image_id"]))
        await answer(js, a)
        # When B has been failed as lost and its result arrives after all
        await until(lambda: status_of(b) == "failed", keep_alive=c)
        lost_error = JobImage.get(JobImage.image == int(json.loads(b.data)["image_id"])).error
        await answer(js, b)
        await until(lambda: status_of(b) == "processed", keep_alive=c)
        await answer(js, c)
        await nc.close()
        return json.loads(b.data)["image_id"], lost_error

    late, lost_error = asyncio.run(service())
    # Then the late result decides B: processed with its rows, counted once, the lost verdict withdrawn
    assert lost_error.startswith("lost:")
    job = finished(job_id, timeout_s=60)
    row = JobImage.get((JobImage.job == job_id) & (JobImage.image == int(late)))
    assert (row.status, row.error, row.detections) == ("processed", None, 1)
    assert_exact(job, 3)


def test_results_saved_while_a_job_is_dispatched_in_many_rounds_meet_no_lock(runtime, db_url, stack, moth_pipeline,
                                                                             worker_factory, services):
    # Given a worker dispatching 50 tasks per round while a service answers every task at once (results
    # are saved between the rounds of dispatch)
    settings = make_settings(db_url, stack, PIPELINE_DISPATCH_CHUNK=50)
    worker_factory(settings, threads=4)
    services(settings)
    # When a 2,000-image job runs
    job_id = enqueue(runtime, 2000, name="interleaved")
    # Then it ends SUCCESS and exact, and run_job never met a lock or a retry
    assert_exact(finished(job_id), 2000)
    logs = worker_factory.logs()
    assert "database is locked" not in logs
    assert "Retrying message" not in logs and "run_job failed" not in logs


def test_the_bridge_stops_taking_while_the_inbox_is_full(runtime, moth_pipeline, monkeypatch):
    # Given a bridge whose inbox bound is 3 rows, and 10 result messages waiting in the results stream
    from models import ResultInbox
    from pipeline import names
    from pipeline.core import inbox
    from pipeline.core.saving import drain
    from pipeline.worker.bridge import Bridge, bridge_routes
    from tests.helpers import dispatch, fake_job, pull_tasks, success_body

    monkeypatch.setattr(inbox, "MAX_ROWS", 3)
    job = fake_job(moth_pipeline, 10)
    dispatch(runtime, job.id)
    js = runtime.tasks.queue.js

    tasks = pull_tasks(runtime, job.id, 10)

    async def publish_all():
        for task, reply in tasks:
            await js.publish(names.result_subject("moth-demo", job.id), success_body(task),
                             headers={names.HDR_TASK_REPLY: reply, names.HDR_TASK_TOKEN: task.task_token})

    runtime.runner.run(publish_all(), timeout=30)
    # (the bridge takes up to 200 per fetch: let it take one message per fetch, as a slow stream would)
    monkeypatch.setattr("pipeline.worker.bridge.FETCH_BATCH", 1)
    # nobody saves meanwhile
    monkeypatch.setattr("pipeline.worker.bridge.request_drains", lambda runtime, job_ids: None)
    bridge = Bridge(js, bridge_routes(runtime)[:1])
    running = runtime.runner.spawn(bridge.run())
    try:
        # Then it takes messages until the inbox holds more than 3, and leaves the rest in JetStream
        wait_for(lambda: ResultInbox.select().count() == 4, timeout_s=20, message="the inbox to fill")
        time.sleep(1.0)
        assert ResultInbox.select().count() == 4
        assert runtime.runner.run(js.stream_info(names.RESULTS_STREAM), timeout=10).state.messages == 6
        # And as the inbox is saved, it takes the rest, and the job ends
        def saved_to_the_end() -> bool:
            drain(runtime, job.id)
            return Job.get_by_id(job.id).status == JobStatus.SUCCESS

        wait_for(saved_to_the_end, timeout_s=30, interval_s=0.2, message="the job to end")
        assert Job.get_by_id(job.id).progress["stages"]["process"]["processed"] == 10
    finally:
        runtime.runner.loop.call_soon_threadsafe(bridge.stop)
        running.result(timeout=20)



def test_results_on_unparseable_subjects_are_dropped_and_do_not_stall_the_bridge(runtime, moth_pipeline, monkeypatch):
    # Given result messages on subjects that are not a job id ("²" passes str.isdigit(), 20 digits overflow
    # an id) ahead of a valid one, and a consumer named like a job that is not one
    from nats.js.api import ConsumerConfig

    from models import ResultInbox
    from pipeline import names
    from pipeline.ops.health import build_report
    from pipeline.worker.bridge import Bridge, bridge_routes
    from tests.helpers import dispatch, fake_job, pull_tasks, success_body

    job = fake_job(moth_pipeline, 1)
    dispatch(runtime, job.id)
    [(task, reply)] = pull_tasks(runtime, job.id, 1)
    js = runtime.tasks.queue.js

    async def publish():
        for subject in ("pipeline.results.²", "pipeline.results.99999999999999999999"):
            await js.publish(subject, b"{}")
        await js.publish(names.result_subject("moth-demo", job.id), success_body(task),
                             headers={names.HDR_TASK_REPLY: reply, names.HDR_TASK_TOKEN: task.task_token})
        await js.add_consumer(names.tasks_stream("moth-demo"), ConsumerConfig(durable_name="job-²",
                                                                 filter_subject="pipeline.tasks.moth-demo.²"))

    runtime.runner.run(publish(), timeout=30)
    monkeypatch.setattr("pipeline.worker.bridge.request_drains", lambda runtime, job_ids: None)
    bridge = Bridge(js, bridge_routes(runtime)[:1])
    running = runtime.runner.spawn(bridge.run())
    try:
        # When the bridge runs, then the odd messages are terminated (removed) and the valid one is taken
        wait_for(lambda: ResultInbox.select().where(ResultInbox.job_id == job.id).count() == 1, timeout_s=20,
                 message="the valid result to be taken")
        wait_for(lambda: runtime.runner.run(js.stream_info(names.RESULTS_STREAM), timeout=10).state.messages == 0,
                 timeout_s=20, message="the results stream to be empty")
    finally:
        runtime.runner.loop.call_soon_threadsafe(bridge.stop)
        running.result(timeout=20)
    # And the odd consumer is no job: listing the pipeline's jobs and the health report skip it
    assert [c.job_id for c in runtime.tasks.job_consumers(moth_pipeline)] == [job.id]
    status, report = build_report(runtime.settings, runtime.runner)
    assert [j["id"] for j in report["jobs"]] == [job.id]
