"""Counting outcomes: the shared steps 3 and 4 of invariant 1 (atomic Redis gate, progress, the terminal
transition and its cleanup) for every writer of image outcomes: saved results (`pipeline/core/saving.py`),
lost images (`pipeline/core/lost.py`), internal mode and the health check.

`settle(runtime, job, save)` runs `save()` and counts what it returns in one database transaction. Every
writer of one job takes its locks in one order (`saved_then_locked`: the image rows, then the job's row),
so writers of different images save at once without deadlock, and counting happens under the job's row
lock: whoever counts the last image sees every other counted image committed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from enum import StrEnum

from models import DispatchMode, Job, JobStatus, Pipeline, undoable_write
from pipeline.core import jobs, progress
from pipeline.core.joblog import job_log
from pipeline.core.result_rows import fail_images, prepare_result
from pipeline.errors import BadResult, StateMissing
from pipeline.infra.crashpoints import crash_point
from pipeline.infra.jobstate import Outcome, Snapshot
from pipeline.infra.metrics import metrics
from pipeline.infra.runtime import Runtime
from pipeline.schemas import ErrorResult, Result

log = logging.getLogger(__name__)

#: Longest reason text written to a log line or a job log row.
MAX_LOGGED_REASON = 500


class Action(StrEnum):
    """What became of one result message."""

    COUNTED = "counted"  # its images' outcomes were saved and counted
    LATE = "late"  # its job had ended: nothing saved or counted
    FAILED = "failed"  # bad data: the images it names failed, their tasks terminated
    REJECTED = "rejected"  # not its sender's to decide (another consumer's task, no proof): nothing touched
    UNKNOWN_JOB = "unknown_job"  # no such job: dropped, its tasks terminated
    LEFT_PENDING = "left_pending"  # decides no image: its tasks come back
    RETRY_LATER = "retry_later"  # saving it raised: it waits in the inbox for its next attempt
    PARKED = "parked"  # its last attempt failed: parked, its images failed
    GONE = "gone"  # saved meanwhile by another drainer


@dataclasses.dataclass(frozen=True)
class Handled:
    """What handling one result message did (for the caller's log line and for tests)."""

    action: Action
    job_status: str | None = None
    snapshot: Snapshot | None = None


def load_job(job_id: int) -> Job | None:
    return Job.select(Job, Pipeline).join(Pipeline).where(Job.id == job_id).get_or_none()


def count_outcomes(runtime: Runtime, job: Job, outcomes: list[Outcome], locked: Job | None) -> tuple[
        Snapshot | None, progress.ProgressWrite]:
    """Redis gate then progress for outcomes saved in this transaction (steps 3 and 4 of invariant 1);
    `locked` is the job's row from `progress.locked_job`, taken before the gate.

    Returns (None, ...) for a job that has ended: a late outcome changes no counter.
    """
    if locked is None or locked.status in JobStatus.TERMINAL:
        return None, progress.ProgressWrite(locked.status if locked else JobStatus.REVOKED, False)
    state = runtime.state
    try:
        snapshot = state.record(job.id, outcomes)
    except StateMissing:
        # Redis lost this running job's state: rebuild it from the database (which, in this transaction,
        # already holds these outcomes), then count again; an image the rebuild saw as settled is not
        # counted twice. The job cannot end meanwhile: its row is locked.
        if jobs.rebuild_state(state, job.id):
            log.warning("job=%s Redis state was missing; rebuilt from the database", job.id)
        snapshot = state.record(job.id, outcomes)
    crash_point("after_redis_update", job=job.id)
    _count_metrics(job, outcomes, snapshot)
    newly = set(snapshot.newly_removed)
    corrected = any(o.supersedes and o.image_id in newly for o in outcomes)
    written = progress.write_progress(job.id, snapshot, threshold=runtime.settings.failure_threshold, locked=locked,
                                      corrected=corrected)
    crash_point("after_progress", job=job.id)
    return snapshot, written


def _count_metrics(job: Job, outcomes: list[Outcome], snapshot: Snapshot) -> None:
    newly = set(snapshot.newly_removed)
    failures = Counter(o.failure or "other" for o in outcomes if o.failed and o.image_id in newly)
    failed = sum(failures.values())
    m = metrics()
    if failed:
        m.images.labels(job.pipeline.slug, "failed").inc(failed)
        for kind, count in failures.items():
            m.image_failures.labels(job.pipeline.slug, kind).inc(count)
    if len(newly) > failed:
        m.images.labels(job.pipeline.slug, "processed").inc(len(newly) - failed)


class JobEnded(Exception):
    """Raised inside `saved_then_locked`: the job ended before its row was locked (what was saved is undone)."""

    def __init__(self, status: str):
        super().__init__(f"job ended {status}")
        self.status = status


@contextlib.contextmanager
def saved_then_locked(job_id: int) -> Iterator[Callable[[], Job]]:
    """A write transaction (or, inside one, a savepoint) in the lock order of every writer of a job's
    outcomes: first the image rows (`job_images` locks them in primary key order) and whatever is saved
    with them, then, last, the job's row, with `lock()`. The image rows decide who saves an image first;
    the job's row orders counting and progress and is held only for those (a Redis round trip and one
    UPDATE), so several writers of one job save at once and queue only there.

    `lock()` raises JobEnded if the job has ended: the block's writes are then undone and JobEnded goes on
    to the caller.
    """

    locked_at: list[float] = []

    def lock() -> Job:
        locked = progress.locked_job(job_id)
        locked_at.append(time.perf_counter())
        if locked is None or locked.status in JobStatus.TERMINAL:
            raise JobEnded(locked.status if locked else JobStatus.REVOKED)
        return locked

    with undoable_write():
        yield lock
    if locked_at:
        metrics().job_row_lock.observe(time.perf_counter() - locked_at[0])


def settle(runtime: Runtime, job: Job, save: Callable[[], list[Outcome]]) -> tuple[
        list[Outcome], Snapshot | None, progress.ProgressWrite]:
    """`save()` the outcomes, count them and write progress in one database transaction (steps 2-4), in
    the lock order of `saved_then_locked`. A job that has ended is left as it is: nothing is saved or
    counted.
    """
    try:
        with saved_then_locked(job.id) as lock:
            outcomes = save()
            if not outcomes:
                return [], None, progress.ProgressWrite(job.status, False)
            crash_point("after_db_save", job=job.id)
            locked = lock()
            snapshot, written = count_outcomes(runtime, job, outcomes, locked)
    except JobEnded as ended:
        return [], None, progress.ProgressWrite(ended.status, False)
    crash_point("after_commit", job=job.id)
    return outcomes, snapshot, written


def apply_result(runtime: Runtime, job: Job,
                 result: Result) -> tuple[Snapshot | None, progress.ProgressWrite, list[Outcome]]:
    """Save then count one decoded result (internal mode); raises BadResult for data that can never be saved."""
    if isinstance(result, ErrorResult):
        def save() -> list[Outcome]:
            failed = fail_images(job.id, [result.image_id], f"processing service error: {result.error}")
            if not failed:
                raise BadResult(f"error result names image {result.image_id!r}, which is not part of job {job.id}")
            return failed
    else:
        save = prepare_result(job, result).save  # rows built before the transaction: it holds only statements
    outcomes, snapshot, written = settle(runtime, job, save)
    return snapshot, written, outcomes


def finish(runtime: Runtime, job: Job, written: progress.ProgressWrite) -> None:
    """After the terminal transition: log it (if this call made it) and clean up the job's resources.

    Cleanup is idempotent; it also runs when a later drain finds its job ended but not yet cleaned up
    (the process that ended the job died before its cleanup).
    """
    if written.finished_now:
        job_log(job.id, logging.INFO, f"job finished {written.status}")
    ended = written.finished_now or (written.status in JobStatus.TERMINAL and job.cleaned_up_at is None)
    if ended and job.dispatch_mode == DispatchMode.ASYNC_API:
        jobs.cleanup(runtime, job.id, job.pipeline.slug)


def fail_bad_result(runtime: Runtime, job: Job, exc: BadResult, replies: list[str] | None) -> Handled:
    """Invariant 10 for one result handled outside the inbox (internal mode): fail each affected image
    with the reason and TERM its task; other images go on."""
    image_ids = list(exc.image_ids)
    if not image_ids and replies:
        image_ids = runtime.tasks.images_of_tasks(replies)
    reason = f"bad result: {exc}"
    job_log(job.id, logging.ERROR, short(reason), image_id=ids_text(image_ids) or None)
    written = progress.ProgressWrite(job.status, False)
    snapshot = None
    if image_ids:
        _, snapshot, written = settle(runtime, job, lambda: fail_images(job.id, image_ids, reason))
    if replies:
        runtime.tasks.term_many(replies, f"image={','.join(image_ids) or '?'} {reason}"[:300])
    finish(runtime, job, written)
    return Handled(Action.FAILED if image_ids else Action.LEFT_PENDING, written.status, snapshot)


def short(text: str) -> str:
    """`text` cut to MAX_LOGGED_REASON characters for a log line, saying how long it was."""
    return text if len(text) <= MAX_LOGGED_REASON else text[:MAX_LOGGED_REASON] + f"... ({len(text)} chars)"


def ids_text(image_ids: Iterable[object]) -> str:
    """Image ids for a log line: the first ten, then how many more."""
    ids = [str(i) for i in image_ids]
    return ",".join(ids) if len(ids) <= 10 else ",".join(ids[:10]) + f",...(+{len(ids) - 10})"


