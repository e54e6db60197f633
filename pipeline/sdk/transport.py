"""How a processing service reaches jetpipe: the one thing a transport must do."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pipeline.sdk.service import ProcessingService


@runtime_checkable
class Transport(Protocol):
    """Finds the pipeline's tasks, runs each through `service.run_task` with at most `service.concurrency`
    at once, keeps the task's lease while it runs, and returns its result, until `service.stopping` is set;
    survives outages of whatever it talks to. `NatsTransport` (the default) and `HttpTransport` are two."""

    async def run(self, service: ProcessingService) -> None: ...
