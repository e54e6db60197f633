"""The module Dramatiq workers run: `dramatiq pipeline.actors`.

It builds the worker broker (jetpipe's RedisBroker with its middleware, made Dramatiq's global broker),
then declares every actor on it, so the actors bind to it rather than to an implicit localhost broker.
"""

from __future__ import annotations

from pipeline.infra import logs
from pipeline.settings import get_settings
from pipeline.worker.middleware import worker_broker

broker = worker_broker()

from actors import jobs_health_check, process_pipeline_result, process_task_advisory, run_job  # noqa: E402

logs.configure(get_settings())

__all__ = ["broker", "jobs_health_check", "process_pipeline_result", "process_task_advisory", "run_job"]
