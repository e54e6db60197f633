"""`process_pipeline_result`: save a job's results waiting in the inbox (invariant 1, many per transaction)."""

from __future__ import annotations

import logging

import dramatiq
import peewee

from pipeline import broker as _broker  # noqa: F401 - sets the broker before the actor is declared
from pipeline import names
from pipeline.errors import StateMissing, TransientError
from pipeline.inbox import Incoming, take
from pipeline.metrics import metrics
from pipeline.runtime import get_runtime
from pipeline.saving import drain

log = logging.getLogger(__name__)


def _retry_when(retries: int, exc: BaseException) -> bool:
    """Retry outages (bounded; the results stay in the inbox and a later request drains them); anything
    else is a bug: dead-letter it."""
    transient = isinstance(exc, TransientError | StateMissing | OSError) or type(exc).__module__.startswith(
        ("peewee", "psycopg2", "sqlite3"))
    return transient and retries < 20


@dramatiq.actor(queue_name=names.RESULTS_QUEUE, retry_when=_retry_when, min_backoff=500, max_backoff=15_000,
                time_limit=120_000, max_age=24 * 3600 * 1000)
def process_pipeline_result(job_id: int, body: str | None = None, reply: str | None = None) -> None:
    """Save the results of job `job_id` waiting in the inbox. (A message queued by an earlier version of
    jetpipe carries one result in `body` and `reply`: it is taken into the inbox first.)"""
    runtime = get_runtime()
    try:
        with metrics().result_seconds.time():
            if body is not None:
                take(runtime, [Incoming.direct(job_id, body.encode("utf-8"), reply)])
            drained = drain(runtime, job_id)
    except (peewee.OperationalError, peewee.InterfaceError) as exc:
        log.warning("job=%s database unavailable, results stay in the inbox, will retry: %s", job_id, exc)
        raise
    if drained.more:
        process_pipeline_result.send(job_id)  # hand over: other jobs' drains get a turn
    log.debug("job=%s drained %s result message(s)", job_id, drained.messages)


def request_drains(job_ids) -> None:
    """Ask for the results of these jobs to be saved (one message each; extra requests cost one query)."""
    for job_id in job_ids:
        process_pipeline_result.send(job_id)
