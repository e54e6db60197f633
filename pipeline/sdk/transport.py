"""How a processing service reaches jetpipe: what a transport may use of the service, and what it must do."""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable

from pipeline.schemas import Result, Task


class Service(Protocol):
    """The side of a `ProcessingService` a transport uses, and all of it."""

    name: str
    pipeline: str
    concurrency: int  # handlers run at once, at most
    batch_size: int  # images per result message (1: no batching)
    batch_linger_s: float  # how long a partly filled batch may wait
    stopping: asyncio.Event  # set when the service is to stop

    async def run_task(self, task: Task) -> Result:
        """The handler's result for `task`, or an error result (exception, deadline)."""
        ...

    async def wait(self, seconds: float) -> None:
        """Sleep `seconds`, or less if the service stops meanwhile."""
        ...

    async def wait_for(self, event: asyncio.Event, seconds: float) -> None:
        """Wait until `event` is set, at most `seconds`."""
        ...


@runtime_checkable
class Transport(Protocol):
    """Finds the pipeline's tasks, runs each through `service.run_task` with at most `service.concurrency`
    at once, keeps the task's lease while it runs, and returns its result, until `service.stopping` is set;
    survives outages of whatever it talks to. `NatsTransport` (the default) and `HttpTransport` are two."""

    async def run(self, service: Service) -> None: ...
