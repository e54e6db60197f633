"""`process_pipeline_result`: one result message, handled in the order of invariant 1."""

from __future__ import annotations

import logging

import dramatiq
import peewee

from pipeline import broker as _broker  # noqa: F401 - sets the broker before the actor is declared
from pipeline import names
from pipeline.errors import StateMissing, TransientError
from pipeline.handling import handle_result_message
from pipeline.metrics import metrics
from pipeline.runtime import get_runtime

log = logging.getLogger(__name__)


def _retry_when(retries: int, exc: BaseException) -> bool:
    """Retry outages (bounded); anything else is a bug: dead-letter it, the task's redelivery retries it."""
    transient = isinstance(exc, TransientError | StateMissing | OSError) or type(exc).__module__.startswith(
        ("peewee", "psycopg2", "sqlite3"))
    return transient and retries < 20


@dramatiq.actor(queue_name=names.RESULTS_QUEUE, retry_when=_retry_when, min_backoff=500, max_backoff=15_000,
                time_limit=120_000, max_age=24 * 3600 * 1000)
def process_pipeline_result(job_id: int, body: str, reply: str | None) -> None:
    """Handle a result published on `pipeline.results.<job_id>` for the task replying on `reply`."""
    try:
        with metrics().result_seconds.time():
            handled = handle_result_message(get_runtime(), job_id, body.encode("utf-8"), reply)
    except (peewee.OperationalError, peewee.InterfaceError) as exc:
        log.warning("job=%s database unavailable, task not ACKed, will retry: %s", job_id, exc)
        raise
    log.debug("job=%s result handled: %s", job_id, handled.action)


def send_results(batch: list[tuple[int, str, str | None]]) -> None:
    """Enqueue one `process_pipeline_result` per (job_id, body, reply) (the bridge's send)."""
    for job_id, body, reply in batch:
        process_pipeline_result.send(job_id, body, reply)
