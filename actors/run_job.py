"""`run_job`: start a job (`pipeline.core.run`), and in `internal` mode process its images in this worker."""

from __future__ import annotations

import dramatiq

from pipeline import names
from pipeline.core.retry import retry_outages
from pipeline.core.run import run
from pipeline.infra.runtime import Runtime, get_runtime
from pipeline.worker.internal import run_internal

#: Retries of run_job after an outage (backoff 2 s doubling to 60 s: about 25 minutes in all). A permanent
#: error (bad data, a bug) fails for good at once and DeferredFailure decides.
OUTAGE_RETRIES = 30


@dramatiq.actor(actor_name=names.RUN_JOB, queue_name=names.ACTOR_QUEUES[names.RUN_JOB],
                retry_when=retry_outages(OUTAGE_RETRIES), min_backoff=2_000, max_backoff=60_000,
                time_limit=6 * 3600 * 1000)
def run_job(job_id: int) -> None:
    """Start a job: publish a task per image to JetStream (async_api) or process them here (internal)."""
    execute(get_runtime(), job_id)


def execute(runtime: Runtime, job_id: int) -> None:
    """The body of run_job; safe to retry at any point."""
    job = run(runtime, job_id)
    if job is not None:
        run_internal(runtime, job)
