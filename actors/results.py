"""`process_pipeline_result`: save a job's results waiting in the inbox (invariant 1, many per transaction)."""

from __future__ import annotations

import logging

import dramatiq

import models
from pipeline import names
from pipeline.core.retry import retry_outages
from pipeline.core.saving import drain
from pipeline.infra.metrics import metrics
from pipeline.infra.runtime import get_runtime

log = logging.getLogger(__name__)

#: Retries after an outage (bounded: the results stay in the inbox and a later request drains them);
#: anything else is a bug and is dead-lettered.
OUTAGE_RETRIES = 20


@dramatiq.actor(actor_name=names.PROCESS_PIPELINE_RESULT, queue_name=names.ACTOR_QUEUES[names.PROCESS_PIPELINE_RESULT],
                retry_when=retry_outages(OUTAGE_RETRIES), min_backoff=500, max_backoff=15_000, time_limit=120_000,
                max_age=24 * 3600 * 1000)
def process_pipeline_result(job_id: int) -> None:
    """Save the results of job `job_id` waiting in the inbox."""
    runtime = get_runtime()
    try:
        with metrics().result_seconds.time():
            drained = drain(runtime, job_id)
    except Exception as exc:
        if models.is_transient(exc):
            log.warning("job=%s database unavailable, results stay in the inbox, will retry: %s", job_id, exc)
        raise
    if drained.more:
        process_pipeline_result.send(job_id)  # hand over: other jobs' drains get a turn
    log.debug("job=%s drained %s result message(s)", job_id, drained.messages)

