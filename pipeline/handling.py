"""Handling one result message, in the order of invariant 1:

    validate -> save to DB (idempotent) -> atomic Redis update -> progress written -> ACK the task(s)

The save, the Redis update and the progress write happen inside one database transaction that commits
after the progress write, so a result message costs one transaction and one gate script whatever its
number of images. A crash anywhere before the ACK leads to redelivery, and the replay converges to the
same rows and the same counters: the save is idempotent, the Redis gate counts an image once (a crash
between the gate and the commit leaves the image counted and its rows unsaved until the replay saves
them; the gate then does not count it again, and no job ends while the database still holds a counted
image as pending: `progress.write_progress`), progress is monotone.

A result message may cover several images of one job: `source_images` lists them and the
`Pipeline-Task-Reply` header names each image's task (comma-separated); every named task is ACKed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from models import Job, JobStatus, Pipeline, write_transaction
from pipeline import jobs, names, progress
from pipeline.crashpoints import crash_point
from pipeline.errors import BadResult, StateMissing, TransientError
from pipeline.joblog import job_log
from pipeline.jobstate import Outcome, Snapshot
from pipeline.metrics import metrics
from pipeline.results import fail_images, prepare_result
from pipeline.schemas import ErrorResult, Result, decode_result

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Handled:
    """What handling one result did (for the caller's log line and for tests)."""

    action: str  # counted | late | failed | rejected | unknown_job | left_pending
    job_status: str | None = None
    snapshot: Snapshot | None = None


def load_job(job_id: int) -> Job | None:
    return Job.select(Job, Pipeline).join(Pipeline).where(Job.id == job_id).get_or_none()


def count_outcomes(runtime, job: Job, outcomes: list[Outcome], locked: Job | None) -> tuple[
        Snapshot | None, progress.ProgressWrite]:
    """Redis gate then progress for outcomes saved in this transaction (steps 3 and 4 of invariant 1);
    `locked` is the job's row from `progress.locked_job`, taken before the gate.

    Returns (None, ...) for a job that has ended: a late result changes no counter.
    """
    if locked is None or locked.status in JobStatus.TERMINAL:
        return None, progress.ProgressWrite(locked.status if locked else JobStatus.REVOKED, False)
    state = runtime.state
    try:
        snapshot = state.record(job.id, outcomes)
    except StateMissing:
        # Redis lost this running job's state: rebuild it from the database (which, in this transaction,
        # already holds this result), then count again; an image the rebuild saw as settled is not counted
        # twice. The job cannot end meanwhile: its row is locked.
        if jobs.rebuild_state(state, job.id):
            log.warning("job=%s Redis state was missing; rebuilt from the database", job.id)
        snapshot = state.record(job.id, outcomes)
    crash_point("after_redis_update", job=job.id)
    _count_metrics(job, outcomes, snapshot)
    written = progress.write_progress(job.id, snapshot, threshold=runtime.settings.failure_threshold, locked=locked)
    crash_point("after_progress", job=job.id)
    return snapshot, written


def _count_metrics(job: Job, outcomes: list[Outcome], snapshot: Snapshot) -> None:
    newly = set(snapshot.newly_removed)
    images = metrics().images
    for outcome in outcomes:
        if outcome.image_id in newly:
            images.labels(job.pipeline.slug, "failed" if outcome.failed else "processed").inc()


def settle(runtime, job: Job, save: Callable[[], list[Outcome]]) -> tuple[
        list[Outcome], Snapshot | None, progress.ProgressWrite]:
    """`save()` the outcomes, count them and write progress in one database transaction (steps 2-4)."""
    with write_transaction():
        outcomes = save()
        if not outcomes:
            return [], None, progress.ProgressWrite(job.status, False)
        crash_point("after_db_save", job=job.id)
        snapshot, written = count_outcomes(runtime, job, outcomes, progress.locked_job(job.id))
    crash_point("after_commit", job=job.id)
    return outcomes, snapshot, written


def apply_result(runtime, job: Job, result: Result) -> tuple[Snapshot | None, progress.ProgressWrite, list[Outcome]]:
    """Save then count one decoded result; raises BadResult for data that can never be saved."""
    if isinstance(result, ErrorResult):
        def save():
            failed = fail_images(job.id, [result.image_id], f"processing service error: {result.error}")
            if not failed:
                raise BadResult(f"error result names image {result.image_id!r}, which is not part of job {job.id}")
            return failed
    else:
        save = prepare_result(job, result).save  # rows built before the transaction: it holds only statements
    outcomes, snapshot, written = settle(runtime, job, save)
    return snapshot, written, outcomes


def finish(runtime, job: Job, written: progress.ProgressWrite) -> None:
    """After the terminal transition: log it (if this call made it) and clean up the job's resources.

    Cleanup is idempotent; it also runs when a redelivered result finds its job ended but not yet
    cleaned up (the process that ended the job died before its cleanup).
    """
    if written.finished_now:
        job_log(job.id, logging.INFO, f"job finished {written.status}")
    ended = written.finished_now or (job.status in JobStatus.TERMINAL and job.cleaned_up_at is None)
    if ended and job.dispatch_mode == "async_api":
        jobs.cleanup(runtime, job.id, job.pipeline.slug)


def fail_bad_result(runtime, job: Job, exc: BadResult, replies: list[str]) -> Handled:
    """Invariant 10: fail each affected image with the reason and TERM its task; other images go on."""
    image_ids = list(exc.image_ids)
    if not image_ids:
        image_ids = runtime.tasks.images_of_tasks(replies)
    reason = f"bad result: {exc}"
    for image_id in image_ids or [None]:
        job_log(job.id, logging.ERROR, reason, image_id=image_id)
    written = progress.ProgressWrite(job.status, False)
    snapshot = None
    if image_ids:
        _, snapshot, written = settle(runtime, job, lambda: fail_images(job.id, image_ids, reason))
    if replies:
        runtime.tasks.term_many(replies, f"image={','.join(image_ids) or '?'} {reason}"[:300])
    finish(runtime, job, written)
    return Handled("failed" if image_ids else "left_pending", written.status, snapshot)


def _image_ids(body: bytes) -> list[str]:
    """The image ids a result names, for log lines (empty if it cannot be decoded)."""
    try:
        result = decode_result(body)
    except BadResult:
        return []
    if isinstance(result, ErrorResult):
        return [result.image_id] if result.image_id else []
    return [image.id for image in result.source_images]


def handle_result_message(runtime, job_id: int, body: bytes, reply: str | None) -> Handled:
    """Handle one result message from `pipeline.results.<job_id>`; `reply` is its `Pipeline-Task-Reply`
    header (one task's reply subject, or several).

    Raises TransientError (logged here with job and image ids) when Redis or NATS is unreachable; the
    tasks are then not ACKed and the caller retries.
    """
    try:
        return _handle(runtime, job_id, body, names.task_replies(reply))
    except TransientError as exc:
        log.warning("job=%s image=%s transient error, task not ACKed, will retry: %s", job_id,
                    ",".join(_image_ids(body)) or "?", exc)
        raise


def _handle(runtime, job_id: int, body: bytes, replies: list[str]) -> Handled:
    job = load_job(job_id)
    if job is None:
        log.error("job=%s result for an unknown job; its task is terminated", job_id)
        own = [r for r in replies if names.reply_belongs_to_job(r, job_id)]
        if own:
            runtime.tasks.term_many(own, f"unknown job {job_id}")
        return Handled("unknown_job")
    foreign = [r for r in replies if not names.reply_belongs_to_job(r, job_id)]
    if foreign:
        # Never ACK someone else's task: the result is dropped, the images' own tasks will be redelivered.
        job_log(job_id, logging.ERROR, f"result rejected: {names.HDR_TASK_REPLY} {foreign[0]!r} is not a task of "
                                       f"consumer {names.job_consumer(job_id)}")
        return Handled("rejected", job.status)
    try:
        result = decode_result(body)
        crash_point("after_validation", job=job_id)
        if isinstance(result, ErrorResult) and result.image_id is None:
            job_log(job_id, logging.WARNING, f"error result without image_id ({result.error!r}); "
                                             "not ACKed: the task will be redelivered, then reconciled")
            return Handled("left_pending", job.status)
        snapshot, written, outcomes = apply_result(runtime, job, result)
    except BadResult as exc:
        return fail_bad_result(runtime, job, exc, replies)
    if isinstance(result, ErrorResult):
        job_log(job_id, logging.WARNING, f"image failed: {result.error}", image_id=result.image_id)
    crash_point("before_ack", job=job_id)
    if replies:
        runtime.tasks.ack_many(replies)
    crash_point("after_ack", job=job_id)
    finish(runtime, job, written)
    if snapshot is None:
        log.info("job=%s late result for a %s job saved (images %s); counters unchanged", job_id, job.status,
                 ",".join(o.image_id for o in outcomes))
        return Handled("late", written.status, None)
    return Handled("counted", written.status, snapshot)
