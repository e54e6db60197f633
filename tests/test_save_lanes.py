"""Several savers of one job (docs/processing-lifecycle.md, "Saving in lanes"): a job's results are saved in
lanes, each lane by one drainer at a time; every writer locks image rows before the job's row, so writers of
one job save at once, queue only for counting, and never deadlock. Exactly-once counting, the first result
deciding, and counters equal to rows hold with any number of drainers."""

from __future__ import annotations

import dataclasses
import functools
import json
import threading

import pytest

from models import (
    Detection,
    ImageStatus,
    Job,
    JobImage,
    JobLog,
    JobStatus,
    ResultInbox,
    is_postgres,
    thread_connection,
)
from pipeline import names
from pipeline.core import saving
from pipeline.core.inbox import Incoming, placement, take
from pipeline.core.lost import fail_lost
from pipeline.core.outcomes import apply_result, load_job
from pipeline.schemas import decode_result
from tests.helpers import dispatch, error_body, fake_job, pull_tasks, success_body

LANES = 4


@pytest.fixture
def lanes_runtime(runtime):
    """The runtime, saving in LANES lanes; PostgreSQL only (SQLite saves every job in one lane)."""
    if not is_postgres():
        pytest.skip("PostgreSQL only: on SQLite a job is saved in one lane (one writer at a time)")
    runtime.settings = dataclasses.replace(runtime.settings, save_lanes=LANES)
    return runtime


def batch(tasks, boxes: int = 2) -> bytes:
    """One success result for every task in `tasks`."""
    bodies = [json.loads(success_body(task, boxes=boxes)) for task in tasks]
    merged = bodies[0]
    for body in bodies[1:]:
        merged["source_images"] += body["source_images"]
        merged["detections"] += body["detections"]
    return json.dumps(merged).encode()


def incoming(job_id: int, body: bytes, tasks) -> Incoming:
    return Incoming.direct(job_id, body, names.join_task_replies(reply for _, reply in tasks),
                           ",".join(task.task_token for task, _ in tasks))


def lane_of(image_id: str) -> int:
    return placement([image_id])[0] % LANES


def assert_counted_exactly(runtime, job_id: int, *, complete: bool = True) -> None:
    """Redis, the job's progress and the database rows agree (and, if `complete`, every image has an outcome)."""
    rows = list(JobImage.select().where(JobImage.job == job_id))
    failed = sum(1 for r in rows if r.status == ImageStatus.FAILED)
    processed = sum(1 for r in rows if r.status != ImageStatus.PENDING)
    detections = sum(r.detections for r in rows)
    assert processed == len(rows) or not complete
    assert Detection.select().where(Detection.job == job_id, Detection.x1.is_null(False)).count() == detections
    stages = Job.get_by_id(job_id).progress["stages"]
    assert (stages["process"]["processed"], stages["process"]["failed"], stages["results"]["detections"]) == (
        processed, failed, detections)
    snapshot = runtime.state.snapshot(job_id)
    if snapshot is not None:  # a job that ended has its Redis state cleaned up
        assert (snapshot.processed, snapshot.failed, snapshot.detections) == (processed, failed, detections)


def at_once(*work) -> list[BaseException]:
    """Run each of `work` in its own thread (its own database connection), all released together; what
    they raised."""
    start = threading.Barrier(len(work))
    errors: list[BaseException] = []

    def run(one) -> None:
        start.wait(timeout=10)
        try:
            with thread_connection():
                one()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(one,)) for one in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors


def results_waiting(runtime, pipeline: str, images: int):
    """A dispatched job whose `images` results, one per message, wait in the inbox: (job, pulled tasks)."""
    job = fake_job(pipeline, images)
    dispatch(runtime, job.id)
    tasks = pull_tasks(runtime, job.id, images)
    take(runtime, [incoming(job.id, success_body(task), [(task, reply)]) for task, reply in tasks])
    return job, tasks


def test_on_sqlite_a_job_is_saved_in_one_lane_whatever_the_setting(runtime, moth_pipeline):
    # Given SQLite, PIPELINE_SAVE_LANES=4, and a job's results waiting while lane 0's drainer is busy
    if is_postgres():
        pytest.skip("SQLite only")
    runtime.settings = dataclasses.replace(runtime.settings, save_lanes=LANES)
    job, _ = results_waiting(runtime, moth_pipeline, 12)
    token = runtime.state.try_lock(names.drain_lock_key(job.id, 0), 60_000)
    # When a drain runs, it finds the job's one lane busy and saves nothing
    drained = saving.drain(runtime, job.id)
    assert drained.busy and drained.messages == 0
    runtime.state.release(names.drain_lock_key(job.id, 0), token)
    # And the next drain saves the whole job
    assert saving.drain(runtime, job.id).messages == 12
    assert Job.get_by_id(job.id).status == JobStatus.SUCCESS


def test_a_lane_whose_drainer_is_busy_does_not_hold_up_the_others(lanes_runtime, moth_pipeline):
    runtime = lanes_runtime
    # Given a job's 40 results waiting in the inbox, one per image, and lane 0 held by a drainer elsewhere
    job, tasks = results_waiting(runtime, moth_pipeline, 40)
    held = [task.image_id for task, _ in tasks if lane_of(task.image_id) == 0]
    assert 0 < len(held) < 40
    token = runtime.state.try_lock(names.drain_lock_key(job.id, 0), 60_000)
    # When a drain runs
    drained = saving.drain(runtime, job.id)
    # Then it saved every other lane's results, and left lane 0's to its drainer, asked to look once more
    assert drained.messages == 40 - len(held) and not drained.busy
    assert ResultInbox.select().where(ResultInbox.job_id == job.id).count() == len(held)
    assert runtime.state.take_flag(names.drain_again_key(job.id, 0))
    assert Job.get_by_id(job.id).progress["stages"]["process"]["processed"] == 40 - len(held)
    # And once that lane is free, the next drain ends the job exactly
    runtime.state.release(names.drain_lock_key(job.id, 0), token)
    saving.drain(runtime, job.id)
    assert Job.get_by_id(job.id).status == JobStatus.SUCCESS
    assert_counted_exactly(runtime, job.id)


def test_a_lane_with_a_backlog_asks_once_for_another_drainer_and_a_small_one_does_not(lanes_runtime, moth_pipeline,
                                                                                         monkeypatch):
    runtime = lanes_runtime
    requests = names.dramatiq_queue_key(names.ACTOR_QUEUES[names.PROCESS_PIPELINE_RESULT])
    # Given a job's 40 results waiting, one per image
    job, _ = results_waiting(runtime, moth_pipeline, 40)
    # When a drain saves them in steps that hold fewer messages than a lane has waiting
    runtime.redis.delete(requests)
    monkeypatch.setattr(saving, "DRAIN_MESSAGES", 2)
    drained = saving.drain(runtime, job.id)
    # Then it asked once for another drainer to take a lane, and still saved everything itself meanwhile
    assert drained.joined and drained.messages == 40
    assert runtime.redis.llen(requests) == 1
    # And a drain whose lanes each fit in one step asks for no one
    job, _ = results_waiting(runtime, moth_pipeline, 4)
    runtime.redis.delete(requests)
    monkeypatch.setattr(saving, "DRAIN_MESSAGES", 500)
    assert not saving.drain(runtime, job.id).joined
    assert runtime.redis.llen(requests) == 0


def test_a_request_that_finds_every_lane_busy_returns_at_once_and_saves_nothing(lanes_runtime, moth_pipeline):
    runtime = lanes_runtime
    job, _ = results_waiting(runtime, moth_pipeline, 12)
    tokens = {lane: runtime.state.try_lock(names.drain_lock_key(job.id, lane), 60_000) for lane in range(LANES)}
    drained = saving.drain(runtime, job.id)
    assert drained.busy and drained.messages == 0
    assert ResultInbox.select().where(ResultInbox.job_id == job.id).count() == 12
    for lane, token in tokens.items():
        runtime.state.release(names.drain_lock_key(job.id, lane), token)


def test_the_first_result_to_arrive_decides_an_image_whatever_lanes_they_are_in(lanes_runtime, moth_pipeline):
    runtime = lanes_runtime
    # Given a result for images a and b, then an error result for b, in lanes that a drain visits in the
    # opposite order (the error's lane first)
    job = fake_job(moth_pipeline, 30)
    dispatch(runtime, job.id)
    tasks = pull_tasks(runtime, job.id, 30)
    pairs = [(x, y) for x in tasks for y in tasks
             if int(x[0].image_id) < int(y[0].image_id) and lane_of(x[0].image_id) > lane_of(y[0].image_id)]
    (a, reply_a), (b, reply_b) = pairs[0]
    take(runtime, [incoming(job.id, batch([a, b]), [(a, reply_a), (b, reply_b)])])
    take(runtime, [incoming(job.id, error_body(b.image_id), [(b, reply_b)])])
    # When the inbox is drained
    saving.drain(runtime, job.id)
    # Then the result decided b (it came first); the error is a replay that changes nothing
    rows = {str(r.image_id): r for r in JobImage.select().where(JobImage.job == job.id)}
    assert rows[b.image_id].status == ImageStatus.PROCESSED and rows[b.image_id].detections == 2
    assert ResultInbox.select().where(ResultInbox.job_id == job.id).count() == 0
    assert_counted_exactly(runtime, job.id, complete=False)


def test_several_drainers_save_one_job_at_once_exactly_with_replays_overlaps_and_lost_images(
        lanes_runtime, moth_pipeline, monkeypatch):
    runtime = lanes_runtime
    # Given a 300-image job whose inbox holds, in this order: an error result for each of images 0-9, then
    # results of 10 images each for images 0-279, the same results again (replays of another delivery),
    # and results for the same images cut at other places (a batch of another service instance)
    job = fake_job(moth_pipeline, 300)
    dispatch(runtime, job.id)
    tasks = pull_tasks(runtime, job.id, 300)
    errored = tasks[:10]
    messages = [incoming(job.id, error_body(task.image_id), [(task, reply)]) for task, reply in errored]
    batches = [tasks[n:n + 10] for n in range(0, 280, 10)]
    messages += [incoming(job.id, batch([t for t, _ in b]), b) for b in batches]
    messages += [incoming(job.id, batch([t for t, _ in b]), b) for b in batches]
    messages += [incoming(job.id, batch([t for t, _ in b], boxes=3), b)
                 for b in (tasks[n:n + 10] for n in range(5, 275, 10))]
    take(runtime, messages)
    lost = [task.image_id for task, _ in tasks[280:]]
    # When four drainers (small steps, so that they take turns) and the check for lost images run at once
    monkeypatch.setattr(saving, "DRAIN_MESSAGES", 3)
    drain = functools.partial(saving.drain, runtime, job.id)
    errors = at_once(drain, drain, drain, drain, lambda: fail_lost(runtime, load_job(job.id), lost, "lost: test"))
    saving.drain(runtime, job.id)  # a request that came while a lane was busy has been looked at
    # Then nothing raised, the inbox is empty, and the job ended once, SUCCESS (30 of 300 failed)
    assert not errors, errors
    assert ResultInbox.select().where(ResultInbox.job_id == job.id).count() == 0
    ended = Job.get_by_id(job.id)
    assert ended.status == JobStatus.SUCCESS
    finished = JobLog.select().where((JobLog.job == job.id) & JobLog.message.startswith("job finished")).count()
    assert finished == 1
    # And the first result of each image decided it: the error results, then the first batch (2 boxes)
    rows = {str(r.image_id): r for r in JobImage.select().where(JobImage.job == job.id)}
    assert all(rows[t.image_id].status == ImageStatus.FAILED and "model exploded" in rows[t.image_id].error
               for t, _ in errored)
    assert all(rows[t.image_id].detections == 2 for t, _ in tasks[10:280])
    assert all(rows[i].status == ImageStatus.FAILED for i in lost)
    assert_counted_exactly(runtime, job.id)


@pytest.mark.postgres
def test_writers_of_the_same_images_in_opposite_orders_never_deadlock(lanes_runtime, moth_pipeline, caplog):
    # Given a job whose images are written at once, round after round, by a result saving them, the lost-image
    # check failing them (ids in reverse order), and dispatch recording their task sequences (reverse order)
    from pipeline.core.jobs import record_published

    runtime = lanes_runtime
    job = fake_job(moth_pipeline, 1200)
    dispatch(runtime, job.id)
    tasks = pull_tasks(runtime, job.id, 1200)
    errors: list[BaseException] = []
    for n in range(0, 1200, 100):
        chunk = tasks[n:n + 100]
        ids = [t.image_id for t, _ in chunk]
        result = decode_result(batch([t for t, _ in chunk]))
        errors += at_once(functools.partial(apply_result, runtime, load_job(job.id), result),
                          functools.partial(fail_lost, runtime, load_job(job.id), list(reversed(ids)), "lost: test"),
                          functools.partial(record_published, job.id, list(reversed(ids)),
                                            list(range(1_000_000 + n + 100, 1_000_000 + n, -1)), n))
    # Then no writer met a deadlock or a lock timeout, and the counts equal the rows
    assert not errors, errors
    assert "deadlock" not in caplog.text.lower()
    assert Job.get_by_id(job.id).status in JobStatus.TERMINAL
    assert_counted_exactly(runtime, job.id)
