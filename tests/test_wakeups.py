"""Small jobs are woken, not polled: an idle worker fetches the moment a message is sent, a service pulls a
job the moment it is announced, and a lone result goes out without waiting for a batch to fill.

Each test stretches the poll it replaces to a minute, so a test that passes in seconds shows the event did
the work (no timing is measured: the bound only tells "woken" from "waited out the poll")."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline import names
from pipeline.infra.broker import make_broker, send
from pipeline.schemas import decode_result
from pipeline.sdk import nats_transport
from tests.conftest import wait_for
from tests.helpers import dispatch, fake_job, result_messages, success_body

#: What each test stretches the replaced poll to (seconds), and how long it waits for the event instead.
POLL_S = 60
WOKEN_WITHIN_S = 20

pytestmark = pytest.mark.slow


def echo(task):
    return decode_result(success_body(task, boxes=1))


def test_an_idle_worker_consumer_fetches_as_soon_as_a_message_is_sent(settings):
    # Given a consumer of an empty queue that has backed off to a minute between fetches
    broker = make_broker(settings)
    try:
        queue = f"wake-test-{time.time_ns()}"
        broker.declare_queue(queue)
        consumer = broker.consume(queue, prefetch=1, timeout=POLL_S * 1000)
        consumer.misses = 100  # idle for long: its next wait is the whole minute
        # When a message is sent a moment after it starts waiting
        sender = threading.Timer(0.5, lambda: send_to(broker, queue))
        sender.start()
        started = time.monotonic()
        assert next(consumer) is None  # the wait ends (woken), with nothing fetched yet
        woken_after = time.monotonic() - started
        message = next(consumer)
        # Then it was woken by the send, and the message is the next one it hands out
        assert woken_after < WOKEN_WITHIN_S
        assert message is not None and message.actor_name == names.RUN_JOB and message.args == (42,)
        consumer.ack(message)
        sender.join()
    finally:
        broker.close()


def send_to(broker, queue: str) -> None:
    import dramatiq

    broker.enqueue(dramatiq.Message(queue_name=queue, actor_name=names.RUN_JOB, args=(42,), kwargs={}, options={}))


def test_wake_tokens_are_bounded_and_expire(settings):
    # Given many messages sent to a queue no consumer waits on
    broker = make_broker(settings)
    try:
        for n in range(200):
            send(broker, names.RUN_JOB, n)
        key = names.dramatiq_wake_key(names.ACTOR_QUEUES[names.RUN_JOB])
        # Then its wake list holds a bounded number of tokens, and goes away by itself
        assert broker.client.llen(key) == 64
        assert 0 < broker.client.ttl(key) <= 60
    finally:
        broker.flush(names.ACTOR_QUEUES[names.RUN_JOB])  # the 200 messages must not reach a later test's worker
        broker.close()


def test_a_service_pulls_a_new_job_when_it_is_announced_not_at_its_next_listing(runtime, moth_pipeline,
                                                                               service_factory, monkeypatch):
    # Given a service that found no job and would list the job consumers again only in a minute
    monkeypatch.setattr(nats_transport, "REFRESH_S", POLL_S)
    service = service_factory(runtime.settings, moth_pipeline, echo, batch_size=1)
    wait_for(lambda: service.transport._queue is not None, timeout_s=10, message="the service to connect")
    time.sleep(1)  # its first listing is done: it waits
    # When a job is dispatched (announced on pipeline.jobs.<slug>)
    job = fake_job(moth_pipeline, 1)
    dispatch(runtime, job.id)
    # Then the service answers it long before its next listing
    wait_for(lambda: result_messages(runtime.settings, job.id), timeout_s=WOKEN_WITHIN_S,
             message="the announced job's result")


def test_a_lone_result_goes_out_at_once_rather_than_after_the_batch_linger(runtime, moth_pipeline, service_factory):
    # Given a service batching 50 results a message, lingering a minute for a batch to fill
    service_factory(runtime.settings, moth_pipeline, echo, batch_size=50, batch_linger_s=POLL_S)
    # When a 1-image job is dispatched (nothing else of the job could join its batch)
    job = fake_job(moth_pipeline, 1)
    dispatch(runtime, job.id)
    # Then its result is published at once
    wait_for(lambda: result_messages(runtime.settings, job.id), timeout_s=WOKEN_WITHIN_S,
             message="the lone result")


def test_tasks_a_pull_was_bringing_when_another_job_was_announced_are_run_not_left_to_their_ack_wait(
        runtime, moth_pipeline, service_factory):
    # Given a service with more slots than its job has tasks (each pull waits for its whole batch), and jobs
    # announced every 50 ms while it pulls, so that announcements keep interrupting its pulls
    import asyncio

    import nats

    service_factory(runtime.settings, moth_pipeline, echo, batch_size=1, concurrency=64)
    stop = threading.Event()

    async def announce() -> None:
        nc = await nats.connect(runtime.settings.nats_url)
        try:
            while not stop.is_set():
                await nc.publish(names.job_announcements(moth_pipeline), b"")
                await asyncio.sleep(0.05)
        finally:
            await nc.close()

    announcer = threading.Thread(target=asyncio.run, args=(announce(),))
    announcer.start()
    try:
        # When a 10-image job is dispatched
        job = fake_job(moth_pipeline, 10)
        dispatch(runtime, job.id)
        # Then every task is run and answered well within its ack_wait (30 s): none was dropped with a pull
        wait_for(lambda: len(result_messages(runtime.settings, job.id)) >= 10, timeout_s=WOKEN_WITHIN_S,
                 message="the results of all 10 tasks")
    finally:
        stop.set()
        announcer.join(timeout=10)
