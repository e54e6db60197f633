"""Dramatiq actors: entry points of a few lines over the core in `pipeline/`, which sends them messages by
name. Workers run `dramatiq pipeline.actors`, which imports this package.

Dramatiq binds an actor to the global broker when the actor is declared, so the worker broker
(`pipeline.worker.middleware.worker_broker`) is built and made the global one here, before any is declared.
"""

from __future__ import annotations

from pipeline.worker.middleware import worker_broker

broker = worker_broker()

from actors.advisories import process_task_advisory  # noqa: E402
from actors.health import jobs_health_check  # noqa: E402
from actors.results import process_pipeline_result  # noqa: E402
from actors.run_job import run_job  # noqa: E402
from actors.webhooks import deliver_webhooks  # noqa: E402

__all__ = ["broker", "deliver_webhooks", "jobs_health_check", "process_pipeline_result", "process_task_advisory",
           "run_job"]
