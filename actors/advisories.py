"""`process_task_advisory`: the fast path for lost images (MAX_DELIVERIES / MSG_TERMINATED advisories)."""

from __future__ import annotations

import logging

import dramatiq

from pipeline import broker as _broker  # noqa: F401 - sets the broker before the actor is declared
from pipeline import names
from pipeline.errors import StateMissing, TransientError
from pipeline.lost import handle_advisory
from pipeline.metrics import metrics
from pipeline.runtime import get_runtime

log = logging.getLogger(__name__)


def _retry_when(retries: int, exc: BaseException) -> bool:
    return isinstance(exc, TransientError | StateMissing | OSError) and retries < 20


@dramatiq.actor(queue_name=names.RESULTS_QUEUE, retry_when=_retry_when, min_backoff=500, max_backoff=15_000,
                time_limit=60_000)
def process_task_advisory(body: str) -> None:
    """Fail the image whose task JetStream gave up on (idempotent: duplicates change nothing)."""
    outcome = handle_advisory(get_runtime(), body)
    metrics().advisories.labels(outcome).inc()
    if outcome == "failed":
        metrics().lost_images.labels("advisory").inc()
    log.debug("advisory handled: %s", outcome)


def send_advisories(batch: list[tuple[str]]) -> None:
    for (body,) in batch:
        process_task_advisory.send(body)
