"""The module Dramatiq workers run: `dramatiq pipeline.actors`.

It builds the worker broker (jetpipe's RedisBroker with its middleware, made Dramatiq's global broker),
then declares every actor on it, so the actors bind to it rather than to an implicit localhost broker.
"""

from __future__ import annotations

import logging
import os

from pipeline.middleware import worker_broker

broker = worker_broker()

from actors import jobs_health_check, process_pipeline_result, process_task_advisory, run_job  # noqa: E402

logging.basicConfig(level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO"),
                    format="%(asctime)s %(levelname)s %(process)d %(name)s %(message)s")

__all__ = ["broker", "jobs_health_check", "process_pipeline_result", "process_task_advisory", "run_job"]
