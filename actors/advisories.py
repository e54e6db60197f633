"""`process_task_advisory`: the fast path for lost images (MAX_DELIVERIES / MSG_TERMINATED advisories)."""

from __future__ import annotations

import logging

import dramatiq

from pipeline import names
from pipeline.core.lost import Verdict, handle_advisory
from pipeline.core.retry import retry_outages
from pipeline.infra.metrics import metrics
from pipeline.infra.runtime import get_runtime

log = logging.getLogger(__name__)


#: Milliseconds before a deferred verdict is looked at again.
DEFER_MS = 2_000


@dramatiq.actor(actor_name=names.PROCESS_TASK_ADVISORY, queue_name=names.ACTOR_QUEUES[names.PROCESS_TASK_ADVISORY],
                retry_when=retry_outages(20), min_backoff=500, max_backoff=15_000, time_limit=60_000,
                max_age=7 * 24 * 3600 * 1000)
def process_task_advisory(body: str, results_seq: int | None = None) -> None:
    """Fail the image whose task JetStream gave up on (idempotent: duplicates change nothing), once no
    result of its job published before the give-up (up to `results_seq`) is still waiting to be saved."""
    outcome, results_seq = handle_advisory(get_runtime(), body, results_seq)
    if outcome == Verdict.DEFERRED:
        process_task_advisory.send_with_options(args=(body, results_seq), delay=DEFER_MS)
    metrics().advisories.labels(outcome).inc()
    if outcome == Verdict.FAILED:
        metrics().lost_images.labels("advisory").inc()
    log.debug("advisory handled: %s", outcome)

