"""`internal` dispatch mode: the worker runs the pipeline's Python handler on every image itself.

Results go through the same save -> Redis gate -> progress path as NATS results; there is no task to
ACK. Failures in this mode are never deferred: an image whose handler raises is failed with the reason.
"""

from __future__ import annotations

import logging

from models import Job, JobStatus
from pipeline.core import jobs, outcomes
from pipeline.core.image_policy import UNREADABLE, ImagePolicy
from pipeline.core.joblog import job_log
from pipeline.core.run import count_reused
from pipeline.errors import BadResult, UserInputError
from pipeline.infra.runtime import Runtime
from pipeline.schemas import ErrorResult
from pipeline.sdk.handlers import get_handler
from pipeline.sdk.moth import ImageUnreadable

log = logging.getLogger(__name__)

#: Pending images read at a time.
INTERNAL_CHUNK = 500


def run_internal(runtime: Runtime, job: Job) -> str:
    """Process every pending image of `job` in this process; returns the job's status afterwards."""
    handler = get_handler(job.pipeline.slug)
    if handler is None:
        raise UserInputError(f"pipeline {job.pipeline.slug!r} has no built-in handler for internal mode")
    jobs.load_state_from_db(runtime.state, job.id)
    status = count_reused(runtime, job) if job.reused_images else job.status
    policy = ImagePolicy.from_settings(runtime.settings)
    for _, task in _pending(job):
        if status in JobStatus.TERMINAL:  # canceled (or ended) meanwhile: run no more of its images
            job_log(job.id, logging.INFO, f"internal processing stopped: the job is {status}")
            break
        try:
            if policy.refuses_read(task.image_url):  # (the roots, hosts or buckets changed since the job was made)
                log.warning("job=%s image=%s not read: outside PIPELINE_IMAGE_ROOTS, PIPELINE_IMAGE_HOSTS or "
                            "PIPELINE_S3_BUCKETS", job.id, task.image_id)
                raise ImageUnreadable(UNREADABLE)
            result = handler(jobs.reachable(task, runtime.settings))
        except Exception as exc:  # noqa: BLE001 - a handler failure fails that image only
            result = ErrorResult(error=f"{type(exc).__name__}: {exc}", image_id=task.image_id)
            job_log(job.id, logging.WARNING, f"image failed: {result.error}", image_id=task.image_id)
        try:
            _, written, _ = outcomes.apply_result(runtime, job, result)
        except BadResult as exc:
            handled = outcomes.fail_bad_result(runtime, job, BadResult(str(exc), image_ids=(task.image_id,)),
                                               None)
            status = handled.job_status or status
            continue
        status = written.status
        outcomes.finish(runtime, job, written)
    return status


def _pending(job: Job):
    """The job's pending tasks, a chunk at a time (each read in full before its results are written)."""
    cursor = 0
    while chunk := jobs.pending_chunk(job, after_id=cursor, limit=INTERNAL_CHUNK, presign=False):
        yield from chunk
        cursor = chunk[-1][0]
