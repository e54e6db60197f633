"""Processing-service SDK: pull a pipeline's tasks across its active jobs, run a model, return results.

    service = ProcessingService("moth-demo", handler, nats_url="nats://...")
    asyncio.run(service.run())
    # or, where NATS cannot be reached, through the web server's HTTP gateway:
    service = ProcessingService("moth-demo", handler, transport=HttpTransport("https://jetpipe.example", token="..."))

The service runs the handler; its transport (`pipeline.sdk.transport.Transport`: NATS by default, or HTTP)
finds tasks, keeps their leases and returns the results (docs/processing-services.md). Whatever the
transport, the service turns any exception from the handler into an error result for that image, and a
handler that runs longer than `task_timeout_s` (10 min) into a timeout error result (a sync handler's thread
cannot be stopped: it finishes on its own, its result is dropped).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable

from pipeline.schemas import MAX_IMAGES_PER_RESULT, ErrorResult, Result, Task
from pipeline.sdk.nats_transport import NatsTransport, service_inbox_prefix
from pipeline.sdk.transport import Transport

log = logging.getLogger(__name__)

#: Seconds a handler may take on one task before the image is failed with a timeout: the SDK keeps a
#: running task alive with +WPI, so without a deadline a hung fetch would hold its slot forever.
TASK_TIMEOUT_S = 600.0
#: Images per result message by default, and how long a partly filled batch may wait (seconds).
BATCH_SIZE = 50
BATCH_LINGER_S = 0.05

__all__ = ["BATCH_SIZE", "ProcessingService", "TASK_TIMEOUT_S", "service_inbox_prefix"]


def _in_own_thread(fn, arg, *, name: str) -> asyncio.Future:
    """`fn(arg)` in a thread of its own (a daemon): a handler that hangs past its deadline keeps only
    its own thread, never one that later tasks wait for (a pool's would). Slots bound how many run."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(outcome, error) -> None:
        if future.done():  # it timed out: nobody waits for this answer any more
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(outcome)

    def run() -> None:
        try:
            outcome, error = fn(arg), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, outcome, error)
        except RuntimeError:  # the service stopped and its loop closed meanwhile
            pass

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


class ProcessingService:
    """A processing service for one pipeline. `handler(task) -> SuccessResult | ErrorResult` (sync or async).

    `transport`: how it reaches jetpipe; by default NATS at `nats_url` (with `nats_creds`, `nats_tls_ca`,
    `inbox_prefix`), else e.g. `HttpTransport(url, token=...)` for the web server's gateway. `batch_size`:
    images per result message (1 turns batching off), sent after at most `batch_linger_s`, or at once when no
    other task of the job is running or waiting in the service.
    """

    def __init__(self, pipeline: str, handler: Callable[[Task], Result], *, nats_url: str = "",
                 concurrency: int = 4, name: str | None = None, nats_creds: str = "", nats_tls_ca: str = "",
                 batch_size: int = BATCH_SIZE, batch_linger_s: float = BATCH_LINGER_S,
                 task_timeout_s: float = TASK_TIMEOUT_S, transport: Transport | None = None,
                 inbox_prefix: str | None = None):
        if not 1 <= batch_size <= MAX_IMAGES_PER_RESULT:
            raise ValueError(f"batch_size must be between 1 and {MAX_IMAGES_PER_RESULT}, got {batch_size}")
        if transport is None and not nats_url:
            raise ValueError("give nats_url, or a transport (such as HttpTransport) to reach jetpipe another way")
        self.transport: Transport = transport or NatsTransport(nats_url, creds=nats_creds, tls_ca=nats_tls_ca,
                                                               inbox_prefix=inbox_prefix)
        self.pipeline = pipeline
        self.handler = handler
        self.batch_size = batch_size
        self.batch_linger_s = batch_linger_s
        self.task_timeout_s = task_timeout_s
        self.concurrency = concurrency
        self.name = name or f"{pipeline}-service"
        self.processed = 0
        self.failed = 0
        self.stopping = asyncio.Event()

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        """Process tasks until `stop()`; survives NATS (or gateway) outages and carries on."""
        await self.transport.run(self)

    async def run_task(self, task: Task) -> Result:
        """The handler's result for `task`; its exception or a run past the deadline as an error result (what
        a transport calls for each task it got)."""
        try:
            running: Awaitable[Result]
            if inspect.iscoroutinefunction(self.handler):
                running = self.handler(task)
            else:
                running = _in_own_thread(self.handler, task, name=f"{self.name}-{task.image_id}")
            try:
                async with asyncio.timeout(self.task_timeout_s):  # (wait_for would wrap the handler in a task)
                    result = await running
            except TimeoutError:  # a hung fetch or model: its slot is freed and its image gets an answer
                raise TimeoutError(f"the handler took longer than {self.task_timeout_s:g} s") from None
        except Exception as exc:  # noqa: BLE001 - any model failure becomes that image's error result
            self.failed += 1
            log.info("service %s: job=%s image=%s failed: %s", self.name, task.job_id, task.image_id, exc)
            return ErrorResult(error=f"{type(exc).__name__}: {exc}", image_id=task.image_id)
        self.processed += 1
        return result

    async def wait(self, seconds: float) -> None:
        """Sleep `seconds`, or less if the service is stopped meanwhile."""
        await self.wait_for(self.stopping, seconds)

    @staticmethod
    async def wait_for(event: asyncio.Event, seconds: float) -> None:
        """Wait until `event` is set, at most `seconds`."""
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except TimeoutError:
            pass
