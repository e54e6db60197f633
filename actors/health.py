"""`jobs_health_check`: the periodic actor (sent once per slot by the in-worker scheduler)."""

from __future__ import annotations

import logging
import time

import dramatiq

from pipeline import names
from pipeline.core.reconciler import run_health_check
from pipeline.infra.runtime import get_runtime

log = logging.getLogger(__name__)

#: A health check running longer than this (ms) is stopped; its lock expires with it.
TIME_LIMIT_MS = 5 * 60 * 1000


@dramatiq.actor(actor_name=names.JOBS_HEALTH_CHECK, queue_name=names.ACTOR_QUEUES[names.JOBS_HEALTH_CHECK],
                max_retries=0, time_limit=TIME_LIMIT_MS)
def jobs_health_check(slot: int | None = None) -> None:
    """One health check; skipped if another one is still running (no overlapping runs), or if this tick
    waited in the queue past the next one (a backlog of ticks is not replayed)."""
    runtime = get_runtime()
    interval = runtime.settings.health_check_seconds
    if slot is not None and time.time() // interval - slot > 1:
        log.info("jobs_health_check slot=%s skipped: stale (a newer tick follows)", slot)
        return
    lock = names.periodic_lock_key(names.JOBS_HEALTH_CHECK)
    token = runtime.state.try_lock(lock, TIME_LIMIT_MS)
    if token is None:
        log.info("jobs_health_check slot=%s skipped: another run is in progress", slot)
        return
    try:
        run_health_check(runtime)
    finally:
        runtime.state.release(lock, token)
