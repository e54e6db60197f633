"""Results that cannot be saved (invariant 13: every job ends).

A result message in the inbox whose saving raises an error that is not an outage (a bug in jetpipe, data
its code cannot handle) is tried `PIPELINE_RESULT_SAVE_ATTEMPTS` times in all, `PIPELINE_RESULT_SAVE_BACKOFF`
seconds apart, doubled each time; meanwhile the job's other messages are saved. After the last attempt the
message is *parked*: its images are failed with `result could not be saved: <error>` through the same gate
as every other outcome, the message moves to the `ParkedResult` table, and the job goes on to the terminal
state its threshold decides. An outage (the database, Redis or NATS unreachable) is never an attempt: the
actor's retries and the inbox sweep wait it out, however long it lasts.

A parked message is kept for inspection (`cli.py parked list`, `GET /api/v1/parked`) and can be replayed
once the bug is fixed (`cli.py parked replay`): it goes back into the inbox and, while its job runs, a
valid result supersedes the failure its parking caused. A job that has ended keeps its outcomes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from typing import Any

import peewee

from models import (
    Job,
    JobStatus,
    ParkedResult,
    ResultInbox,
    insert_ignoring_duplicates,
    tuples,
    utcnow,
    write_transaction,
)
from pipeline import names
from pipeline.core import inbox
from pipeline.core.joblog import job_log
from pipeline.core.outcomes import Action, finish, ids_text, load_job, settle, short
from pipeline.core.result_rows import UNSAVED_PREFIX, canonical_image_id, fail_images
from pipeline.errors import NotFound, UserInputError
from pipeline.infra.metrics import metrics
from pipeline.infra.runtime import Runtime

log = logging.getLogger(__name__)


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return short(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def images_of(runtime: Runtime, body: bytes, replies: list[str], proof: str | None = None) -> list[str]:
    """The images a message decides: those its body names, else those of the tasks it names; of a message
    taken with task tokens (`proof`, the inbox row's), only images it proved it holds."""
    proven = inbox.Proof.from_json(proof)
    named = sorted(inbox.named_images(body), key=int)
    if not named and replies:
        named = list(dict.fromkeys(c for c in map(canonical_image_id, runtime.tasks.images_of_tasks(replies)) if c))
    return named if proven is None else [i for i in named if i in proven.images]


def failed_attempt(runtime: Runtime, job_id: int, entry_id: int, exc: BaseException) -> Action:
    """Record that saving inbox row `entry_id` raised `exc` (not an outage): it waits for its next attempt,
    or, after its last, is parked and its images failed. Returns what became of the message: RETRY_LATER,
    PARKED, or GONE if the row is gone (saved meanwhile)."""
    settings = runtime.settings
    error = _error_text(exc)
    with write_transaction():
        row = ResultInbox.select().where(ResultInbox.id == entry_id).get_or_none()
        if row is None:
            return Action.GONE
        attempts = (row.attempts or 0) + 1
        if attempts < settings.result_save_attempts:
            delay = settings.result_save_backoff * 2 ** (attempts - 1)
            ResultInbox.update(attempts=attempts, last_error=error,
                               next_attempt_at=utcnow() + dt.timedelta(seconds=delay)).where(
                ResultInbox.id == entry_id).execute()
    if attempts < settings.result_save_attempts:
        metrics().result_save_failures.labels("retry").inc()
        image_ids = sorted(inbox.named_images(bytes(row.body)), key=int)
        job_log(job_id, logging.WARNING, f"result message could not be saved (attempt {attempts} of "
                                         f"{settings.result_save_attempts}; next in {delay:g} s): {error}",
                image_id=ids_text(image_ids) or None, persist=load_job(job_id) is not None)
        return Action.RETRY_LATER
    _park(runtime, job_id, row, attempts, error)
    metrics().result_save_failures.labels("parked").inc()
    return Action.PARKED


def _park(runtime: Runtime, job_id: int, row: ResultInbox, attempts: int, error: str) -> None:
    replies = names.task_replies(row.task_replies)
    image_ids = images_of(runtime, bytes(row.body), replies, row.proof)
    reason = f"{UNSAVED_PREFIX} {error}"
    job = load_job(job_id)
    written = None
    with write_transaction():  # the images' verdict and the move out of the inbox commit together
        if job is not None and image_ids:
            _, _, written = settle(runtime, job, lambda: fail_images(job_id, image_ids, reason))
        parked_id = ParkedResult.insert(
            job_id=job_id, source=row.source, stream_seq=row.stream_seq, body=row.body,
            task_replies=row.task_replies, received_at=row.received_at, attempts=attempts, error=error,
            image_ids=",".join(image_ids), proof=row.proof).execute()
        ResultInbox.delete().where(ResultInbox.id == row.id).execute()
    message = (f"result message could not be saved after {attempts} attempt(s): {error}; its "
               f"{len(image_ids)} image(s) failed; kept as parked result {parked_id} "
               f"(`cli.py parked list --job {job_id}`, `cli.py parked replay {parked_id}`)")
    log.error("job=%s image=%s %s", job_id, ids_text(image_ids) or "?", message)
    if job is None:
        return
    job_log(job_id, logging.ERROR, message, image_id=ids_text(image_ids) or None, emit=False)
    open_replies = [r for r in replies if names.reply_belongs_to_job(r, job_id)]
    if open_replies:  # tasks it did not settle when taken: stop their redelivery, the images have a verdict
        try:
            runtime.tasks.term_many(open_replies, f"image={','.join(image_ids) or '?'} {reason}"[:300])
        except Exception as exc:  # noqa: BLE001 - best effort: a redelivered task's result is a replay
            log.warning("job=%s could not terminate the tasks of a parked result: %s", job_id, exc)
    if written is not None:
        finish(runtime, job, written)


# ---- operators' view: list, replay, drop ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Parked:
    """A parked result message, as `cli.py parked list` and the API show it."""

    id: int
    job_id: int
    image_ids: list[str]
    attempts: int
    error: str
    received_at: dt.datetime
    parked_at: dt.datetime
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "job_id": self.job_id, "image_ids": self.image_ids, "attempts": self.attempts,
                "error": self.error, "received_at": self.received_at.isoformat(timespec="seconds") + "Z",
                "parked_at": self.parked_at.isoformat(timespec="seconds") + "Z", "bytes": self.size}


def _parked(row: ParkedResult) -> Parked:
    return Parked(row.id, row.job_id, [i for i in row.image_ids.split(",") if i], row.attempts, row.error,
                  row.received_at, row.parked_at, len(bytes(row.body)))


def list_parked(*, job_id: int | None = None, limit: int = 1000) -> list[Parked]:
    """Parked result messages, oldest first (of one job, with `job_id`)."""
    query = ParkedResult.select().order_by(ParkedResult.id).limit(limit)
    if job_id is not None:
        query = query.where(ParkedResult.job_id == job_id)
    return [_parked(row) for row in query]


def parked_body(parked_id: int) -> bytes:
    """The message body of a parked result, as the processing service sent it."""
    row = ParkedResult.select(ParkedResult.body).where(ParkedResult.id == parked_id).get_or_none()
    if row is None:
        raise NotFound(f"no parked result {parked_id}")
    return bytes(row.body)


def parked_counts() -> dict[int, int]:
    """Parked result messages per job."""
    return dict(tuples(ParkedResult.select(ParkedResult.job_id, peewee.fn.COUNT(ParkedResult.id))
                       .group_by(ParkedResult.job_id)))


def _select(ids: list[int] | None, job_id: int | None, every: bool) -> list[ParkedResult]:
    if not ids and job_id is None and not every:
        raise UserInputError("name parked results by id, or give a job (--job N) or --all")
    query = ParkedResult.select().order_by(ParkedResult.id)
    if ids:
        query = query.where(ParkedResult.id.in_(ids))
    if job_id is not None:
        query = query.where(ParkedResult.job_id == job_id)
    rows = list(query)
    missing = sorted(set(ids or []) - {row.id for row in rows})
    if missing:
        raise NotFound(f"no parked result {', '.join(map(str, missing))}")
    return rows


def replay(runtime: Runtime, *, ids: list[int] | None = None, job_id: int | None = None,
           every: bool = False) -> tuple[list[int], list[int]]:
    """Put parked results back into the inbox for their jobs to save (with a fresh count of attempts) and
    ask for them to be saved; the ids replayed, and those left parked because their job ended. Named by id
    or job, results of a job that has ended are refused (UserInputError): its outcomes are final
    (`cli.py retry-failed` processes its failed images again)."""
    rows = _select(ids, job_id, every)
    statuses: dict[int, str] = dict(tuples(Job.select(Job.id, Job.status).where(
        Job.id.in_({r.job_id for r in rows} or {0}))))
    ended = sorted({r.job_id for r in rows if statuses.get(r.job_id, JobStatus.REVOKED) in JobStatus.TERMINAL})
    if ended and (ids or job_id is not None):
        raise UserInputError(f"job(s) {', '.join(map(str, ended))} ended: a replayed result would change nothing "
                             "(`cli.py retry-failed JOB` processes its failed images again; `cli.py parked drop` "
                             "discards the parked results)")
    skipped = [r.id for r in rows if r.job_id in ended]
    rows = [r for r in rows if r.job_id not in ended]
    if not rows:
        return [], skipped
    now = utcnow()
    with write_transaction():
        insert_ignoring_duplicates(ResultInbox, inbox.INBOX_FIELDS, [
            (r.job_id, r.source, r.stream_seq, bytes(r.body), r.task_replies, now, len(r.image_ids.split(",")),
             r.proof, *inbox.placement(inbox.named_images(bytes(r.body))), None) for r in rows])
        ParkedResult.delete().where(ParkedResult.id.in_([r.id for r in rows])).execute()
    for r in rows:
        job_log(r.job_id, logging.WARNING, f"parked result {r.id} replayed: back in the inbox to be saved",
                image_id=r.image_ids[:200] or None)
    for replayed_job in sorted({r.job_id for r in rows}):
        runtime.send(names.PROCESS_PIPELINE_RESULT, replayed_job)
    return [r.id for r in rows], skipped


def drop(*, ids: list[int] | None = None, job_id: int | None = None, every: bool = False) -> list[int]:
    """Delete parked results for good (their images stay failed); the ids dropped."""
    rows = _select(ids, job_id, every)
    with write_transaction():
        ParkedResult.delete().where(ParkedResult.id.in_([r.id for r in rows] or [0])).execute()
    for r in rows:
        job_log(r.job_id, logging.INFO, f"parked result {r.id} dropped by an operator",
                image_id=r.image_ids[:200] or None, persist=Job.select().where(Job.id == r.job_id).exists())
    return [r.id for r in rows]
