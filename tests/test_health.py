"""jobs_health_check against real NATS, Redis and the database: lost images (invariant 8), outages
(invariant 9), state rebuild, the reaper, zombies, the advisory fast path, and the scheduler."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time

import nats
import pytest

from models import Detection, ImageStatus, Job, JobImage, JobStatus, Pipeline, utcnow
from pipeline import names
from pipeline.core.jobs import cancel
from pipeline.core.lost import handle_advisory
from pipeline.core.outcomes import load_job
from pipeline.core.reconciler import CheckResult, HealthCheck, run_health_check
from pipeline.errors import UserInputError
from pipeline.infra.runtime import Runtime, set_runtime
from pipeline.worker.scheduler import SlotScheduler
from tests.conftest import make_settings
from tests.helpers import (
    dispatch,
    error_body,
    fake_job,
    handle_result_message,
    job_with_results,
    nats_client,
    pull_tasks,
    stream_count,
    success_body,
    token_of,
)


@pytest.fixture
def quick(db_url, stack, moth_pipeline):
    """A runtime whose tasks give up fast: ack_wait 1 s, max_deliver 1 (exhausted 1 s after delivery)."""
    from tests.conftest import clean_servers

    clean_servers(stack)
    rt = Runtime(make_settings(db_url, stack, PIPELINE_NATS_TASK_TTR=1, PIPELINE_NATS_MAX_DELIVER=1))
    previous = set_runtime(rt)
    yield rt
    set_runtime(previous)
    rt.close()


def make_idle(job_id: int, minutes: float = 11) -> None:
    past = utcnow() - dt.timedelta(minutes=minutes)
    Job.update(last_progress_at=past, dispatched_at=past, updated_at=past).where(Job.id == job_id).execute()


def run_job_with(rt, n: int, *, processed: int, errors: int) -> tuple[Job, list[str]]:
    """Dispatch n images, pull them all, answer `processed` successes and `errors` error results; the
    rest are never answered (lost). Returns the job and the lost image ids."""
    job = fake_job("moth-demo", n)
    dispatch(rt, job.id)
    tasks = sorted(pull_tasks(rt, job.id, n), key=lambda t: int(t[0].image_id))
    for task, reply in tasks[:processed]:
        handle_result_message(rt, job.id, success_body(task, boxes=1), reply, task.task_token)
    for task, reply in tasks[processed:processed + errors]:
        handle_result_message(rt, job.id, error_body(task.image_id), reply, task.task_token)
    return job, [t.image_id for t, _ in tasks[processed + errors:]]


def gone_quiet(job_id: int) -> None:
    """Wait until JetStream gave up on the unanswered tasks (1 s) plus two ack_waits of silence, then age
    the job past the idle cutoff: what the lost_images check looks for."""
    time.sleep(3.2)
    make_idle(job_id)


def test_twenty_images_fifteen_processed_three_errors_two_lost_is_success(quick):
    job, lost = run_job_with(quick, 20, processed=15, errors=3)
    gone_quiet(job.id)
    report = run_health_check(quick)
    job = Job.get_by_id(job.id)
    assert report["lost_images"]["jobs"] == {str(job.id): "marked_failed"}
    assert (report["lost_images"]["fixed"], report["stale_jobs"]["fixed"]) == (1, 0)
    assert (job.status, job.progress["stages"]["process"]["failed"]) == (JobStatus.SUCCESS, 5)
    assert {r.error.split(":")[0] for r in JobImage.select().where(JobImage.image.in_([int(i) for i in lost]))} \
        == {"lost"}


def test_ten_images_three_processed_seven_lost_is_failure(quick):
    job, _ = run_job_with(quick, 10, processed=3, errors=0)
    gone_quiet(job.id)
    run_health_check(quick)
    job = Job.get_by_id(job.id)
    assert (job.status, job.progress["stages"]["process"]["failed"]) == (JobStatus.FAILURE, 7)


def test_the_diagnostic_lists_ten_ids_and_counts_the_rest(quick):
    job, lost = run_job_with(quick, 30, processed=4, errors=1)
    gone_quiet(job.id)
    run_health_check(quick)
    [entry] = Job.get_by_id(job.id).progress["errors"]
    assert entry.startswith("jobs_health_check: marked 25 image(s) as failed (job idle past cutoff; "
                            "NATS consumer num_pending=0 num_ack_pending=")
    assert entry.endswith("... and 15 more")
    assert f"'{lost[0]}'" in entry and f"'{lost[-1]}'" not in entry


def test_tasks_never_delivered_are_not_lost_and_the_job_waits(quick):
    job = fake_job("moth-demo", 4)
    dispatch(quick, job.id)  # no processing service ever pulls
    make_idle(job.id, minutes=30)
    report = run_health_check(quick)
    assert report["lost_images"]["jobs"] == {str(job.id): "waiting"}
    assert report["stale_jobs"]["jobs"] == {str(job.id): "left_to_reconciliation"}
    assert "no processing service has pulled tasks for pipeline moth-demo for 30 min (4 task(s) waiting)" in \
        report["lost_images"]["notes"][0]
    job = Job.get_by_id(job.id)
    assert (job.status, job.progress["stages"]["process"]["failed"]) == (JobStatus.STARTED, 0)


def test_a_job_that_made_progress_after_selection_is_raced_not_failed(quick):
    job, _ = run_job_with(quick, 3, processed=1, errors=0)
    gone_quiet(job.id)
    stale = load_job(job.id)  # selected as idle ...
    Job.update(last_progress_at=utcnow()).where(Job.id == job.id).execute()  # ... then a result arrived
    assert HealthCheck(quick)._reconcile(stale, CheckResult()) == "raced"
    assert quick.state.snapshot(job.id).failed == 0


def test_a_late_result_after_the_job_ended_is_refused_and_changes_nothing(quick):
    # Given a job that ended SUCCESS with two images failed as lost
    job, lost = run_job_with(quick, 4, processed=2, errors=0)
    gone_quiet(job.id)
    run_health_check(quick)
    assert Job.get_by_id(job.id).status == JobStatus.SUCCESS
    from pipeline.schemas import Task

    # When a result for one of them arrives after all
    late = Task(job.id, lost[0], "file:///late.png", "moth-demo")
    handled = handle_result_message(quick, job.id, success_body(late, boxes=3), None, token_of(job.id, lost[0]))
    # Then it is refused: no rows on a failed image, counters equal rows
    job = Job.get_by_id(job.id)
    assert handled.action == "late"
    assert Detection.select().where(Detection.image == int(lost[0])).count() == 0
    assert JobImage.get(JobImage.image == int(lost[0])).status == ImageStatus.FAILED
    assert (job.progress["stages"]["process"]["failed"], job.progress["stages"]["results"]["detections"]) == (2, 2)


def test_a_late_result_while_the_job_runs_supersedes_the_lost_verdict(quick):
    # Given a running 5-image job with two results saved, two images failed as lost and one still pending
    job, lost = run_job_with(quick, 5, processed=2, errors=0)
    from pipeline.core.lost import fail_lost
    from pipeline.schemas import Task

    fail_lost(quick, load_job(job.id), lost[:2], "lost: JetStream gave up after 2 deliveries")
    assert Job.get_by_id(job.id).progress["stages"]["process"]["failed"] == 2
    # When a valid result for one of the lost images arrives, twice (a replay)
    late = Task(job.id, lost[0], "file:///late.png", "moth-demo")
    for _ in range(2):
        handle_result_message(quick, job.id, success_body(late, boxes=3), None, token_of(job.id, lost[0]))
    # Then it decides that image: processed, its rows saved, counters corrected once, equal to the rows
    row = JobImage.get(JobImage.image == int(lost[0]))
    assert (row.status, row.error, row.detections) == (ImageStatus.PROCESSED, None, 3)
    stages = Job.get_by_id(job.id).progress["stages"]
    assert (stages["process"]["processed"], stages["process"]["failed"]) == (4, 1)
    detections = Detection.select().join(JobImage, on=(Detection.image == JobImage.image)).where(
        (JobImage.job == job.id) & (Detection.bbox_key != "")).count()
    assert stages["results"]["detections"] == detections == 2 * 1 + 3
    assert (stages["results"]["captures"], quick.state.snapshot(job.id).failed) == (3, 1)
    # And an error result for the other lost image does not change its verdict
    handle_result_message(quick, job.id, error_body(lost[1]), None, token_of(job.id, lost[1]))
    assert JobImage.get(JobImage.image == int(lost[1])).error.startswith("lost:")


@pytest.mark.parametrize("outage", ["nats", "redis"])
def test_an_unreachable_dependency_during_a_tick_revokes_nothing(private_runtime, outage):
    rt, dev = private_runtime
    job = fake_job("moth-demo", 3)
    dispatch(rt, job.id)
    make_idle(job.id, minutes=60)
    getattr(dev, outage).stop()
    report = run_health_check(rt)
    assert report["lost_images"]["jobs"] == {str(job.id): "error"}
    assert report["stale_jobs"]["jobs"] == {str(job.id): "skipped_unreachable"}
    assert Job.get_by_id(job.id).status == JobStatus.STARTED


def test_missing_redis_state_is_rebuilt_and_the_job_completes_exactly(runtime, moth_pipeline):
    job, tasks = job_with_results(runtime, moth_pipeline, 4, 2)
    runtime.redis.flushall()
    report = run_health_check(runtime)
    assert report["state_rebuild"]["jobs"] == {str(job.id): "redis_rebuilt"}
    assert runtime.state.snapshot(job.id).processed == 2
    for task, reply in tasks:
        handle_result_message(runtime, job.id, success_body(task, boxes=2), reply, task.task_token)
    job = Job.get_by_id(job.id)
    assert (job.status, job.progress["stages"]["results"]["detections"]) == (JobStatus.SUCCESS, 8)


def test_a_sweep_looks_closely_only_at_candidates(runtime, moth_pipeline, monkeypatch):
    # Given 6 healthy running jobs and one whose Redis state is gone
    jobs = [fake_job(moth_pipeline, 3, prefix=f"file:///sweep{k}") for k in range(7)]
    for job in jobs:
        dispatch(runtime, job.id)
    runtime.state.delete(jobs[3].id)
    per_job = []
    for name in ("consumer_state", "pending_ids"):
        owner = runtime.tasks.queue if name == "consumer_state" else runtime.state
        original = getattr(owner, name)

        def counted(job_id, *a, _original=original, _name=name, **kw):
            per_job.append((_name, job_id))
            return _original(job_id, *a, **kw)

        monkeypatch.setattr(owner, name, counted)
    # When the health check runs, only the broken job gets per-job NATS/Redis reads; the healthy ones are
    # covered by one consumer listing and one Redis pipeline, however many there are
    report = HealthCheck(runtime).run()
    assert report["state_rebuild"]["jobs"] == {**{str(j.id): "ok" for j in jobs}, str(jobs[3].id): "redis_rebuilt"}
    assert per_job == []  # the rebuild needed neither: its consumer exists
    assert runtime.state.snapshot(jobs[3].id).total == 3


def test_an_idle_job_counted_in_redis_but_not_in_the_database_is_resynced(runtime, moth_pipeline):
    # Given an idle job whose last image Redis counted although its result was never committed (the worker
    # died between the gate and the commit, and the result never came back)
    from pipeline.infra.jobstate import Outcome

    job, tasks = job_with_results(runtime, moth_pipeline, 3, 2)
    lost = tasks[2][0].image_id
    runtime.state.record(job.id, [Outcome(lost, captures=1, detections=2, classifications=2)])
    make_idle(job.id)
    # When the health check runs, it does not end the job on Redis's word: it reloads Redis from the
    # database, so the image is pending again (and will be redelivered, or reconciled as lost)
    report = HealthCheck(runtime).run()
    assert report["lost_images"]["jobs"] == {str(job.id): "resynced"}
    assert Job.get_by_id(job.id).status == JobStatus.STARTED
    assert runtime.state.pending_ids(job.id) == {lost}
    assert runtime.state.snapshot(job.id).detections == 4


def test_lost_nats_tasks_are_dispatched_again(runtime, moth_pipeline, stack):
    job = fake_job(moth_pipeline, 3)
    dispatch(runtime, job.id)
    [(task, reply)] = pull_tasks(runtime, job.id, 1)
    handle_result_message(runtime, job.id, success_body(task), reply, task.task_token)
    from pipeline.ops import chaos

    asyncio.run(chaos.flush_nats(stack.nats_url))  # the streams, consumers and tasks are gone
    report = run_health_check(runtime)
    assert report["state_rebuild"]["jobs"] == {str(job.id): "redispatched"}
    assert stream_count(runtime, job.id, moth_pipeline) == 2  # only the pending images
    for task, reply in pull_tasks(runtime, job.id, 2):
        handle_result_message(runtime, job.id, success_body(task), reply, task.task_token)
    assert Job.get_by_id(job.id).status == JobStatus.SUCCESS


def test_the_reaper_revokes_only_what_no_check_can_move(runtime, moth_pipeline):
    internal = fake_job(moth_pipeline, 2, prefix="file:///i", dispatch_mode="internal")
    undispatched = fake_job(moth_pipeline, 2, prefix="file:///u")
    waiting = fake_job(moth_pipeline, 2, prefix="file:///w")
    dispatch(runtime, waiting.id)
    for job in (internal, undispatched):
        Job.update(status=JobStatus.STARTED).where(Job.id == job.id).execute()
    for job in (internal, undispatched, waiting):
        make_idle(job.id)
    Job.update(dispatched_at=None).where(Job.id.in_([internal.id, undispatched.id])).execute()
    report = run_health_check(runtime)
    assert report["stale_jobs"]["jobs"] == {str(internal.id): "revoked", str(undispatched.id): "revoked",
                                            str(waiting.id): "left_to_reconciliation"}
    assert "its worker is gone" in Job.get_by_id(internal.id).error
    assert "run_job stopped before dispatching" in Job.get_by_id(undispatched.id).error
    assert Job.get_by_id(waiting.id).status == JobStatus.STARTED


def test_a_stuck_cancel_is_finished(runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)
    Job.update(status=JobStatus.CANCELING, updated_at=utcnow() - dt.timedelta(minutes=5)).where(
        Job.id == job.id).execute()
    report = run_health_check(runtime)
    assert report["stale_jobs"]["jobs"] == {str(job.id): "cancel_finished"}
    assert Job.get_by_id(job.id).status == JobStatus.REVOKED
    assert runtime.tasks.consumer_state(job.id, "moth-demo").exists is False


def test_zombie_consumers_and_keys_are_removed_after_the_grace_period(runtime, moth_pipeline):
    ended = fake_job(moth_pipeline, 2, prefix="file:///e")
    recent = fake_job(moth_pipeline, 2, prefix="file:///r")
    for job in (ended, recent):
        dispatch(runtime, job.id)
        Job.update(status=JobStatus.SUCCESS, finished_at=utcnow()).where(Job.id == job.id).execute()
    Job.update(finished_at=utcnow() - dt.timedelta(minutes=10)).where(Job.id == ended.id).execute()
    runtime.state.load(999, [("1", "pending", 0, 0)])  # state of a job that no longer exists
    report = run_health_check(runtime)
    assert report["zombies"]["jobs"] == {str(ended.id): "consumer_removed,redis_removed", "999": "redis_removed"}
    assert runtime.tasks.consumer_state(ended.id, "moth-demo").exists is False
    assert runtime.tasks.consumer_state(recent.id, "moth-demo").exists is True
    assert runtime.redis.keys(f"jetpipe:job:{ended.id}:*") == [] and runtime.redis.keys("jetpipe:job:999:*") == []


def test_one_sub_check_raising_does_not_stop_the_others(runtime, moth_pipeline):
    class BrokenLostImages(HealthCheck):
        def lost_images(self):
            raise RuntimeError("boom")

    job = fake_job(moth_pipeline, 1, dispatch_mode="internal")
    Job.update(status=JobStatus.STARTED).where(Job.id == job.id).execute()
    make_idle(job.id)
    report = BrokenLostImages(runtime).run()
    assert report["lost_images"] == {"checked": 0, "fixed": 0, "unfixable": 1, "error": "RuntimeError: boom"}
    assert report["stale_jobs"]["jobs"] == {str(job.id): "revoked"}


def read_advisories(rt, count: int, timeout_s: float = 10) -> list[str]:
    async def read():
        async with nats_client(rt.settings.nats_url) as nc:
            sub = await nc.jetstream().pull_subscribe(">", durable="test-reader", stream=names.ADVISORIES_STREAM)
            got, deadline = [], time.monotonic() + timeout_s
            while len(got) < count and time.monotonic() < deadline:
                try:
                    got += [m.data.decode() for m in await sub.fetch(count - len(got), timeout=1)]
                except (nats.errors.TimeoutError, TimeoutError):
                    pass
            return got

    return rt.runner.run(read(), timeout=timeout_s + 10)


def test_max_deliveries_advisory_fails_the_image_idempotently(quick):
    job = fake_job("moth-demo", 5)
    dispatch(quick, job.id)
    tasks = pull_tasks(quick, job.id, 5)
    for task, reply in tasks[:3]:
        handle_result_message(quick, job.id, success_body(task), reply, task.task_token)
    # the other two are never answered: with max_deliver=1, JetStream gives up after ack_wait (1 s)
    advisories = read_advisories(quick, 2)
    assert len(advisories) == 2 and all("max_deliver" in json.loads(a)["type"] for a in advisories)
    assert [handle_advisory(quick, a)[0] for a in advisories] == ["failed", "failed"]
    assert [handle_advisory(quick, a)[0] for a in advisories] == ["job_ended", "job_ended"]  # duplicates
    job = Job.get_by_id(job.id)
    assert (job.status, job.progress["stages"]["process"]["failed"]) == (JobStatus.SUCCESS, 2)
    assert stream_count(quick, job.id, "moth-demo") == 0
    errors = {r.error for r in JobImage.select().where(JobImage.status == "failed")}
    assert errors == {"lost: JetStream gave up after 1 deliveries (max_deliver=1) without a result"}


def test_a_lost_verdict_waits_for_a_result_published_before_the_give_up(quick):
    # Given a result published for image A (not yet taken: no worker is running) while JetStream gives up
    # on A's task (max_deliver=1, ack_wait 1 s)
    job = fake_job("moth-demo", 2)
    dispatch(quick, job.id)
    (task_a, reply_a), (task_b, reply_b) = sorted(pull_tasks(quick, job.id, 2), key=lambda t: int(t[0].image_id))
    body = success_body(task_a, boxes=2)

    async def publish(js):
        headers = {names.HDR_TASK_REPLY: reply_a, names.HDR_TASK_TOKEN: task_a.task_token}
        return (await js.publish(names.result_subject("moth-demo", job.id), body, headers=headers)).seq

    result_seq = quick.runner.run(publish(quick.tasks.queue.js))
    by_seq = {json.loads(a)["stream_seq"]: a for a in read_advisories(quick, 2)}
    advisory_a, advisory_b = (by_seq[names.parse_ack_subject(r)[3]] for r in (reply_a, reply_b))
    # When the advisories are handled, both verdicts wait: a result of the job published before the give-up
    # is in hand, and it could be any image's
    (outcome_a, up_to_a), (outcome_b, up_to_b) = handle_advisory(quick, advisory_a), handle_advisory(quick, advisory_b)
    assert (outcome_a, outcome_b) == ("deferred", "deferred") and min(up_to_a, up_to_b) >= result_seq
    assert JobImage.select().where(JobImage.status == "pending").count() == 2
    # And once that result is taken and saved, A is processed, not lost, and B, which had none, is lost
    handle_result_message(quick, job.id, body, reply_a, task_a.task_token)
    quick.runner.run(quick.tasks.queue.js.delete_msg(names.RESULTS_STREAM, result_seq))  # as the bridge's ACK
    assert handle_advisory(quick, advisory_a, up_to_a)[0] in ("already_settled", "unknown_image")  # task ACKed
    assert handle_advisory(quick, advisory_b, up_to_b)[0] == "failed"
    statuses = {str(r.image_id): (r.status, r.error) for r in JobImage.select()}
    assert statuses[task_a.image_id] == ("processed", None)
    assert statuses[task_b.image_id][1].startswith("lost:")
    assert Job.get_by_id(job.id).status == JobStatus.SUCCESS  # 1 of 2 failed is not above the threshold


def test_an_advisory_for_an_image_that_succeeded_changes_nothing(quick):
    job = fake_job("moth-demo", 2)
    dispatch(quick, job.id)
    tasks = {t.image_id: (t, r) for t, r in pull_tasks(quick, job.id, 2)}
    [advisory, _] = read_advisories(quick, 2)
    _, image_id = quick.tasks.task_at(names.tasks_stream("moth-demo"), json.loads(advisory)["stream_seq"])
    # the result for that very task arrives late, after JetStream gave up (late ACKs are accepted and
    # delete the task), and only then is the advisory handled
    task, reply = tasks[image_id]
    handle_result_message(quick, job.id, success_body(task, boxes=2), reply, task.task_token)
    assert handle_advisory(quick, advisory)[0] in ("already_settled", "unknown_image")
    snap = quick.state.snapshot(job.id)
    assert (snap.processed, snap.failed, snap.detections) == (1, 0, 2)


def test_an_advisory_naming_another_jobs_task_is_ignored(quick):
    # Given two jobs, and an advisory of job A's consumer edited to name a task of job B (as a forger would)
    a, b = fake_job("moth-demo", 1), fake_job("moth-demo", 1)
    dispatch(quick, a.id)
    dispatch(quick, b.id)
    [(_, reply_b)] = pull_tasks(quick, b.id, 1)
    forged = json.dumps({"type": "io.nats.jetstream.advisory.v1.max_deliver", "stream": names.tasks_stream("moth-demo"),
                         "consumer": names.job_consumer(a.id), "stream_seq": names.parse_ack_subject(reply_b)[3],
                         "deliveries": 2})
    # When it is handled, nothing is failed or deleted: the task it names is not one of job A's
    assert handle_advisory(quick, forged)[0] == "not_ours"
    assert JobImage.select().where(JobImage.status == "failed").count() == 0
    assert stream_count(quick, b.id, "moth-demo") == 1


def test_cancel_of_a_terminal_job_changes_nothing(runtime, moth_pipeline):
    job = Job.create(name="x", pipeline=Pipeline.get(slug=moth_pipeline), status=JobStatus.SUCCESS)
    assert cancel(runtime, job.id) == JobStatus.SUCCESS


def test_two_schedulers_send_once_per_slot(stack):
    import redis

    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    client.flushall()
    now = [1_000_000.0]
    sent: list[tuple[str, int]] = []
    a = SlotScheduler(client, "probe", 10, lambda slot: sent.append(("a", slot)), clock=lambda: now[0])
    b = SlotScheduler(client, "probe", 10, lambda slot: sent.append(("b", slot)), clock=lambda: now[0])
    b.identity = "other-host:1"
    for _ in range(40):  # 40 ticks each, 2.5 s apart: 10 slots
        a.tick()
        b.tick()
        now[0] += 2.5
    slots = [slot for _, slot in sent]
    assert len(slots) == len(set(slots)) == 10
    assert {who for who, _ in sent} <= {"a", "b"}


def test_overlapping_health_checks_are_skipped(runtime, caplog):
    from actors.health import jobs_health_check

    runtime.redis.set(names.periodic_lock_key("jobs_health_check"), "someone-else", px=60_000)
    slot = int(time.time() // runtime.settings.health_check_seconds)
    with caplog.at_level("INFO"):
        jobs_health_check.fn(slot)
    assert f"jobs_health_check slot={slot} skipped: another run is in progress" in caplog.text
    assert runtime.redis.get(names.HEALTH_LAST_KEY) is None


def test_a_health_check_tick_that_waited_past_the_next_one_is_skipped_not_dead_lettered(runtime, caplog):
    # Given a tick sent three slots ago (it waited in a busy queue)
    from actors.health import jobs_health_check

    stale = int(time.time() // runtime.settings.health_check_seconds) - 3
    with caplog.at_level("INFO"):
        jobs_health_check.fn(stale)
    # Then it does nothing and says so (the current tick does the work)
    assert f"jobs_health_check slot={stale} skipped: stale" in caplog.text
    assert runtime.redis.get(names.HEALTH_LAST_KEY) is None


def test_a_job_nobody_picks_up_waits_with_its_time_left_then_ends_failure_saying_why(runtime, moth_pipeline):
    # Given a job whose pipeline no service serves, with a pickup timeout of one hour
    from pipeline.infra.aio import LoopThread
    from pipeline.ops.health import build_report

    job = fake_job(moth_pipeline, 3, pickup_timeout_s=3600)
    dispatch(runtime, job.id)
    dispatched = Job.get_by_id(job.id).dispatched_at
    # Before the deadline: nothing is failed, and `health` says it waits and how long is left
    report = run_health_check(runtime, now=dispatched + dt.timedelta(minutes=59))
    assert report["deadlines"]["checked"] == 0 and Job.get_by_id(job.id).status == JobStatus.STARTED
    Job.update(dispatched_at=dispatched - dt.timedelta(minutes=50)).where(Job.id == job.id).execute()
    loop = LoopThread()
    try:
        _, health = build_report(runtime.settings, loop)
    finally:
        loop.stop()
    [problem] = [p for p in health["problems"] if p.startswith(f"job {job.id} waits")]
    assert "it ends FAILURE in 10 min unless one does" in problem
    # After it: the job ends FAILURE with the reason, its images failed with it, its tasks gone
    report = run_health_check(runtime, now=dispatched + dt.timedelta(minutes=11))
    assert report["deadlines"]["jobs"] == {str(job.id): "not_picked_up"}
    ended = Job.get_by_id(job.id)
    reason = "no processing service picked up a task of pipeline moth-demo within 1 h of dispatch"
    assert (ended.status, ended.error) == (JobStatus.FAILURE, reason)
    assert {r.error for r in JobImage.select().where(JobImage.job == job.id)} == {reason}
    assert ended.progress["stages"]["process"]["failed"] == 3
    assert runtime.tasks.consumer_state(job.id, "moth-demo").exists is False


def test_a_job_a_service_picked_up_is_never_failed_for_pickup(runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 2, pickup_timeout_s=60)
    dispatch(runtime, job.id)
    pull_tasks(runtime, job.id, 1)  # a service took one task and works on it
    report = run_health_check(runtime, now=utcnow() + dt.timedelta(hours=2))
    assert report["deadlines"]["jobs"] == {} and Job.get_by_id(job.id).status == JobStatus.STARTED


def test_past_its_deadline_a_jobs_pending_images_fail_and_the_threshold_decides(runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 4, deadline_s=600)
    dispatch(runtime, job.id)
    tasks = pull_tasks(runtime, job.id, 4)
    for task, reply in tasks[:3]:
        handle_result_message(runtime, job.id, success_body(task, boxes=1), reply, task.task_token)
    assert run_health_check(runtime)["deadlines"]["checked"] == 0  # not yet
    report = run_health_check(runtime, now=utcnow() + dt.timedelta(minutes=11))
    assert report["deadlines"]["jobs"] == {str(job.id): "deadline_passed"}
    ended = Job.get_by_id(job.id)
    assert (ended.status, ended.progress["stages"]["process"]["failed"]) == (JobStatus.SUCCESS, 1)  # 1/4 <= 0.5
    [failed] = JobImage.select().where((JobImage.job == job.id) & (JobImage.status == "failed"))
    assert failed.error.startswith("deadline passed: the job was to end by ")


def test_bad_pickup_timeouts_and_deadlines_are_refused(runtime, moth_pipeline):
    with pytest.raises(UserInputError, match="the pickup timeout must be a positive number of seconds"):
        fake_job(moth_pipeline, 1, pickup_timeout_s=0)
    with pytest.raises(UserInputError, match="the deadline must be a positive number of seconds"):
        fake_job(moth_pipeline, 1, deadline_s=-5)
    assert Job.select().count() == 0


# ---- the reconciler, job by job (invariant 13) -------------------------------------------------------------

def test_one_jobs_trouble_never_skips_the_other_jobs_of_a_tick(quick, monkeypatch):
    # Given two idle jobs with lost images, the first of which raises in the middle of its reconciliation
    from pipeline.core import reconciler as health

    first, _ = run_job_with(quick, 3, processed=1, errors=0)
    second, second_lost = run_job_with(quick, 3, processed=1, errors=0)
    gone_quiet(first.id)
    make_idle(second.id)
    append_error = health.append_error

    def fails_for_the_first(job_id, message):
        if job_id == first.id:
            raise RuntimeError("the job's progress JSON could not be read")
        append_error(job_id, message)

    monkeypatch.setattr(health, "append_error", fails_for_the_first)
    # When the health check runs
    report = run_health_check(quick)
    # Then the second job is reconciled all the same, and the first is reported, left alone, never reaped
    assert report["lost_images"]["jobs"] == {str(first.id): "error", str(second.id): "marked_failed"}
    assert any("the job's progress JSON could not be read" in n for n in report["lost_images"]["notes"])
    assert report["stale_jobs"]["jobs"][str(first.id)] == "skipped_unreachable"
    assert Job.get_by_id(first.id).status == JobStatus.STARTED
    assert {str(i.image_id) for i in JobImage.select().where(
        (JobImage.job == second.id) & (JobImage.status == ImageStatus.FAILED))} == set(second_lost)


def test_an_idle_job_whose_consumer_is_gone_is_redispatched_not_failed(quick):
    job, lost = run_job_with(quick, 3, processed=1, errors=0)
    gone_quiet(job.id)

    async def remove_consumer():  # as `nats consumer rm` would: the tasks stay in the stream
        async with nats_client(quick.settings.nats_url) as nc:
            await nc.jetstream().delete_consumer(names.tasks_stream("moth-demo"), names.job_consumer(job.id))

    quick.runner.run(remove_consumer(), timeout=10)
    report = run_health_check(quick)
    assert report["lost_images"]["jobs"] == {str(job.id): "no_consumer"}
    assert report["state_rebuild"]["jobs"] == {str(job.id): "redispatched"}
    assert report["stale_jobs"]["jobs"] == {str(job.id): "skipped_unreachable"}
    assert sorted(t.image_id for t, _ in pull_tasks(quick, job.id, 2)) == sorted(lost)  # delivered again
    assert Job.get_by_id(job.id).progress["stages"]["process"]["failed"] == 0


def test_an_idle_job_with_every_image_counted_is_finalized(quick):
    # Given a job whose every image is counted and saved but whose end was never written (its last
    # drain's process died between the commit and the terminal transition)
    job, _ = run_job_with(quick, 2, processed=2, errors=0)
    Job.update(status=JobStatus.STARTED, finished_at=None, cleaned_up_at=None).where(Job.id == job.id).execute()
    from pipeline.core.jobs import rebuild_state

    rebuild_state(quick.state, job.id)
    make_idle(job.id)
    report = run_health_check(quick)
    assert report["lost_images"]["jobs"] == {str(job.id): "finalized"}
    ended = Job.get_by_id(job.id)
    assert (ended.status, ended.progress["stages"]["process"]["failed"]) == (JobStatus.SUCCESS, 0)


def test_an_idle_job_whose_results_are_being_drained_elsewhere_loses_nothing(quick):
    # Given an idle job whose tasks JetStream gave up on, while a result of it waits in the inbox and
    # another worker holds the job's drain lock (it is saving right now)
    from pipeline.core.inbox import Incoming, take
    from pipeline.core.saving import drain

    job = fake_job("moth-demo", 2)
    dispatch(quick, job.id)
    tasks = pull_tasks(quick, job.id, 2)
    take(quick, [Incoming.direct(job.id, success_body(task), reply, task.task_token) for task, reply in tasks])
    lanes = range(quick.settings.save_lanes)
    tokens = {lane: quick.state.try_lock(names.drain_lock_key(job.id, lane), 60_000) for lane in lanes}
    gone_quiet(job.id)
    # When the health check runs, nothing is failed as lost: those results decide their images
    report = run_health_check(quick)
    assert report["lost_images"]["jobs"] == {str(job.id): "results_queued"}
    assert Job.get_by_id(job.id).progress["stages"]["process"]["failed"] == 0
    # And once the drainer is done, the job ends SUCCESS exact
    for lane, token in tokens.items():
        quick.state.release(names.drain_lock_key(job.id, lane), token)
    drain(quick, job.id)
    ended = Job.get_by_id(job.id)
    assert (ended.status, ended.progress["stages"]["process"]["failed"]) == (JobStatus.SUCCESS, 0)


def test_the_job_log_lists_every_lost_image_over_as_many_lines_as_it_takes(quick):
    from models import JobLog

    job, lost = run_job_with(quick, 700, processed=0, errors=0)
    gone_quiet(job.id)
    run_health_check(quick)
    lines = [r.message for r in JobLog.select().where((JobLog.job == job.id) & JobLog.message.contains("IDs ("))]
    assert len(lines) >= 2 and all(len(line) <= 2000 for line in lines)
    listed = [i for line in lines for i in line.rsplit(": ", 1)[1].split(", ")]
    assert sorted(listed) == sorted(lost)
