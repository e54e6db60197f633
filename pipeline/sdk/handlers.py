"""Python handlers of pipelines: what `internal` dispatch mode and the reference service run per task."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.schemas import Result, Task
from pipeline.sdk import moth

Handler = Callable[[Task], Result]

#: Built-in handlers by pipeline slug.
HANDLERS: dict[str, Handler] = {moth.SLUG: moth.process_task}


def get_handler(slug: str) -> Handler | None:
    return HANDLERS.get(slug)
