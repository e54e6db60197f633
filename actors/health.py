"""`jobs_health_check`: the periodic actor (sent once per slot by the in-worker scheduler)."""

from __future__ import annotations

import dramatiq

from pipeline import names
from pipeline.core.reconciler import run_health_check
from pipeline.infra.runtime import get_runtime
from pipeline.worker.scheduler import run_once_per_slot

#: A health check running longer than this (ms) is stopped; its lock expires with it.
TIME_LIMIT_MS = 5 * 60 * 1000


@dramatiq.actor(actor_name=names.JOBS_HEALTH_CHECK, queue_name=names.ACTOR_QUEUES[names.JOBS_HEALTH_CHECK],
                max_retries=0, time_limit=TIME_LIMIT_MS)
def jobs_health_check(slot: int | None = None) -> None:
    """One health check; skipped if another one is still running, or if this tick is stale."""
    runtime = get_runtime()
    run_once_per_slot(runtime, names.JOBS_HEALTH_CHECK, slot, runtime.settings.health_check_seconds,
                      lambda: run_health_check(runtime), time_limit_ms=TIME_LIMIT_MS)
