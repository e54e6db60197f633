"""The SDK's transport seam: any object with `run(service)` can carry a processing service's tasks, using only
the service's public side (`run_task`, `concurrency`, `stopping`, `wait`)."""

from __future__ import annotations

import asyncio
import time

import pytest

from pipeline.schemas import ErrorResult, SourceImageRef, SuccessResult, Task
from pipeline.sdk import HttpTransport, NatsTransport, ProcessingService, Transport


class ListTransport:
    """Hands the service a fixed list of tasks, at most `concurrency` at once, and keeps what comes back."""

    def __init__(self, tasks: list[Task]):
        self.tasks = tasks
        self.results: dict[str, object] = {}
        self.most_at_once = 0

    async def run(self, service: ProcessingService) -> None:
        slots = asyncio.Semaphore(service.concurrency)
        running = 0

        async def one(task: Task) -> None:
            nonlocal running
            async with slots:
                running += 1
                self.most_at_once = max(self.most_at_once, running)
                self.results[task.image_id] = await service.run_task(task)
                running -= 1

        await asyncio.gather(*(one(t) for t in self.tasks))
        service.stop()


def handler(task: Task):
    if task.image_id == "2":
        raise ValueError("no moth here")
    if task.image_id == "3":
        time.sleep(0.5)  # past the service's deadline
    return SuccessResult(task.pipeline, [SourceImageRef(task.image_id)], [])


def test_a_transport_of_ones_own_gets_results_errors_and_timeouts_through_the_public_seam():
    # Given a service on a transport that is neither NATS nor HTTP
    tasks = [Task(job_id=1, image_id=str(i), image_url=f"file:///img-{i}.png", pipeline="p") for i in range(1, 6)]
    transport = ListTransport(tasks)
    service = ProcessingService("p", handler, transport=transport, concurrency=2, task_timeout_s=0.2)
    assert isinstance(transport, Transport)
    # When it runs
    asyncio.run(service.run())
    # Then every task got an answer: results, the handler's exception and the timeout as error results
    assert isinstance(transport.results["1"], SuccessResult)
    assert transport.results["2"] == ErrorResult(error="ValueError: no moth here", image_id="2")
    assert transport.results["3"] == ErrorResult(error="TimeoutError: the handler took longer than 0.2 s",
                                                 image_id="3")
    assert (service.processed, service.failed, transport.most_at_once) == (3, 2, 2)
    assert service.stopping.is_set()


def test_the_shipped_transports_refuse_what_they_cannot_work_with():
    with pytest.raises(ValueError, match="give nats_url, or a transport"):
        ProcessingService("p", handler)
    with pytest.raises(ValueError, match="needs the web server's url"):
        HttpTransport("")
    with pytest.raises(ValueError, match="needs nats_url"):
        NatsTransport("")
    assert NatsTransport("nats://svc-a:pw@127.0.0.1:4222").inbox_prefix == "_INBOX.svc-a"


def test_a_batch_of_results_knows_how_many_images_it_names_however_it_was_made():
    from pipeline.sdk.nats_transport import _Batch

    def success(*ids: str) -> SuccessResult:
        return SuccessResult(pipeline="p", source_images=[SourceImageRef(i) for i in ids])

    # made with its results (a single result, a half of a split batch: an error result names one image)
    assert _Batch(["r1", "r2"], [success("1", "2"), ErrorResult("model crashed", "3")], ["", ""]).images == 3
    # or filled as the results come
    batch = _Batch()
    for n, ids in enumerate((("4",), ("5", "6"), ("7",))):
        batch.add(f"r{n}", "", success(*ids), None)
    assert (batch.images, len(batch.results), batch.replies) == (4, 3, ["r0", "r1", "r2"])
