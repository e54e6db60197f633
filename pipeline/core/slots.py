"""Job slots: a pipeline's tasks stream holds at most PIPELINE_NATS_MAX_JOBS job consumers. A job that finds
none free waits its turn, PENDING, in one Redis set; the cleanup of a job that ends wakes the oldest waiter.
"""

from __future__ import annotations

import logging

from nats.js.api import ConsumerConfig

from models import Job, JobStatus, utcnow
from pipeline import names
from pipeline.core import progress, scheduling
from pipeline.core.joblog import job_log
from pipeline.errors import JobSlotsFull
from pipeline.infra.runtime import Runtime
from pipeline.infra.taskqueue import is_paused, own_metadata

log = logging.getLogger(__name__)

#: How often a job waiting for a free job slot looks again, and how often its waiting is written to its log.
SLOT_RETRY_MS = 15_000
SLOT_WAIT_LOG_S = 3600


def take_job_slot(runtime: Runtime, job: Job) -> ConsumerConfig:
    """The job's consumer on its pipeline's tasks stream, created if missing (the streams too: NATS may have
    lost them since this process connected); raises JobSlotsFull when the stream holds PIPELINE_NATS_MAX_JOBS."""
    settings = runtime.settings
    runtime.tasks.ensure_streams(**settings.stream_options())
    runtime.tasks.ensure_tasks_stream(job.pipeline.slug, max_jobs=settings.nats_max_jobs,
                                      replicas=settings.nats_replicas)
    options = scheduling.consumer_options(job.id)
    consumer = runtime.tasks.ensure_job_consumer(job.id, job.pipeline.slug, max_deliver=settings.nats_max_deliver,
                                                 ack_wait_s=settings.nats_task_ttr, **options)
    scheduling.consumer_made(runtime, job.id, job.pipeline.slug, server_paused=is_paused(consumer),
                             claim=own_metadata(consumer))
    return consumer


def take_or_wait(runtime: Runtime, job: Job) -> ConsumerConfig | None:
    """The consumer of an async job about to start, of which its pipeline's tasks stream holds
    PIPELINE_NATS_MAX_JOBS; None when none is free. The job then stays PENDING: the cleanup of the next job
    to end sends run_job for it (`wake_a_waiting_job`), and run_job looks again in SLOT_RETRY_MS anyway
    (touching the job, so the health check does not re-send it meanwhile; if that message is lost, the health
    check's re-send of a
    PENDING job takes over). A job whose deadline passes meanwhile ends FAILURE saying so."""
    try:
        consumer = take_job_slot(runtime, job)
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
        Job.update(updated_at=utcnow()).where(
            (Job.id == job.id) & Job.status.in_((JobStatus.CREATED, JobStatus.PENDING))).execute()
        runtime.redis.zadd(names.SLOT_WAITERS_KEY, {str(job.id): job.id})  # woken when a job ends
        if runtime.redis.set(names.slot_wait_key(job.id), 1, nx=True, ex=SLOT_WAIT_LOG_S):
            job_log(job.id, logging.WARNING, f"waiting for a free job slot: {exc}; it starts when a job ends "
                                             f"(run_job also looks again every {SLOT_RETRY_MS // 1000} s)")
        # one delayed look at a time: a wake-up that found no slot after all leaves the scheduled one be
        if runtime.redis.set(names.slot_look_key(job.id), 1, nx=True, px=SLOT_RETRY_MS - 1000):
            runtime.send(names.RUN_JOB, job.id, delay_ms=SLOT_RETRY_MS)
        return None


def wake_a_waiting_job(runtime: Runtime) -> int | None:
    """A job slot has just been freed (a job's consumer removed): send run_job at once for the oldest job
    waiting for one (PIPELINE_NATS_MAX_JOBS), rather than leave it to its next look; which one, if any.
    Taking it off the waiters' set is atomic, so slots freed at once wake different jobs."""
    import peewee
    import redis

    try:
        for _ in range(10):  # skip waiters that started by their own look or were canceled meanwhile
            popped = runtime.redis.zpopmin(names.SLOT_WAITERS_KEY)
            if not popped:
                return None
            job_id = int(popped[0][0])
            if Job.select().where((Job.id == job_id) & Job.status.in_((JobStatus.CREATED, JobStatus.PENDING))
                                  & Job.dispatched_at.is_null()).exists():
                runtime.send(names.RUN_JOB, job_id)
                log.info("job=%s a job slot is free: run_job sent", job_id)
                return job_id
        return None
    except (redis.RedisError, peewee.PeeweeException) as exc:  # best effort: it looks again by itself
        log.warning("cleanup: could not wake a job waiting for a slot (%s); it looks again by itself", exc)
        return None
