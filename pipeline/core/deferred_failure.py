"""Deferred failure (invariant 7): what happens when `run_job` fails for good (after its retries).

It is decided here and only here, in `after_nack`, which Dramatiq calls exactly once per dead-lettered
message and never for an attempt that will be retried (Dramatiq's Retries middleware). No other hook marks
a job failed because its run_job raised, so nothing later can undo a deferral.

- An `async_api` job that published any task (`dispatch_cursor` moved, or `dispatched_at` set) is in
  flight and is not failed: we log `run_job raised but async processing is in-flight; deferring FAILURE
  to async progress handler`. Images whose tasks were never published are failed with the reason
  (`not dispatched: run_job failed: ...`); the published ones decide through their results, and the job
  ends by the threshold rule.
- A job that failed before publishing anything, and any `internal` job, becomes FAILURE at once, and
  its NATS consumer and Redis state are cleaned up.
"""

from __future__ import annotations

import functools
import logging
from enum import StrEnum

import dramatiq
from dramatiq.broker import MessageProxy

from models import DispatchMode, ImageStatus, Job, JobImage, JobStatus, tuples
from pipeline import names
from pipeline.core import jobs, progress
from pipeline.core.joblog import job_log
from pipeline.core.outcomes import finish, load_job, settle
from pipeline.core.result_rows import fail_images
from pipeline.infra.runtime import Runtime, get_runtime

log = logging.getLogger(__name__)

DEFERRAL_MESSAGE = "run_job raised but async processing is in-flight; deferring FAILURE to async progress handler"


class Decision(StrEnum):
    """What invariant 7 decided for a job whose run_job failed for good."""

    DEFERRED = "deferred"  # its tasks are out: their results decide
    FAILED = "failed"  # nothing was dispatched: the job failed, with cleanup
    IGNORED = "ignored"  # no such job, or it had ended


def fail_or_defer(runtime: Runtime, job_id: int, reason: str) -> Decision:
    """Apply invariant 7 to a job whose run_job failed for good: what was decided."""
    job = load_job(job_id)
    if job is None or job.status in JobStatus.TERMINAL:
        return Decision.IGNORED
    if job.dispatch_mode == DispatchMode.ASYNC_API and (job.dispatched_at is not None or job.dispatch_cursor > 0):
        job_log(job_id, logging.WARNING, f"{DEFERRAL_MESSAGE}: {reason}", logger=log)
        if job.dispatched_at is None:
            unsent = fail_undispatched(runtime, job, f"not dispatched: run_job failed: {reason}")
            job_log(job_id, logging.WARNING, f"{unsent} image(s) whose tasks were never published are failed; the "
                                             "published ones decide through their results", logger=log)
        return Decision.DEFERRED
    when = "before dispatching its tasks" if job.dispatch_mode == DispatchMode.ASYNC_API else "in internal mode"
    if progress.transition(job_id, JobStatus.FAILURE, error=f"run_job failed {when}: {reason}"):
        job_log(job_id, logging.ERROR, f"job FAILURE: run_job failed {when}: {reason}", logger=log)
        if job.dispatch_mode == DispatchMode.ASYNC_API:
            jobs.cleanup(runtime, job_id, job.pipeline.slug)
    return Decision.FAILED


class DeferredFailure(dramatiq.Middleware):
    """On run_job's final failure, fail the job or defer to its results (see the module docstring)."""

    def after_nack(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        if message.actor_name != names.RUN_JOB or not message.args:
            return
        exc = getattr(message, "_exception", None)  # set by the worker for this delivery's failure
        reason = f"{type(exc).__name__}: {exc}" if exc is not None else "dead-lettered"
        fail_or_defer(get_runtime(), int(message.args[0]), reason)


#: Images failed per transaction when run_job gave up part-way through dispatching.
FAIL_CHUNK = 5000


def fail_undispatched(runtime: Runtime, job: Job, reason: str) -> int:
    """Fail the job's pending images past its dispatch checkpoint (their tasks were never published);
    how many. The job ends by the threshold rule once the published ones have their results."""
    failed = 0
    while True:
        ids = [str(i) for (i,) in tuples(JobImage.select(JobImage.image).where(
            (JobImage.job == job.id) & (JobImage.status == ImageStatus.PENDING)
            & (JobImage.id > job.dispatch_cursor)).order_by(JobImage.id).limit(FAIL_CHUNK))]
        if not ids:
            return failed
        outcomes, _, written = settle(runtime, job, functools.partial(fail_images, job.id, ids, reason))
        failed += sum(1 for o in outcomes if o.failed)
        finish(runtime, job, written)
        if not outcomes:  # the job ended meanwhile
            return failed
