"""Handling result messages against real NATS, Redis and the database (invariants 1, 2, 5, 9, 10)."""

from __future__ import annotations

import json

import pytest

from models import Detection, ImageStatus, Job, JobImage, JobLog, JobStatus, ResultInbox
from pipeline import names
from tests.helpers import (
    dispatch,
    error_body,
    fake_job,
    handle_result_message,
    job_with_results,
    pull_tasks,
    stream_count,
    success_body,
)


def counters(job_id):
    job = Job.get_by_id(job_id)
    s = job.progress["stages"]
    return (job.status, s["process"]["processed"], s["process"]["failed"], s["results"]["detections"],
            s["results"]["classifications"], s["results"]["captures"])


def test_a_job_completes_when_every_result_is_handled(runtime, moth_pipeline):
    # Given a dispatched 5-image job whose tasks a service pulled
    job = fake_job(moth_pipeline, 5)
    dispatch(runtime, job.id)
    tasks = pull_tasks(runtime, job.id, 5)
    assert len(tasks) == 5
    # When every result is handled
    for task, reply in tasks:
        handle_result_message(runtime, job.id, success_body(task, boxes=2), reply, task.task_token)
    # Then the job is SUCCESS with exact counts, its tasks are gone from NATS, its state is cleaned up
    assert counters(job.id) == (JobStatus.SUCCESS, 5, 0, 10, 10, 5)
    assert runtime.tasks.consumer_state(job.id, "moth-demo").exists is False
    assert stream_count(runtime, job.id, moth_pipeline) == 0
    assert runtime.state.snapshot(job.id) is None
    assert Job.get_by_id(job.id).cleaned_up_at is not None


def test_the_same_result_delivered_three_times_leaves_counts_exact(runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 3)
    dispatch(runtime, job.id)
    (task, reply), *rest = pull_tasks(runtime, job.id, 3)
    for _ in range(3):
        handle_result_message(runtime, job.id, success_body(task, boxes=4), reply, task.task_token)
    assert counters(job.id) == (JobStatus.STARTED, 1, 0, 4, 4, 1)
    assert Detection.select().count() == 4


def test_the_task_is_acked_once_its_result_is_taken_and_the_result_saved_later(runtime, moth_pipeline):
    # Given a pulled task whose result has not been handled: it is still in the stream
    from pipeline.core.inbox import Incoming, take
    from pipeline.core.saving import drain

    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)
    [(task, reply)] = pull_tasks(runtime, job.id, 1)
    assert stream_count(runtime, job.id, moth_pipeline) == 2
    # When its result is taken into the inbox, the task is settled (removed from the WorkQueue stream)
    # before anything is saved
    take(runtime, [Incoming.direct(job.id, success_body(task), reply, task.task_token)])
    assert stream_count(runtime, job.id, moth_pipeline) == 1
    assert (ResultInbox.select().count(), runtime.state.snapshot(job.id).processed) == (1, 0)
    # And when the inbox is drained, the result is saved and counted and its row is gone
    drain(runtime, job.id)
    assert (ResultInbox.select().count(), runtime.state.snapshot(job.id).processed) == (0, 1)


def test_a_reply_subject_of_another_image_is_not_acked(runtime, moth_pipeline):
    # Given a job's two pulled tasks A and B
    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)
    (task_a, reply_a), (task_b, reply_b) = pull_tasks(runtime, job.id, 2)
    # When a result for image A names the tasks of A and B
    handle_result_message(runtime, job.id, success_body(task_a), f"{reply_a},{reply_b}", task_a.task_token)
    # Then only A's task is ACKed (B has no result): B's task stays, and B is processed when its result comes
    assert stream_count(runtime, job.id, moth_pipeline) == 1
    assert JobImage.get(JobImage.image == int(task_b.image_id)).status == ImageStatus.PENDING
    handle_result_message(runtime, job.id, success_body(task_b), reply_b, task_b.task_token)
    assert counters(job.id)[:3] == (JobStatus.SUCCESS, 2, 0)


def test_error_results_fail_the_image_and_the_threshold_is_strict(runtime, moth_pipeline):
    # 5 of 10 failed is still SUCCESS
    job = fake_job(moth_pipeline, 10)
    dispatch(runtime, job.id)
    for n, (task, reply) in enumerate(pull_tasks(runtime, job.id, 10)):
        body = error_body(task.image_id) if n < 5 else success_body(task)
        handle_result_message(runtime, job.id, body, reply, task.task_token)
    assert counters(job.id)[:3] == (JobStatus.SUCCESS, 10, 5)
    failed = JobImage.select().where(JobImage.status == ImageStatus.FAILED)
    assert {r.error for r in failed} == {"processing service error: model exploded"}


def test_six_of_ten_failed_is_failure(runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 10)
    dispatch(runtime, job.id)
    for n, (task, reply) in enumerate(pull_tasks(runtime, job.id, 10)):
        handle_result_message(runtime, job.id, error_body(task.image_id) if n < 6 else success_body(task), reply,
                              task.task_token)
    job = Job.get_by_id(job.id)
    assert (job.status, job.error) == (JobStatus.FAILURE, "6 of 10 images failed (threshold 50%)")


def test_a_reply_subject_of_another_job_is_never_acked(runtime, moth_pipeline):
    # Given two jobs, and a result for job A that carries job B's task reply subject
    a, b = fake_job(moth_pipeline, 1), fake_job(moth_pipeline, 1, prefix="file:///b")
    dispatch(runtime, a.id)
    dispatch(runtime, b.id)
    [(task_a, _)] = pull_tasks(runtime, a.id, 1)
    [(_, reply_b)] = pull_tasks(runtime, b.id, 1)
    handled = handle_result_message(runtime, a.id, success_body(task_a), reply_b, task_a.task_token)
    # Then it is rejected: B's task stays un-acked, A's image stays pending, the job log says why
    assert handled.action == "rejected"
    assert stream_count(runtime, b.id, moth_pipeline) == 1
    assert runtime.state.snapshot(a.id).remaining == 1
    assert JobLog.select().where(JobLog.message.contains("is not a task of consumer job-1")).count() == 1


def test_malformed_json_fails_that_image_terminates_its_task_and_others_proceed(runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)
    (task1, reply1), (task2, reply2) = pull_tasks(runtime, job.id, 2)
    handled = handle_result_message(runtime, job.id, b"{not json", reply1, task1.task_token)
    assert handled.action == "failed"
    row = JobImage.get(JobImage.image == int(task1.image_id))
    assert row.status == ImageStatus.FAILED and "not valid JSON" in row.error
    assert stream_count(runtime, job.id, moth_pipeline) == 1  # its task was terminated (deleted)
    handle_result_message(runtime, job.id, success_body(task2), reply2, task2.task_token)
    assert counters(job.id)[:3] == (JobStatus.SUCCESS, 2, 1)


def test_a_result_after_the_job_ended_is_refused_and_changes_nothing(runtime, moth_pipeline):
    # Given a job canceled after one of its two results was saved
    from pipeline.core.jobs import cancel

    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)
    (task1, reply1), (task2, _) = pull_tasks(runtime, job.id, 2)
    handle_result_message(runtime, job.id, success_body(task1, boxes=1), reply1, task1.task_token)
    assert cancel(runtime, job.id) == JobStatus.REVOKED
    # When the other image's result arrives
    handled = handle_result_message(runtime, job.id, success_body(task2, boxes=3), None)
    # Then it is refused: no rows for an image the job never counted, counters and statuses unchanged
    assert handled.action == "late"
    assert Detection.select().where(Detection.image == int(task2.image_id)).count() == 0
    assert JobImage.get(JobImage.image == int(task2.image_id)).status == ImageStatus.PENDING
    assert counters(job.id) == (JobStatus.REVOKED, 1, 0, 1, 1, 1)
    assert ResultInbox.select().count() == 0


def test_lost_redis_state_is_rebuilt_from_the_database(runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 3)
    dispatch(runtime, job.id)
    tasks = pull_tasks(runtime, job.id, 3)
    handle_result_message(runtime, job.id, success_body(tasks[0][0], boxes=2), tasks[0][1], tasks[0][0].task_token)
    runtime.redis.flushall()  # Redis restarted without persistence
    for task, reply in tasks:  # includes a replay of the first result
        handle_result_message(runtime, job.id, success_body(task, boxes=2), reply, task.task_token)
    assert counters(job.id) == (JobStatus.SUCCESS, 3, 0, 6, 6, 3)


def test_result_for_unknown_job_is_dropped(runtime, moth_pipeline):
    stream = names.tasks_stream("moth-demo")
    handled = handle_result_message(runtime, 4242, b"{}", f"$JS.ACK.{stream}.job-4242.1.1.1.1.0")
    assert handled.action == "unknown_job"


def test_a_result_in_flight_when_the_job_ended_does_not_recreate_its_state(runtime, moth_pipeline):
    # Given a worker that loaded the job while it was still running
    from pipeline.core.outcomes import load_job, settle
    from pipeline.infra.jobstate import Outcome

    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)
    stale = load_job(job.id)
    # When the job ends and is cleaned up before that worker counts its (duplicate) result
    for task, reply in pull_tasks(runtime, job.id, 2):
        handle_result_message(runtime, job.id, success_body(task), reply, task.task_token)
    assert Job.get_by_id(job.id).status == JobStatus.SUCCESS
    _, snapshot, written = settle(runtime, stale, lambda: [Outcome("1", detections=2, classifications=2)])
    # Then nothing is counted and no Redis state is resurrected for the finished job
    assert snapshot is None and written.status == JobStatus.SUCCESS
    assert runtime.redis.keys(f"jetpipe:job:{job.id}:*") == []


def test_concurrent_rebuilds_of_lost_state_happen_once_and_agree_with_the_database(runtime, moth_pipeline):
    # Given a job with some results counted, whose Redis state is then lost
    import models
    from pipeline.core.jobs import rebuild_state
    from tests.helpers import at_once

    job, tasks = job_with_results(runtime, moth_pipeline, 30, 10)
    runtime.redis.flushall()
    # When 8 workers notice at the same moment and all try to rebuild
    def rebuild():
        with models.database.connection_context():
            return rebuild_state(runtime.state, job.id)

    results = at_once(8, rebuild)
    # Then exactly one rebuilt it, and finishing the job gives exact counts
    assert results.count(True) == 1
    snap = runtime.state.snapshot(job.id)
    assert (snap.processed, snap.detections, snap.remaining) == (10, 20, 20)
    for task, reply in tasks:  # every result, the first ten replayed
        handle_result_message(runtime, job.id, success_body(task, boxes=2), reply, task.task_token)
    assert counters(job.id) == (JobStatus.SUCCESS, 30, 0, 60, 60, 30)


def test_the_first_result_decides_an_image_and_a_replay_with_other_boxes_adds_nothing(runtime, moth_pipeline):
    # Given an image whose result (2 boxes) was saved
    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)
    (task, reply), _ = pull_tasks(runtime, job.id, 2)
    handle_result_message(runtime, job.id, success_body(task, boxes=2), reply, task.task_token)
    # When another result for it arrives with 5 boxes (a retry of the model, a second service)
    handle_result_message(runtime, job.id, success_body(task, boxes=5), reply, task.task_token)
    # Then nothing is added: rows and counters are those of the first result
    assert Detection.select().where((Detection.image == int(task.image_id)) & (Detection.bbox_key != "")).count() == 2
    assert JobImage.get(JobImage.image == int(task.image_id)).detections == 2
    assert counters(job.id)[1:4] == (1, 0, 2)


def test_a_result_naming_a_non_numeric_image_fails_the_image_of_its_task_at_once(runtime, moth_pipeline):
    # Given a pulled task
    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)
    (task, reply), (task2, reply2) = pull_tasks(runtime, job.id, 2)
    # When its result names image "abc"
    body = success_body(task).replace(f'"{task.image_id}"'.encode(), b'"abc"')
    handled = handle_result_message(runtime, job.id, body, reply, task.task_token)
    # Then the task's image is failed with the reason at once and its task terminated (no retry, no dead
    # letter, no "lost" ten minutes later), and the other image proceeds
    row = JobImage.get(JobImage.image == int(task.image_id))
    assert handled.action == "failed"
    assert (row.status, row.error) == ("failed", "bad result: image ids must be decimal numbers, got ['abc']")
    assert stream_count(runtime, job.id, moth_pipeline) == 1
    handle_result_message(runtime, job.id, success_body(task2), reply2, task2.task_token)
    assert counters(job.id)[:3] == (JobStatus.SUCCESS, 2, 1)


def test_a_job_log_line_is_capped(runtime, moth_pipeline):
    from pipeline.core.joblog import MAX_MESSAGE_CHARS, job_log

    job = fake_job(moth_pipeline, 1)
    job_log(job.id, 30, "x" * 1_000_000)
    [row] = JobLog.select().where(JobLog.job == job.id)
    assert len(row.message) < MAX_MESSAGE_CHARS + 40 and row.message.endswith("(1000000 characters)")


@pytest.mark.parametrize("hostile", ["nested 100,000 deep", "a huge pipeline name"])
def test_a_hostile_result_fails_the_images_it_names_once_with_one_short_log_row(runtime, moth_pipeline, hostile):
    # Given a job whose task a hostile service answers
    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)
    (task, reply), (task2, reply2) = pull_tasks(runtime, job.id, 2)
    if "nested" in hostile:
        body = success_body(task)[:-1] + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    else:
        body = json.dumps({"pipeline": "p" * 1_000_000, "detections": [],
                           "source_images": [{"id": task.image_id}]}).encode()
    # When it is handled
    handled = handle_result_message(runtime, job.id, body, reply, task.task_token)
    # Then its image is failed as a bad result at once, its task terminated, with one short job-log row,
    # and the other image proceeds
    row = JobImage.get(JobImage.image == int(task.image_id))
    assert handled.action == "failed" and row.status == "failed" and row.error.startswith("bad result:")
    assert len(row.error) <= 2000
    logs = list(JobLog.select().where((JobLog.job == job.id) & JobLog.message.contains("bad result")))
    assert len(logs) == 1 and len(logs[0].message) < 2100
    assert stream_count(runtime, job.id, moth_pipeline) == 1
    handle_result_message(runtime, job.id, success_body(task2), reply2, task2.task_token)
    assert counters(job.id)[:3] == (JobStatus.SUCCESS, 2, 1)


def test_a_result_naming_1000_images_it_does_not_hold_is_refused_with_one_short_log_row(runtime, moth_pipeline):
    # Given a job whose one task a hostile service holds, and a result naming that image and 999 others
    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)
    (task, reply), (task2, reply2) = pull_tasks(runtime, job.id, 2)
    others = [str(int(task2.image_id) + i) for i in range(999)]
    body = json.dumps({"pipeline": "p" * 1_000_000, "detections": [],
                       "source_images": [{"id": task.image_id}] + [{"id": i} for i in others]}).encode()
    # When it is handled with the one token it holds
    handled = handle_result_message(runtime, job.id, body, reply, task.task_token)
    # Then it is refused whole, with one short job-log row: no image fails (the other one included), no task
    # is touched, and both images are decided by their own results later
    assert handled.action == "rejected"
    assert {r.status for r in JobImage.select()} == {"pending"}
    logs = list(JobLog.select().where((JobLog.job == job.id) & JobLog.message.contains("refused")))
    assert len(logs) == 1 and len(logs[0].message) < 600
    assert stream_count(runtime, job.id, moth_pipeline) == 2
    handle_result_message(runtime, job.id, success_body(task), reply, task.task_token)
    handle_result_message(runtime, job.id, success_body(task2), reply2, task2.task_token)
    assert counters(job.id)[:3] == (JobStatus.SUCCESS, 2, 0)


def test_an_error_result_naming_an_image_of_another_job_is_refused_and_touches_nothing(runtime, moth_pipeline):
    # Given two jobs, and job A's task answered with an error result naming job B's image
    a, b = fake_job(moth_pipeline, 1), fake_job(moth_pipeline, 1, prefix="file:///other/img")
    dispatch(runtime, a.id)
    [(task, reply)] = pull_tasks(runtime, a.id, 1)
    image_of_b = str(JobImage.get(JobImage.job == b.id).image_id)
    handled = handle_result_message(runtime, a.id, error_body(image_of_b), reply, task.task_token)
    # Then it is refused (it decides an image whose task it does not hold): nothing of job B changes, and job
    # A's task is neither ACKed nor terminated, so it comes back to be answered; the job log says why
    assert handled.action == "rejected"
    assert JobImage.get(JobImage.job == b.id).status == "pending"
    assert JobImage.get(JobImage.job == a.id).status == "pending"
    assert stream_count(runtime, a.id, moth_pipeline) == 1
    logs = [r.message for r in JobLog.select().where(JobLog.job == a.id)]
    assert any(f"decides image(s) ['{image_of_b}'] without naming their task tokens" in m for m in logs), logs


