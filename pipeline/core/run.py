"""What `run_job` does to a job: take its job slot (or wait for one), mark it STARTED and collected, load its
Redis state and publish its tasks. Safe to repeat at any point: every step checks what is already done.
"""

from __future__ import annotations

import logging

from models import DispatchMode, Job, JobStatus
from pipeline.core import jobs, progress, slots
from pipeline.core.joblog import job_log
from pipeline.core.outcomes import finish, load_job
from pipeline.infra import tracing
from pipeline.infra.jobstate import Snapshot
from pipeline.infra.runtime import Runtime

log = logging.getLogger(__name__)


def run(runtime: Runtime, job_id: int) -> Job | None:
    """Start or resume the job `job_id`. Returns the job if its images are to be processed by the caller
    (`internal` dispatch mode); None once its tasks are published, or when there is nothing (more) to do now
    (missing, ended, canceling, empty, or waiting for a job slot)."""
    job = load_job(job_id)
    if job is None:
        log.error("job=%s run_job: no such job; nothing to do", job_id)
        return None
    with tracing.span("jetpipe.run_job", parent=job.trace_parent, attributes={"jetpipe.job_id": job_id}):
        return _run(runtime, job)


def _run(runtime: Runtime, job: Job) -> Job | None:
    job_id = job.id
    if job.status in JobStatus.TERMINAL or job.status == JobStatus.CANCELING:
        job_log(job_id, logging.INFO, f"run_job: job is {job.status}; nothing to do")
        return None
    slot = None
    if job.status != JobStatus.STARTED and job.dispatch_mode == DispatchMode.ASYNC_API and job.total_images:
        slot = slots.take_or_wait(runtime, job)
        if slot is None:
            return None  # waiting as it was, or FAILURE past its deadline
    if progress.transition(job_id, JobStatus.STARTED, allowed_from=(JobStatus.CREATED, JobStatus.PENDING)):
        job_log(job_id, logging.INFO, f"job STARTED: {job.total_images} image(s), mode {job.dispatch_mode}")
    reread = load_job(job_id)
    if reread is None:  # deleted meanwhile
        return None
    job = reread
    progress.mark_collected(job)
    if job.total_images == 0:
        written = progress.write_progress(job_id, Snapshot(0, 0, 0, 0, 0, 0),
                                          threshold=runtime.settings.failure_threshold)
        job_log(job_id, logging.INFO, f"no images: job finished {written.status} at once")
        return None
    if job.dispatch_mode == DispatchMode.INTERNAL:
        return job
    if jobs.load_state_from_db(runtime.state, job_id):
        log.info("job=%s Redis state initialised: %s pending", job_id, job.total_images - (job.reused_images or 0))
    if job.dispatched_at is None:
        jobs.dispatch(runtime, job, consumer=slot)
        if job.reused_images:
            count_reused(runtime, job)
    return None


def count_reused(runtime: Runtime, job: Job) -> str:
    """Show the images whose results an earlier job saved as processed at once; end the job if they were all.
    The job's status afterwards."""
    snapshot = runtime.state.snapshot(job.id)
    if snapshot is None:  # Redis lost it meanwhile: the first result rebuilds it from the database
        return job.status
    job_log(job.id, logging.INFO, f"{job.reused_images} image(s) reuse the results an earlier job of the same "
                                  f"pipeline version saved; {snapshot.remaining} sent to services")
    written = progress.write_progress(job.id, snapshot, threshold=runtime.settings.failure_threshold)
    finish(runtime, job, written)
    return written.status
