"""The module Dramatiq workers run: `dramatiq pipeline.actors`.

It imports the broker first (which calls `dramatiq.set_broker`), then every actor, so the actors bind to
jetpipe's configured RedisBroker rather than an implicit localhost one (Dramatiq binds an actor to the
broker set when the actor is declared).
"""

from __future__ import annotations

import logging
import os

from actors import jobs_health_check, process_pipeline_result, process_task_advisory, run_job  # noqa: E402,I001
from pipeline.broker import broker  # noqa: F401 - must come first

logging.basicConfig(level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO"),
                    format="%(asctime)s %(levelname)s %(process)d %(name)s %(message)s")

__all__ = ["broker", "jobs_health_check", "process_pipeline_result", "process_task_advisory", "run_job"]
