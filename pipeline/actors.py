"""The module Dramatiq workers run: `dramatiq pipeline.actors`.

Importing `actors` builds the worker broker (jetpipe's RedisBroker with its middleware, made Dramatiq's
global broker) and declares every actor on it; this module adds the process's log and trace set-up. It is the one
entry point of a worker: the broker is built in one place, `actors/__init__.py`.
"""

from __future__ import annotations

from actors import broker, jobs_health_check, process_pipeline_result, process_task_advisory, run_job
from pipeline.infra import logs, tracing
from pipeline.settings import get_settings

logs.configure(get_settings())
tracing.setup("jetpipe-worker")

__all__ = ["broker", "jobs_health_check", "process_pipeline_result", "process_task_advisory", "run_job"]
