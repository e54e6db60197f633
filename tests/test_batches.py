"""Result messages covering several images (batches): counted once each, every task ACKed, and a constant
cost per message: one database transaction, one Redis round trip, the same statements whatever its size."""

from __future__ import annotations

import json
import logging

import pytest

from models import Detection, ImageStatus, Job, JobImage, JobStatus, ResultInbox
from pipeline import names
from pipeline.infra.metrics import metrics
from tests.conftest import wait_for
from tests.helpers import (
    DET,
    dispatch,
    fake_job,
    handle_result_message,
    job_with_results,
    pull_tasks,
    result_messages,
    stream_count,
    success_body,
)


def batch_body(tasks, *, boxes: int = 2, detector: dict = DET) -> bytes:
    """One success result covering every task in `tasks` (the bodies `success_body` gives, merged)."""
    bodies = [json.loads(success_body(task, boxes=boxes, detector=detector)) for task in tasks]
    merged = bodies[0]
    for body in bodies[1:]:
        merged["source_images"] += body["source_images"]
        merged["detections"] += body["detections"]
    return json.dumps(merged).encode()


def replies_of(pulled) -> str:
    return names.join_task_replies(reply for _, reply in pulled)


def tokens_of(pulled) -> str:
    """The Pipeline-Task-Token header naming the pulled tasks' tokens."""
    return ",".join(task.task_token for task, _ in pulled)


def progress_counts(job_id):
    s = Job.get_by_id(job_id).progress["stages"]
    return s["process"]["processed"], s["process"]["failed"], s["results"]["detections"]


@pytest.fixture
def redis_round_trips(monkeypatch) -> list:
    """Every command a Redis client of this process sends (one round trip each), as it is sent."""
    import redis

    sent = []
    original = redis.Redis.execute_command

    def counted(self, *args, **options):
        sent.append(args[0])
        return original(self, *args, **options)

    monkeypatch.setattr(redis.Redis, "execute_command", counted)
    return sent


def test_a_message_covering_many_images_counts_each_once_and_acks_every_task(runtime, moth_pipeline):
    # Given a 12-image job whose tasks a service pulled, and one result message for 10 of them
    job = fake_job(moth_pipeline, 12)
    dispatch(runtime, job.id)
    pulled = pull_tasks(runtime, job.id, 12)
    batch, rest = pulled[:10], pulled[10:]
    body = batch_body([t for t, _ in batch], boxes=2)
    # When it is delivered three times (replays)
    for _ in range(3):
        handled = handle_result_message(runtime, job.id, body, replies_of(batch), tokens_of(batch))
    # Then each image was counted once, its rows saved once, and all 10 tasks were ACKed
    assert handled.action == "counted"
    assert progress_counts(job.id) == (10, 0, 20)
    assert Detection.select().where(Detection.job == job.id).count() == 20
    assert stream_count(runtime, job.id, moth_pipeline) == 2
    # And the last two images, batched as well, end the job with exact counts
    handle_result_message(runtime, job.id, batch_body([t for t, _ in rest], boxes=1), replies_of(rest), tokens_of(rest))
    assert Job.get_by_id(job.id).status == JobStatus.SUCCESS
    assert progress_counts(job.id) == (12, 0, 22)


@pytest.mark.parametrize(("messages", "images"), [(1, 1), (1, 25), (25, 1)])
def test_saving_result_messages_costs_one_transaction_and_one_redis_round_trip_whatever_their_size(
        runtime, moth_pipeline, messages, images, caplog, redis_round_trips):
    # Given a dispatched job (60 images: it does not end, so no cleanup work is counted) that has already
    # counted one result (the process has its scripts and the pipeline's algorithms at hand)
    from pipeline.core.inbox import Incoming, take
    from pipeline.core.saving import drain_step

    job = fake_job(moth_pipeline, 60)
    dispatch(runtime, job.id)
    (first, first_reply), *pulled = pull_tasks(runtime, job.id, messages * images + 1)
    handle_result_message(runtime, job.id, success_body(first, boxes=3), first_reply, first.task_token)
    # and `messages` result messages of `images` images each, taken into the inbox in one transaction
    groups = [pulled[n * images:(n + 1) * images] for n in range(messages)]
    transactions = metrics().db_transactions._value.get()
    take(runtime, [Incoming.direct(job.id, batch_body([t for t, _ in group], boxes=3), replies_of(group),
                                   tokens_of(group))
                   for group in groups])
    assert metrics().db_transactions._value.get() - transactions == 1
    transactions = metrics().db_transactions._value.get()
    redis_round_trips.clear()
    # When they are saved
    with caplog.at_level(logging.DEBUG, logger="peewee"):
        step = drain_step(runtime, job.id)
    # Then it took one database transaction and one Redis command (the gate script), however many
    # messages and images
    assert len(step.messages) == messages
    assert metrics().db_transactions._value.get() - transactions == 1
    assert redis_round_trips == ["EVALSHA"]
    # And the same SQL statements as any other size (no query per image or message): the inbox rows, the
    # job and its pipeline, the rows still in the inbox, the JobImage rows, one UPDATE of the JobImage rows,
    # the inbox rows' DELETE, the job's row locked for counting, the job's progress (the two INSERTs go straight
    # to the driver; the classifications find their detections' ids as they are inserted)
    statements = [r for r in caplog.records if r.name == "peewee"]
    assert len(statements) == 8, [r.getMessage()[:80] for r in statements]
    assert progress_counts(job.id) == (messages * images + 1, 0, 3 * (messages * images + 1))


def test_a_batch_naming_a_task_of_another_job_is_rejected_whole(runtime, moth_pipeline):
    # Given two jobs and a result for job A whose header also names one of job B's tasks
    a, b = fake_job(moth_pipeline, 3), fake_job(moth_pipeline, 1, prefix="file:///b")
    dispatch(runtime, a.id)
    dispatch(runtime, b.id)
    pulled_a = pull_tasks(runtime, a.id, 3)
    [(_, reply_b)] = pull_tasks(runtime, b.id, 1)
    header = names.join_task_replies([reply for _, reply in pulled_a] + [reply_b])
    # When it is handled, nothing is saved, counted or ACKed: every task stays for redelivery
    handled = handle_result_message(runtime, a.id, batch_body([t for t, _ in pulled_a]), header)
    assert handled.action == "rejected"
    assert progress_counts(a.id)[0] == 0
    assert stream_count(runtime, a.id, moth_pipeline) == 3
    assert stream_count(runtime, b.id, moth_pipeline) == 1


def test_a_bad_batch_fails_each_of_its_images_and_terminates_each_task(runtime, moth_pipeline):
    # Given a 4-image job and a result for 3 of them naming an undeclared algorithm
    job = fake_job(moth_pipeline, 4)
    dispatch(runtime, job.id)
    pulled = pull_tasks(runtime, job.id, 4)
    bad, good = pulled[:3], pulled[3]
    body = batch_body([t for t, _ in bad], detector={"key": "nobody-declared-me", "name": "?"})
    # When it is handled, those 3 images are failed with the reason and their tasks terminated
    handled = handle_result_message(runtime, job.id, body, replies_of(bad), tokens_of(bad))
    assert handled.action == "failed"
    failed = JobImage.select().where((JobImage.job == job.id) & (JobImage.status == ImageStatus.FAILED))
    assert sorted(str(r.image_id) for r in failed) == sorted(t.image_id for t, _ in bad)
    assert all("undeclared algorithm" in r.error for r in failed)
    assert stream_count(runtime, job.id, moth_pipeline) == 1
    # And the other image proceeds: 3 of 4 failed is a FAILURE (strict threshold 0.5)
    handle_result_message(runtime, job.id, success_body(good[0]), good[1], good[0].task_token)
    assert Job.get_by_id(job.id).status == JobStatus.FAILURE


def test_an_unreadable_batch_fails_the_images_of_every_task_it_names(runtime, moth_pipeline):
    # Given a 4-image job and a result message for 3 of its tasks whose body cannot be read at all
    job = fake_job(moth_pipeline, 4)
    dispatch(runtime, job.id)
    pulled = pull_tasks(runtime, job.id, 4)
    bad = pulled[:3]
    # When it is handled, the images are found through their tasks, failed, and the tasks terminated
    handled = handle_result_message(runtime, job.id, b"{not json", replies_of(bad), tokens_of(bad))
    assert handled.action == "failed"
    failed = JobImage.select().where((JobImage.job == job.id) & (JobImage.status == ImageStatus.FAILED))
    assert sorted(str(r.image_id) for r in failed) == sorted(t.image_id for t, _ in bad)
    assert stream_count(runtime, job.id, moth_pipeline) == 1


def test_a_result_covering_more_images_than_allowed_is_bad_input(runtime, moth_pipeline, monkeypatch):
    monkeypatch.setattr("pipeline.schemas.MAX_IMAGES_PER_RESULT", 2)
    job = fake_job(moth_pipeline, 3)
    dispatch(runtime, job.id)
    pulled = pull_tasks(runtime, job.id, 3)
    handled = handle_result_message(runtime, job.id, batch_body([t for t, _ in pulled]), replies_of(pulled),
                                    tokens_of(pulled))
    assert handled.action == "failed"
    assert {r.error for r in JobImage.select()} == {"bad result: a result may cover at most 2 images, this one "
                                                    "lists 3"}


@pytest.mark.parametrize("batch_size", [10, 1])
def test_the_sdk_sends_up_to_batch_size_images_per_message(runtime, moth_pipeline, service_factory, settings,
                                                            batch_size):
    # Given a dispatched 25-image job and a service batching up to `batch_size` images (no worker running)
    job = fake_job(moth_pipeline, 25)
    dispatch(runtime, job.id)

    def null_model(task):
        from pipeline.schemas import SourceImageRef, SuccessResult

        return SuccessResult(task.pipeline, [SourceImageRef(task.image_id)])

    service_factory(settings, moth_pipeline, null_model, concurrency=25, batch_size=batch_size, batch_linger_s=0.5)
    # When it has processed every task
    messages = wait_for(lambda: (m := result_messages(settings, job.id)) and
                        sum(len(body["source_images"]) for _, body in m) == 25 and m, timeout_s=30)
    # Then no message covers more than batch_size images, each names exactly its images' tasks, and with
    # batching on, fewer messages than images went out
    sizes = [len(body["source_images"]) for _, body in messages]
    assert max(sizes) <= batch_size
    assert [len(names.task_replies(header)) for header, _ in messages] == sizes
    assert len(messages) < 25 if batch_size > 1 else len(messages) == 25
    # And handling those messages completes the job with every task ACKed
    for header, body, tokens in result_messages(settings, job.id, tokens=True):
        assert len(names.task_tokens(tokens)) == len(body["source_images"])  # each image's task token named
        handle_result_message(runtime, job.id, json.dumps(body).encode(), header, tokens)
    assert Job.get_by_id(job.id).status == JobStatus.SUCCESS
    assert stream_count(runtime, job.id, moth_pipeline) == 0


def test_the_sdk_refuses_a_batch_size_out_of_range():
    from pipeline.sdk.service import ProcessingService

    with pytest.raises(ValueError, match="batch_size must be between 1 and 1000"):
        ProcessingService("moth-demo", lambda task: None, nats_url="nats://127.0.0.1:1", batch_size=0)


def test_acking_a_task_whose_consumer_is_gone_is_answered_at_once(runtime, moth_pipeline):
    # Given a pulled task whose job's consumer was then deleted (the job ended meanwhile)
    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)
    [(_, reply)] = pull_tasks(runtime, job.id, 1)
    runtime.tasks.delete_job_consumer(job.id, moth_pipeline)
    # When it is ACKed, the server's "no responders" answer says there is nothing left to acknowledge
    # (rather than the ACK timing out and the result being retried)
    assert runtime.tasks.ack(reply) is False
    runtime.tasks.ack_many([reply, reply])
    runtime.tasks.ack_many([])


def test_no_result_is_lost_when_batches_overflow_while_others_are_published(runtime, moth_pipeline, service_factory,
                                                                             settings):
    # Given a service whose handler reports two images per task (a model that batches on its own), so most
    # additions overflow a batch of 3 and publish it while other tasks add theirs
    job = fake_job(moth_pipeline, 12)
    dispatch(runtime, job.id)

    async def two_images(task):
        from pipeline.schemas import SourceImageRef, SuccessResult

        return SuccessResult(task.pipeline, [SourceImageRef(task.image_id), SourceImageRef(f"{task.image_id}-b")])

    service_factory(settings, moth_pipeline, two_images, concurrency=12, batch_size=3, batch_linger_s=0.5)
    # Then every task's reply subject goes out exactly once, at most 3 images per message
    messages = wait_for(lambda: (m := result_messages(settings, job.id)) and
                        sum(len(names.task_replies(h)) for h, _ in m) >= 12 and m, timeout_s=30)
    replies = [r for header, _ in messages for r in names.task_replies(header)]
    assert len(replies) == len(set(replies)) == 12
    assert max(len(body["source_images"]) for _, body in messages) <= 3


def test_a_result_counted_but_never_committed_holds_the_job_open_until_it_is_saved(runtime, moth_pipeline,
                                                                                    monkeypatch):
    # Given a 3-image job whose second result failed after the Redis gate and before the commit (a worker
    # dying there): Redis counted that image, the database rolled its rows back, the result stayed in the inbox
    from pipeline.core.lost import fail_lost
    from pipeline.core.outcomes import load_job
    from pipeline.core.saving import drain
    from pipeline.infra.crashpoints import InjectedFault

    job, tasks = job_with_results(runtime, moth_pipeline, 3, 1)
    monkeypatch.setenv("PIPELINE_RAISE_AT", "after_progress")
    with pytest.raises(InjectedFault):
        handle_result_message(runtime, job.id, success_body(tasks[1][0], boxes=2), tasks[1][1], tasks[1][0].task_token)
    monkeypatch.delenv("PIPELINE_RAISE_AT")
    assert ResultInbox.select().where(ResultInbox.job_id == job.id).count() == 1
    assert runtime.state.snapshot(job.id).processed == 2
    # When the last image is settled otherwise (failed as lost) before that result is saved again, the
    # count in Redis is complete, but the job does not end: the database still holds a counted image pending
    fail_lost(runtime, load_job(job.id), [tasks[2][0].image_id], "lost: test")
    assert runtime.state.snapshot(job.id).complete
    assert Job.get_by_id(job.id).status == JobStatus.STARTED
    # And when the inbox is drained, that result is saved and the job ends exactly
    drain(runtime, job.id)
    assert Job.get_by_id(job.id).status == JobStatus.SUCCESS
    assert progress_counts(job.id) == (3, 1, 4)
    assert Detection.select().where(Detection.job == job.id).count() == 4


def test_the_last_two_results_handled_at_once_end_the_job(runtime, moth_pipeline, monkeypatch):
    # Given a job with two results left, and result B paused right after its Redis gate (before its commit)
    # while result A, the one that completes the count, is handled
    import threading

    job, tasks = job_with_results(runtime, moth_pipeline, 4, 2)
    (task_a, reply_a), (task_b, reply_b) = tasks[2], tasks[3]
    b_gated, a_done = threading.Event(), threading.Event()
    record = runtime.state.record

    def paused_record(job_id, outcomes):
        snapshot = record(job_id, outcomes)
        if outcomes[0].image_id == task_b.image_id:
            b_gated.set()
            a_done.wait(timeout=3)  # A may be waiting for B's commit: give up after a while
        return snapshot

    monkeypatch.setattr(runtime.state, "record", paused_record)
    b = threading.Thread(target=handle_result_message, args=(runtime, job.id, success_body(task_b), reply_b,
                                                                      task_b.task_token))
    b.start()
    assert b_gated.wait(timeout=10)
    handle_result_message(runtime, job.id, success_body(task_a), reply_a, task_a.task_token)
    a_done.set()
    b.join(timeout=30)
    # Then whichever counted last saw every other result committed, and ended the job
    assert Job.get_by_id(job.id).status == JobStatus.SUCCESS
    assert progress_counts(job.id) == (4, 0, 8)


def test_a_batch_larger_than_the_servers_max_payload_is_split_and_an_oversized_result_goes_as_an_object(
        runtime, moth_pipeline, service_factory, settings, monkeypatch):
    # Given a service whose results are large (image 1's alone is larger than the server accepts)
    from nats.aio.client import Client

    from pipeline.schemas import AlgorithmRef, BBox, DetectionOut, SourceImageRef, SuccessResult

    connect_init = Client._process_connect_init

    async def small_max_payload(self):  # as if the server's INFO said 20,000 bytes
        await connect_init(self)
        self._max_payload = 20_000

    monkeypatch.setattr(Client, "_process_connect_init", small_max_payload)
    job = fake_job(moth_pipeline, 6)
    dispatch(runtime, job.id)

    def model(task):
        boxes = 400 if task.image_id == "1" else 25  # ~150 bytes each
        return SuccessResult(task.pipeline, [SourceImageRef(task.image_id)], [
            DetectionOut(task.image_id, AlgorithmRef(DET["key"]), BBox(i, i, i + 5, i + 5), 0.9) for i in range(boxes)])

    service_factory(settings, moth_pipeline, model, concurrency=6, batch_size=6, batch_linger_s=0.5)
    # Then every image is answered: the batch went out in parts that fit, image 1 as a reference to the object
    # holding its result (docs/processing-services.md, "Big results")
    messages = wait_for(lambda: (m := result_messages(settings, job.id)) and sum(
        len(b.get("source_images", [])) + ("result_object" in b) for _, b in m) == 6 and m, timeout_s=30)
    assert all(len(json.dumps(body)) < 20_000 for _, body in messages)
    [reference] = [body for _, body in messages if "result_object" in body]
    assert reference["result_object"].startswith(f"{job.id}/") and reference["size"] > 20_000
    assert runtime.tasks.job_result_objects(moth_pipeline, job.id) == [reference["result_object"]]
    assert not any("error" in body for _, body in messages)
    assert len(messages) > 2  # split
