"""The processing-service SDK (pipeline/sdk/service.py) against a real NATS server: what it promises service authors
about slots and leases when NATS answers late. Batching is in test_batches.py."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest

from models import Job, JobStatus
from pipeline import names
from pipeline.infra.runtime import Runtime
from pipeline.schemas import SourceImageRef, SuccessResult
from tests.conftest import make_settings, wait_for
from tests.helpers import dispatch, fake_job

pytestmark = pytest.mark.slow


class GatedModel:
    """A model whose first `gated` calls wait for `gate`, and every later one takes `seconds`; it records how
    many calls ran at once at most and how often each image was run."""

    def __init__(self, *, gated: int, seconds: float):
        self.gate = threading.Event()
        self.gated = gated
        self.seconds = seconds
        self.lock = threading.Lock()
        self.running = self.most = self.calls = 0
        self.seen: Counter = Counter()

    def __call__(self, task):
        with self.lock:
            self.calls += 1
            first = self.calls <= self.gated
            self.running += 1
            self.most = max(self.most, self.running)
            self.seen[task.image_id] += 1
        try:
            if first:
                self.gate.wait(30)
            else:
                time.sleep(self.seconds)
            return SuccessResult(task.pipeline, [SourceImageRef(task.image_id)])
        finally:
            with self.lock:
                self.running -= 1


def answer_late(runtime, job_id: int, inbox: str, batch: int) -> None:
    """A pull request for `batch` tasks answered to `inbox`: what a service's subscription receives when a
    pull request it had given up on reaches the server late (one buffered during a reconnect)."""

    subject = f"$JS.API.CONSUMER.MSG.NEXT.{names.tasks_stream('moth-demo')}.{names.job_consumer(job_id)}"

    async def pull():
        await runtime.tasks.queue.nc.publish(subject, json.dumps({"batch": batch}).encode(), reply=inbox)

    runtime.tasks.runner.run(pull(), timeout=10)


def test_tasks_delivered_beyond_the_free_slots_wait_kept_alive_and_never_exceed_the_concurrency(
        db_url, stack, settings, moth_pipeline, worker_factory, service_factory):
    # Given an 8-image job whose tasks are redelivered after 3 s without +WPI, a worker, and a service with
    # 2 slots, both busy with a model that waits
    quick = make_settings(db_url, stack, PIPELINE_NATS_TASK_TTR=3, PIPELINE_NATS_MAX_DELIVER=3)
    runtime = Runtime(quick, name="jetpipe-sdk-test")
    try:
        worker_factory(quick)
        job = fake_job(moth_pipeline, 8)
        dispatch(runtime, job.id)
        model = GatedModel(gated=2, seconds=2.5)
        service = service_factory(quick, moth_pipeline, model, concurrency=2, batch_size=1)
        wait_for(lambda: model.running == 2, timeout_s=30, message="both slots busy")
        # When 5 more tasks reach its subscription, answering a pull request it had given up on
        answer_late(runtime, job.id, service.transport._subs[job.id]._deliver, 5)
        wait_for(lambda: runtime.tasks.consumer_state(job.id, "moth-demo").num_ack_pending == 7, timeout_s=10,
                 message="the late deliveries")
        time.sleep(4)  # longer than their lease, with every slot still busy
        model.gate.set()
        # Then the job succeeds with every image run once: the tasks beyond the free slots waited for one
        # (longer than the lease, before and after the slots freed) kept alive, never redelivered
        done = wait_for(lambda: (j := Job.get_by_id(job.id)).status in JobStatus.TERMINAL and j, timeout_s=90,
                        message="the job to finish")
        assert done.status == JobStatus.SUCCESS, done.error
        assert done.progress["stages"]["process"]["processed"] == 8
        assert sorted(model.seen.values()) == [1] * 8
        # And never more than its 2 slots ran at once (teardown checks the service never stopped by an
        # exception: with more tasks than slots it used to ask NATS for a negative number and die)
        assert model.most == 2
    finally:
        runtime.close()
