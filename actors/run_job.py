"""`run_job`: collect -> load Redis state -> publish tasks -> mark dispatched (or run internally)."""

from __future__ import annotations

import logging

import dramatiq
from nats.js.api import ConsumerConfig

from models import DispatchMode, JobStatus, utcnow
from pipeline import names
from pipeline.core import jobs, progress
from pipeline.core.joblog import job_log
from pipeline.core.outcomes import load_job
from pipeline.core.retry import retry_outages
from pipeline.errors import JobSlotsFull
from pipeline.infra.jobstate import Snapshot
from pipeline.infra.runtime import Runtime, get_runtime
from pipeline.worker.internal import run_internal

log = logging.getLogger(__name__)


#: Retries of run_job after an outage (backoff 2 s doubling to 60 s: about 25 minutes in all). A permanent
#: error (bad data, a bug) fails for good at once and DeferredFailure decides.
OUTAGE_RETRIES = 30
#: How often a job waiting for a free job slot (PIPELINE_NATS_MAX_JOBS) looks again, and how often its
#: waiting is written to its log.
SLOT_RETRY_MS = 15_000
SLOT_WAIT_LOG_S = 3600


@dramatiq.actor(actor_name=names.RUN_JOB, queue_name=names.ACTOR_QUEUES[names.RUN_JOB],
                retry_when=retry_outages(OUTAGE_RETRIES), min_backoff=2_000, max_backoff=60_000,
                time_limit=6 * 3600 * 1000)
def run_job(job_id: int) -> None:
    """Start a job: publish a task per image to JetStream (async_api) or process them here (internal)."""
    execute(get_runtime(), job_id)


def execute(runtime: Runtime, job_id: int) -> str:
    """The body of run_job; safe to retry at any point. Returns the job's status when it returns."""
    job = load_job(job_id)
    if job is None:
        log.error("job=%s run_job: no such job; nothing to do", job_id)
        return "MISSING"
    if job.status in JobStatus.TERMINAL or job.status == JobStatus.CANCELING:
        job_log(job_id, logging.INFO, f"run_job: job is {job.status}; nothing to do")
        return job.status
    slot = None
    if job.status != JobStatus.STARTED and job.dispatch_mode == DispatchMode.ASYNC_API and job.total_images:
        slot = _take_a_slot(runtime, job)
        if slot is None:
            return type(job).get_by_id(job_id).status  # waiting as it was, or FAILURE past its deadline
    if progress.transition(job_id, JobStatus.STARTED, allowed_from=(JobStatus.CREATED, JobStatus.PENDING)):
        job_log(job_id, logging.INFO, f"job STARTED: {job.total_images} image(s), mode {job.dispatch_mode}")
    job = load_job(job_id)
    _mark_collected(job)
    if job.total_images == 0:
        written = progress.write_progress(job_id, Snapshot(0, 0, 0, 0, 0, 0),
                                          threshold=runtime.settings.failure_threshold)
        job_log(job_id, logging.INFO, f"no images: job finished {written.status} at once")
        return written.status
    if job.dispatch_mode == DispatchMode.INTERNAL:
        return run_internal(runtime, job)
    if jobs.load_state_from_db(runtime.state, job_id):
        log.info("job=%s Redis state initialised: %s pending", job_id, job.total_images)
    if job.dispatched_at is None:
        jobs.dispatch(runtime, job, consumer=slot)
    return job.status


def _take_a_slot(runtime: Runtime, job) -> ConsumerConfig | None:
    """The consumer of an async job about to start, of which its pipeline's tasks stream holds
    PIPELINE_NATS_MAX_JOBS; None
    when none is free. The job then stays PENDING: the cleanup of the next job to end sends run_job for it
    (`jobs.wake_a_waiting_job`), and run_job looks again in SLOT_RETRY_MS anyway (touching the job, so the
    health check does not re-send it meanwhile; if that message is lost, the health check's re-send of a
    PENDING job takes over). A job whose deadline passes meanwhile ends FAILURE saying so."""
    try:
        consumer = jobs.take_job_slot(runtime, job)
        runtime.redis.zrem(names.SLOT_WAITERS_KEY, job.id)  # if it was waiting
        return consumer
    except JobSlotsFull as exc:
        if job.deadline_at is not None and utcnow() >= job.deadline_at:
            reason = (f"deadline passed: the job was to end by {job.deadline_at.isoformat(timespec='seconds')}Z "
                      f"and was still waiting for a free job slot ({exc})")
            if progress.transition(job.id, JobStatus.FAILURE, allowed_from=(JobStatus.CREATED, JobStatus.PENDING),
                                   error=reason):
                job_log(job.id, logging.ERROR, f"job FAILURE: {reason}")
            return None
        type(job).update(updated_at=utcnow()).where(
            (type(job).id == job.id) & type(job).status.in_((JobStatus.CREATED, JobStatus.PENDING))).execute()
        runtime.redis.zadd(names.SLOT_WAITERS_KEY, {job.id: job.id})  # woken when a job ends
        if runtime.redis.set(names.slot_wait_key(job.id), 1, nx=True, ex=SLOT_WAIT_LOG_S):
            job_log(job.id, logging.WARNING, f"waiting for a free job slot: {exc}; it starts when a job ends "
                                             f"(run_job also looks again every {SLOT_RETRY_MS // 1000} s)")
        # one delayed look at a time: a wake-up that found no slot after all leaves the scheduled one be
        if runtime.redis.set(names.slot_look_key(job.id), 1, nx=True, px=SLOT_RETRY_MS - 1000):
            runtime.send(names.RUN_JOB, job.id, delay_ms=SLOT_RETRY_MS)
        return None


def _mark_collected(job) -> None:
    """Collect stage: the job's images are its JobImage rows, counted when the job was created."""
    stage = job.progress.get("stages", {}).get("collect", {})
    if stage.get("status") == JobStatus.SUCCESS:
        return
    p = job.progress or progress.initial_progress(job.total_images)
    p["stages"]["collect"].update(status=JobStatus.SUCCESS, progress=1.0, total=job.total_images)
    p["summary"]["status"] = JobStatus.STARTED
    type(job).update(progress=p, updated_at=utcnow()).where(
        (type(job).id == job.id) & (type(job).status.in_(JobStatus.RUNNING))).execute()
