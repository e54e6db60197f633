"""Progress rules: monotone stages and counters, the strict failure threshold, one terminal transition.

Invariants (docs/processing-lifecycle.md):
  4. progress never goes backwards (max() per stage and per counter); a stage with FAILURE keeps it;
  5. exactly one terminal transition, by a guarded UPDATE; nothing resurrects a terminal job;
  6. a job ends FAILURE iff failed/total > threshold (strict), once every image is processed or failed.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import logging
from collections.abc import Iterable
from typing import Any

from models import ImageStatus, Job, JobImage, JobStatus, for_update, utcnow, write_transaction
from pipeline.core import webhooks
from pipeline.core.joblog import job_log
from pipeline.infra.jobstate import Snapshot
from pipeline.settings import get_settings

log = logging.getLogger(__name__)

STAGES = ("collect", "process", "results")
#: At most this many ids are spelled out in one `progress.errors` entry.
ERROR_IDS_SHOWN = 10
#: At most this many entries are kept in `progress.errors` (the oldest are dropped first).
ERRORS_KEPT = 50


def initial_progress(total: int = 0) -> dict[str, Any]:
    return {
        "summary": {"status": JobStatus.CREATED, "progress": 0.0},
        "stages": {
            "collect": {"status": JobStatus.CREATED, "progress": 0.0, "total": total},
            "process": {"status": JobStatus.CREATED, "progress": 0.0, "processed": 0, "remaining": total,
                        "failed": 0},
            "results": {"status": JobStatus.CREATED, "progress": 0.0, "captures": 0, "detections": 0,
                        "classifications": 0},
        },
        "errors": [],
    }


def failed_for_good(failed: int, total: int, threshold: float) -> bool:
    """True iff failed/total is strictly above the threshold (5 of 10 at 0.5 is not a failure)."""
    return total > 0 and failed / total > threshold


def final_status(snapshot: Snapshot, threshold: float) -> str:
    return JobStatus.FAILURE if failed_for_good(snapshot.failed, snapshot.total, threshold) else JobStatus.SUCCESS


def merge(progress: dict[str, Any], snapshot: Snapshot, *, threshold: float, job_id: int,
          corrected: bool = False) -> dict[str, Any]:
    """`progress` advanced by `snapshot` without ever going backwards; returns a new dict.

    `corrected`: the snapshot turned images failed as lost into processed ones (their results came after
    all). The failed counter then takes the snapshot's exact value, which is lower, and a stage that was
    doomed only by those verdicts is no longer held at FAILURE.
    """
    merged = copy.deepcopy(progress) if progress else initial_progress(snapshot.total)
    stages = merged.setdefault("stages", initial_progress(snapshot.total)["stages"])
    total = max(snapshot.total, stages["collect"].get("total", 0))
    fraction = 1.0 if total == 0 else snapshot.processed / total
    doomed = failed_for_good(snapshot.failed, total, threshold)
    complete_status = JobStatus.FAILURE if doomed else JobStatus.SUCCESS

    process = stages["process"]
    process["processed"] = max(process.get("processed", 0), snapshot.processed)
    process["failed"] = snapshot.failed if corrected else max(process.get("failed", 0), snapshot.failed)
    process["remaining"] = max(total - process["processed"], 0)
    results = stages["results"]
    for counter in ("captures", "detections", "classifications"):
        results[counter] = max(results.get(counter, 0), getattr(snapshot, counter))

    for name in ("process", "results"):
        stage = stages[name]
        before = stage.get("progress", 0.0)
        stage["progress"] = max(before, fraction)
        if stage["progress"] >= 1.0 and fraction < 1.0 and before >= 1.0:
            job_log(job_id, logging.WARNING, f"stage {name!r} progress lifted to 100% by max() guard: this worker "
                                             f"computed {fraction * 100:.1f}%, the database had {before * 100:.1f}%")
        if stage.get("status") == JobStatus.FAILURE and not corrected:
            continue  # sticky: a stage that failed keeps FAILURE
        if stage["progress"] >= 1.0:
            stage["status"] = complete_status
        else:
            stage["status"] = JobStatus.FAILURE if doomed else JobStatus.STARTED
    merged["summary"]["progress"] = round(sum(stages[s]["progress"] for s in STAGES) / len(STAGES), 4)
    return merged


def format_ids(ids: Iterable[object]) -> str:
    """`[first 10 ids, sorted] ... and N more`: how a list of image ids appears in `progress.errors`."""
    ordered = sorted(ids, key=lambda i: (len(str(i)), str(i)))
    shown = [str(i) for i in ordered[:ERROR_IDS_SHOWN]]
    text = "[" + ", ".join(repr(i) for i in shown) + "]"
    if len(ordered) > ERROR_IDS_SHOWN:
        text += f" ... and {len(ordered) - ERROR_IDS_SHOWN} more"
    return text


def add_error(progress: dict[str, Any], message: str) -> None:
    errors = progress.setdefault("errors", [])
    errors.append(message)
    del errors[:-ERRORS_KEPT]


def append_error(job_id: int, message: str) -> None:
    """Add an entry to the job's `progress.errors` under a row lock (never clobbers a concurrent write)."""
    with write_transaction():
        job = for_update(Job.select(Job.id, Job.progress).where(Job.id == job_id)).get_or_none()
        if job is None:
            return
        p = job.progress or initial_progress()
        add_error(p, message)
        Job.update(progress=p).where(Job.id == job_id).execute()


def mark_collected(job: Job) -> None:
    """Collect stage done: a job's images are its JobImage rows, counted when the job was created."""
    stage = job.progress.get("stages", {}).get("collect", {})
    if stage.get("status") == JobStatus.SUCCESS:
        return
    p = job.progress or initial_progress(job.total_images)
    p["stages"]["collect"].update(status=JobStatus.SUCCESS, progress=1.0, total=job.total_images)
    p["summary"]["status"] = JobStatus.STARTED
    Job.update(progress=p, updated_at=utcnow()).where(
        (Job.id == job.id) & (Job.status.in_(JobStatus.RUNNING))).execute()


@dataclasses.dataclass(frozen=True)
class ProgressWrite:
    """What `write_progress` did: the job's status after it, whether this call ended the job, and how many
    images Redis counted that the database still holds as pending (the job was then not ended)."""

    status: str
    finished_now: bool
    unsaved: int = 0


def locked_job(job_id: int) -> Job | None:
    """The job's row (status and progress), locked until the transaction ends (PostgreSQL; on SQLite the
    write lock already serialises whole transactions).

    Taken before a result is counted in Redis, it puts the counts and commits of one job's results in one
    order: whoever counts the last image sees every other counted image committed.
    """
    return for_update(Job.select(Job.id, Job.status, Job.progress).where(Job.id == job_id)).get_or_none()


def pending_in_database(job_id: int) -> int:
    return JobImage.select().where((JobImage.job == job_id) & (JobImage.status == ImageStatus.PENDING)).count()


#: Progress over time, kept in the job's progress for its chart: a sample at most every SAMPLE_S, thinned to
#: half when MAX_SAMPLES are kept (a long job's curve keeps its shape at a coarser step).
SAMPLE_S = 5.0
MAX_SAMPLES = 120


def record_sample(progress: dict[str, Any], now: dt.datetime, *, last: bool = False) -> None:
    """Add `[unix seconds, settled, failed]` to the progress's samples when SAMPLE_S have passed since the last
    one, or when the job ends (`last`)."""
    process = progress.get("stages", {}).get("process", {})
    samples: list[list[float]] = progress.setdefault("samples", [])
    at = round(now.replace(tzinfo=dt.UTC).timestamp(), 1)
    if samples and not last and at - samples[-1][0] < SAMPLE_S:
        return
    samples.append([at, process.get("processed", 0), process.get("failed", 0)])
    if len(samples) > MAX_SAMPLES:
        samples[:] = samples[:-1:2] + samples[-1:]


def write_progress(job_id: int, snapshot: Snapshot, *, threshold: float, locked: Job | None = None,
                   corrected: bool = False) -> ProgressWrite:
    """Merge `snapshot` into the job's progress under a row lock; end the job if every image is counted.

    `locked`: the job's row as `locked_job` gave it in the caller's transaction (else it is read here).
    A terminal job is left untouched (a late result changes no counter or status).
    """
    now = utcnow()
    with write_transaction():
        job = locked or locked_job(job_id)
        if job is None or job.status in JobStatus.TERMINAL:
            return ProgressWrite(job.status if job else JobStatus.REVOKED, False)
        failed_before = (job.progress or {}).get("stages", {}).get("process", {}).get("failed", 0)
        progress = merge(job.progress, snapshot, threshold=threshold, job_id=job_id, corrected=corrected)
        changes = {Job.progress: progress, Job.updated_at: now, Job.last_progress_at: now}
        final = final_status(snapshot, threshold) if snapshot.complete else None
        # its failures just passed the threshold: it will end FAILURE (told with this write, or not at all)
        doomed = failed_for_good(snapshot.failed, snapshot.total, threshold) \
            and not failed_for_good(failed_before, snapshot.total, threshold)
        record_sample(progress, now, last=final is not None)
        # Redis counts a result inside the transaction that saves it, so after a crash before that commit
        # Redis is ahead until the result is handled again: never end a job the database does not agree on.
        unsaved = pending_in_database(job_id) if final is not None else 0
        if unsaved:
            log.warning("job=%s every image is counted in Redis but %s are pending in the database (a result "
                        "counted and not committed); the job ends when they are saved", job_id, unsaved)
        if final is None or unsaved or job.status == JobStatus.CANCELING:
            progress["summary"]["status"] = job.status
            Job.update(changes).where(Job.id == job_id).execute()
            if doomed:
                webhooks.enqueue(job_id, webhooks.JOB_FAILING, get_settings())
            return ProgressWrite(job.status, False, unsaved)
        progress["summary"]["status"] = final
        changes.update({Job.status: final, Job.finished_at: now})
        if final == JobStatus.FAILURE:
            changes[Job.error] = (f"{snapshot.failed} of {snapshot.total} images failed "
                                  f"(threshold {threshold:.0%})")
        done = Job.update(changes).where(
            (Job.id == job_id) & (Job.status.in_(JobStatus.RUNNING))).execute()
        if done:  # with the transition, or not at all
            if doomed:  # its last images passed the threshold: endpoints told of `failing` hear it too
                webhooks.enqueue(job_id, webhooks.JOB_FAILING, get_settings())
            webhooks.enqueue(job_id, webhooks.JOB_ENDED, get_settings())
    if done:
        log.info("job=%s finished %s: processed=%s failed=%s detections=%s", job_id, final,
                 snapshot.processed, snapshot.failed, snapshot.detections)
    return ProgressWrite(final if done else JobStatus.REVOKED, bool(done))


def transition(job_id: int, to_status: str, *, allowed_from: Iterable[str] = JobStatus.RUNNING,
               error: str | None = None, summary_status: bool = True) -> bool:
    """Guarded status change: `UPDATE ... WHERE id=? AND status IN (allowed_from)`; True if it happened."""
    now = utcnow()
    with write_transaction():
        job = for_update(Job.select(Job.id, Job.status, Job.progress).where(Job.id == job_id)).get_or_none()
        if job is None or job.status not in allowed_from:
            return False
        changes = {Job.status: to_status, Job.updated_at: now}
        if summary_status:
            progress = job.progress or initial_progress()
            progress.setdefault("summary", {})["status"] = to_status
            if to_status in (JobStatus.REVOKED, JobStatus.FAILURE):  # stages still under way end with the job
                for stage in progress.get("stages", {}).values():
                    if stage.get("status") not in JobStatus.TERMINAL:
                        stage["status"] = to_status
            changes[Job.progress] = progress
        if to_status in JobStatus.TERMINAL:
            changes[Job.finished_at] = now
        if to_status == JobStatus.STARTED:
            changes[Job.started_at] = now
        if error is not None:
            changes[Job.error] = error
        done = Job.update(changes).where(
            (Job.id == job_id) & (Job.status.in_(tuple(allowed_from)))).execute()
        if done and to_status in JobStatus.TERMINAL:
            webhooks.enqueue(job_id, webhooks.JOB_ENDED, get_settings())  # with the transition, or not at all
        elif done and to_status == JobStatus.STARTED:
            webhooks.enqueue(job_id, webhooks.JOB_STARTED, get_settings())
    return bool(done)
