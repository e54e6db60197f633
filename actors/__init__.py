"""Dramatiq actors: thin entry points over the core in `pipeline/`, which sends them messages by name.

Dramatiq binds an actor to the global broker when the actor is declared, so this package makes the
worker broker (`pipeline.worker.middleware.worker_broker`) the global one before declaring any. Workers run
`dramatiq pipeline.actors`, which imports this package.
"""

from __future__ import annotations

from pipeline.worker.middleware import worker_broker

worker_broker()

from actors.advisories import process_task_advisory  # noqa: E402
from actors.health import jobs_health_check  # noqa: E402
from actors.results import process_pipeline_result  # noqa: E402
from actors.run_job import run_job  # noqa: E402

__all__ = ["jobs_health_check", "process_pipeline_result", "process_task_advisory", "run_job"]
