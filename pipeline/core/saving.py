"""Saving results: the inbox of a job drained into the database, many result messages per transaction.

A result message was taken into the inbox (`pipeline/core/inbox.py`) and the tasks it settles were ACKed. A
drain step then handles up to `DRAIN_MESSAGES` of the job's messages (at most `DRAIN_IMAGES` images) in
the order of invariant 1, as one unit:

    validate -> save to DB (idempotent) -> atomic Redis update -> progress written -> inbox rows deleted

in one database transaction: one commit and one gate script however many messages and images, so a
service that sends one image per message is saved nearly as fast as one that batches. Deleting the rows
in the transaction that saves them makes the hand-over exactly-once: a crash anywhere before the commit
leaves the rows, and the next drain converges to the same rows and counters (the save is idempotent, the
gate counts an image once, progress is monotone). A crash between the gate and the commit leaves Redis
ahead of the database until the rows are drained again; no job ends while its database still holds a
counted image as pending (`progress.write_progress`).

The first message that decides an image wins; later ones for it are replays and change nothing, except
that a valid result supersedes a "lost" verdict while the job runs. A job that has ended takes no more
results: they are refused with a log line, so the database never holds rows for an image it did not count.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from enum import StrEnum
from typing import NamedTuple

import peewee

from models import (
    Job,
    JobStatus,
    ResultInbox,
    SchemaMissing,
    execute_in,
    is_postgres,
    is_unstorable,
    select_in,
    tuples,
    utcnow,
    write_transaction,
)
from pipeline import names
from pipeline.core import inbox, progress, unsaved
from pipeline.core.joblog import job_log
from pipeline.core.outcomes import (
    Action,
    JobEnded,
    count_outcomes,
    finish,
    ids_text,
    load_job,
    saved_then_locked,
    settle,
    short,
)
from pipeline.core.result_rows import PreparedResult, canonical_image_id, fail_images, job_images, prepare_result
from pipeline.core.retry import is_outage
from pipeline.errors import BadResult, TransientError
from pipeline.infra import tracing
from pipeline.infra.crashpoints import crash_point
from pipeline.infra.jobstate import Outcome, Snapshot
from pipeline.infra.runtime import Runtime
from pipeline.schemas import ErrorResult, decode_result

log = logging.getLogger(__name__)


#: Result messages, and images, one drain step saves in one transaction.
DRAIN_MESSAGES = 500
DRAIN_IMAGES = 2000
#: Seconds one drain keeps going before it hands the rest to a new process_pipeline_result message.
DRAIN_BUDGET_S = 20.0
#: Lifetime (ms) of a job's drain lock; a drainer extends it at every step, so only a dead one loses it.
DRAIN_LOCK_MS = 6_000



class Kind(StrEnum):
    """What a result message is, once read."""

    UNREAD = "unread"
    SUCCESS = "success"  # detections for the images it names
    ERROR = "error"  # the processing service failed one image
    BAD = "bad"  # bad data: the images it names (or proves it holds) fail
    REJECTED = "rejected"  # not its sender's to decide: touches nothing
    LEFT_PENDING = "left_pending"  # decides no image (an error naming none): its tasks come back

    @property
    def decides(self) -> bool:
        return self in (Kind.SUCCESS, Kind.ERROR, Kind.BAD)


#: What a message of each kind becomes once its step commits (a BAD one naming no image: LEFT_PENDING).
ACTION_OF = {Kind.SUCCESS: Action.COUNTED, Kind.ERROR: Action.COUNTED, Kind.BAD: Action.FAILED,
             Kind.REJECTED: Action.REJECTED, Kind.LEFT_PENDING: Action.LEFT_PENDING}


@dataclasses.dataclass
class Message:
    """One inbox row of the job, read and classified before the transaction that saves it."""

    entry_id: int
    source: str
    replies: list[str]
    kind: Kind = Kind.UNREAD
    prepared: PreparedResult | None = None
    image_ids: tuple[str, ...] = ()
    reason: str = ""
    action: Action | None = None

    @property
    def decides(self) -> bool:
        return self.kind.decides


def _classify(runtime: Runtime, job: Job, entry_id: int, source: str, body: bytes, replies: list[str],
              proof: inbox.Proof | None) -> Message:
    m = Message(entry_id, source, replies)
    foreign = [r for r in replies if not names.reply_belongs_to_job(r, job.id)]
    if foreign:
        # Never ACK or TERM someone else's task: the result is dropped, the images' own tasks come back.
        m.kind, m.reason = Kind.REJECTED, (f"result rejected: {names.HDR_TASK_REPLY} {foreign[0][:200]!r} is not "
                                           f"a task of consumer {names.job_consumer(job.id)}")
        return m
    if proof is not None and proof.refused:  # its sender did not show it holds the tasks (invariant 12)
        m.kind, m.reason = Kind.REJECTED, proof.refused
        return m
    try:
        result = decode_result(body)
        crash_point("after_validation", job=job.id, images=lambda: inbox.named_images(body))
        if isinstance(result, ErrorResult):
            image_id = canonical_image_id(result.image_id) if result.image_id is not None else None
            if result.image_id is None:
                m.kind, m.reason = Kind.LEFT_PENDING, (f"error result without image_id ({short(result.error)!r}); "
                                                    "its task is not ACKed: it will be redelivered, then reconciled")
                return m
            if image_id is None:
                raise BadResult(f"error result names image id {result.image_id!r}, which is not a decimal number")
            m.kind, m.image_ids, m.reason = Kind.ERROR, (image_id,), f"processing service error: {result.error}"
            return m
        m.prepared = prepare_result(job, result)
        m.kind, m.image_ids = Kind.SUCCESS, m.prepared.image_ids
    except BadResult as exc:
        # the images it names if it names any, else those of the tasks it names (an unreadable body); with
        # task tokens, only images it proved it holds (a bad message must not fail someone else's image)
        m.kind, m.reason = Kind.BAD, f"bad result: {exc}"
        if proof is not None:
            named = [c for c in map(canonical_image_id, exc.image_ids) if c] or inbox.named_images(body)
            m.image_ids = tuple(i for i in dict.fromkeys(named) if i in proof.images) or tuple(
                sorted(proof.images, key=int))
            m.replies = [r for r, image in inbox.task_images(runtime, job.id, replies).items() if image in m.image_ids]
            return m
        m.image_ids = tuple(dict.fromkeys(c for c in map(canonical_image_id, exc.image_ids) if c)) or tuple(
            sorted(inbox.named_images(body), key=int)) or tuple(
            dict.fromkeys(c for c in map(canonical_image_id, runtime.tasks.images_of_tasks(replies)) if c))
    return m


@dataclasses.dataclass
class DrainStep:
    """What one drain step did."""

    messages: list[Message] = dataclasses.field(default_factory=list)
    snapshot: Snapshot | None = None
    written: progress.ProgressWrite | None = None
    #: It stopped at its limit of messages or images: more are likely waiting.
    full: bool = False
    #: It saved nothing: the lane's oldest result waits for an earlier one in another lane.
    blocked: bool = False


class InboxEntry(NamedTuple):
    """An inbox row as the drain reads it."""

    id: int
    source: str
    body: bytes
    replies: str  # its Pipeline-Task-Reply header
    proof: str | None  # JSON (pipeline/core/inbox.py)
    trace: str | None  # the `traceparent` of its take


_ENTRY_COLUMNS = (ResultInbox.id, ResultInbox.source, ResultInbox.body, ResultInbox.task_replies, ResultInbox.proof,
                  ResultInbox.trace_parent)
#: A job-log line to write: (level, message, image ids or None).
LogLine = tuple[int, str, str | None]


def _read_entry(entry_id: int) -> InboxEntry | None:
    for found_id, source, body, replies, proof, trace in tuples(
            ResultInbox.select(*_ENTRY_COLUMNS).where(ResultInbox.id == entry_id)):
        return InboxEntry(found_id, source, bytes(body), replies, proof, trace)
    return None


def _lane_of(lanes: int) -> peewee.ColumnBase:
    """An inbox row's lane in SQL: lane_key modulo `lanes` (written so both databases read it alike: peewee's
    `%` means LIKE)."""
    key = peewee.fn.COALESCE(ResultInbox.lane_key, 0)
    return key - key / lanes * lanes


def _due() -> peewee.Expression:
    return ResultInbox.next_attempt_at.is_null() | (ResultInbox.next_attempt_at <= utcnow())


def _read_inbox(job_id: int, limit: int, lane: int = 0, lanes: int = 1) -> tuple[
        list[InboxEntry], dict[int, tuple[int, int]]]:
    """The lane's oldest rows due now, and the range of image ids (first, last) of each that names any."""
    where = (ResultInbox.job_id == job_id) & _due()
    if lanes > 1:
        where &= _lane_of(lanes) == lane
    rows = (ResultInbox.select(*_ENTRY_COLUMNS, ResultInbox.first_image, ResultInbox.last_image)
            .where(where).order_by(ResultInbox.id).limit(limit))
    entries: list[InboxEntry] = []
    ranges: dict[int, tuple[int, int]] = {}
    for entry_id, source, body, replies, proof, trace, first, last in tuples(rows):
        entries.append(InboxEntry(entry_id, source, bytes(body), replies, proof, trace))
        if first is not None:
            ranges[entry_id] = (first, last)
    return entries, ranges


def _not_waiting_for_other_lanes(job_id: int, entries: list[InboxEntry], ranges: dict[int, tuple[int, int]],
                                 lane: int, lanes: int) -> list[InboxEntry]:
    """The first of `entries` (one lane's, in order) up to the first that must wait: one that may name an
    image named by an earlier result still in the inbox in another lane (their ranges of image ids
    overlap). So the first result to arrive for an image decides it, whatever lane either is in."""
    if not ranges:
        return entries
    low, high = min(f for f, _ in ranges.values()), max(last for _, last in ranges.values())
    overlapping = tuples(ResultInbox.select(ResultInbox.id, ResultInbox.first_image, ResultInbox.last_image,
                                            ResultInbox.lane_key)
                         .where((ResultInbox.job_id == job_id) & (ResultInbox.id < entries[-1].id)
                                & (ResultInbox.first_image <= high) & (ResultInbox.last_image >= low)))
    earliest: dict[int, int] = {}  # image id -> the earliest other-lane row naming a range that holds it
    wide: list[tuple[int, int, int]] = []  # other-lane rows naming a range too wide to spell out
    for other, first, last, key in overlapping:
        if key % lanes == lane:
            continue
        if last - first > _SPELLED_OUT:
            wide.append((other, first, last))
            continue
        for image in range(first, last + 1):
            if earliest.get(image, other) >= other:
                earliest[image] = other
    for n, (entry_id, *_) in enumerate(entries):
        if entry_id not in ranges:
            continue  # names no image: waits for nothing
        first, last = ranges[entry_id]
        if last - first > _SPELLED_OUT:
            narrow = any(other < entry_id and first <= image <= last for image, other in earliest.items())
        else:
            narrow = any(earliest.get(image, entry_id) < entry_id for image in range(first, last + 1))
        if narrow or any(other < entry_id and o_first <= last and o_last >= first for other, o_first, o_last in wide):
            return entries[:n]
    return entries


#: Ranges of image ids up to this wide are checked image by image (one dictionary lookup each).
_SPELLED_OUT = 512


def _lanes_due(job_id: int, lanes: int) -> list[int]:
    """The lanes of the job holding inbox rows due now, in order."""
    if lanes == 1:
        return [0]
    lane = _lane_of(lanes)
    return sorted(int(n) for (n,) in tuples(ResultInbox.select(lane).where(
        (ResultInbox.job_id == job_id) & _due()).group_by(lane)))


def _delete_entries(entry_ids: list[int]) -> None:
    execute_in('DELETE FROM "result_inbox" WHERE id IN ({in})', entry_ids)


def _present(entry_ids: list[int]) -> set[int]:
    """Those of `entry_ids` still in the inbox (inside the transaction: not saved by another drainer)."""
    return {i for (i,) in select_in('SELECT id FROM "result_inbox" WHERE id IN ({in})', entry_ids)}


class StepFailed(Exception):
    """Saving these inbox rows raised an error that is not an outage (the error is the cause)."""

    def __init__(self, entry_ids: list[int], cause: Exception):
        super().__init__(f"saving inbox row(s) {entry_ids[:10]} raised {type(cause).__name__}: {cause}")
        self.entry_ids = entry_ids
        self.cause = cause


def drain_step(runtime: Runtime, job_id: int, *, limit: int = DRAIN_MESSAGES, lane: int = 0,
               lanes: int = 1) -> DrainStep:
    """Save the oldest inbox rows of the job's `lane` (of `lanes`) due now (up to `limit` messages,
    DRAIN_IMAGES images) in one transaction; an empty step when that lane holds nothing due.

    Raises StepFailed for an error that is not an outage before the commit (nothing of the step is saved);
    an outage is raised as it is.
    """
    read, ranges = _read_inbox(job_id, limit, lane, lanes)
    entries = _not_waiting_for_other_lanes(job_id, read, ranges, lane, lanes) if lanes > 1 else read
    if not entries:
        return DrainStep(blocked=bool(read))
    try:
        step = _drain_entries(runtime, job_id, entries)
        step.full = len(read) == limit or len(step.messages) < len(read)
        return step
    except StepFailed:
        raise
    except Exception as exc:
        if is_outage(exc) or isinstance(exc, SchemaMissing):  # not this message's fault: waited out
            raise
        raise StepFailed([e.id for e in entries], exc) from exc


def _drain_entries(runtime: Runtime, job_id: int, entries: list[InboxEntry]) -> DrainStep:
    job = load_job(job_id)
    if job is None:
        return _drop_for_unknown_job(runtime, job_id, entries)
    # the child of its first message's take (else of the job's root), linked to the others' takes
    with tracing.span("jetpipe.save", parent=entries[0].trace or job.trace_parent,
                      links=[e.trace for e in entries[1:]], attributes={"jetpipe.job_id": job_id}) as span:
        step = _save_entries(runtime, job, entries)
        span.set_attributes({"jetpipe.messages": len(step.messages),
                             "jetpipe.images": sum(len(m.image_ids) for m in step.messages)})
        return step


def _save_entries(runtime: Runtime, job: Job, entries: list[InboxEntry]) -> DrainStep:
    step = DrainStep()
    job_id = job.id
    images = 0
    for entry_id, source, body, replies, proof, _ in entries:
        m = _classify(runtime, job, entry_id, source, body, names.task_replies(replies), inbox.Proof.from_json(proof))
        if step.messages and images + len(m.image_ids) > DRAIN_IMAGES:
            break
        images += len(m.image_ids)
        step.messages.append(m)
    logs: list[tuple[int, str, str | None]] = []
    try:
        if job.status in JobStatus.TERMINAL:
            raise JobEnded(job.status)
        with saved_then_locked(job_id) as lock:  # image rows first: other lanes save meanwhile
            present = _present([m.entry_id for m in step.messages])
            step.messages = [m for m in step.messages if m.entry_id in present]
            outcomes = _save(job, step.messages, logs)
            crash_point("after_db_save", job=job_id)
            _delete_entries([m.entry_id for m in step.messages])
            _write_logs(job_id, logs)
            locked = lock()
            if outcomes:
                step.snapshot, step.written = count_outcomes(runtime, job, outcomes, locked)
            else:
                step.written = progress.ProgressWrite(locked.status, False)
    except JobEnded as ended:  # nothing saved or counted
        logs.clear()
        step.snapshot = None
        with write_transaction():
            present = _present([m.entry_id for m in step.messages])
            step.messages = [m for m in step.messages if m.entry_id in present]
            _delete_entries([m.entry_id for m in step.messages])
        for m in step.messages:
            m.action = Action.LATE
        step.written = progress.ProgressWrite(ended.status, False)
    crash_point("after_commit", job=job_id)
    try:
        _after_commit(runtime, job, step, logs)
    except Exception as exc:  # committed: not an error of these messages (the cleanup's own retries apply)
        if is_outage(exc):
            raise
        log.exception("job=%s after saving %s result message(s): %s", job_id, len(step.messages), exc)
    return step


def _save(job: Job, messages: list[Message], logs: list[LogLine]) -> list[Outcome]:
    """Steps 2 of invariant 1 for a chunk of one job's messages, inside the caller's transaction; every
    decided image's outcome (each image once: the first message naming it decides it)."""
    rows = job_images(job.id, [i for m in messages if m.decides for i in m.image_ids])
    owner: dict[str, Message] = {}
    for m in messages:
        strays = [i for i in m.image_ids if i not in rows] if m.kind in (Kind.SUCCESS, Kind.ERROR) else []
        if strays:  # a result for images of another job, or of none: bad data, its tasks are terminated
            what = "error result names" if m.kind == Kind.ERROR else "images"
            m.kind, m.reason = Kind.BAD, f"bad result: {what} {strays[:10]} not part of job {job.id}"
            m.image_ids = tuple(i for i in m.image_ids if i in rows)
        if m.decides:
            for image_id in m.image_ids:
                owner.setdefault(image_id, m)
    outcomes: list[Outcome] = []
    successes = [m for m in messages if m.kind == Kind.SUCCESS]
    if successes:
        combined = PreparedResult.combine([m.prepared for m in successes if m.prepared is not None]).restricted_to(
            [i for i, m in owner.items() if m.kind == Kind.SUCCESS])
        if combined.image_ids:
            outcomes += combined.save(rows)
    for m in messages:
        owned = [i for i in m.image_ids if owner.get(i) is m]
        if m.kind in (Kind.ERROR, Kind.BAD) and owned:
            outcomes += fail_images(job.id, owned, m.reason, rows)
        m.action = ACTION_OF[m.kind] if m.kind != Kind.BAD or m.image_ids else Action.LEFT_PENDING
        if m.kind == Kind.ERROR:
            logs.append((logging.WARNING, f"image failed: {short(m.reason)}", m.image_ids[0]))
        elif m.kind == Kind.BAD:
            logs.append((logging.ERROR, short(m.reason), ids_text(m.image_ids) or None))
        elif m.kind == Kind.LEFT_PENDING:
            logs.append((logging.WARNING, m.reason, None))
    rejected = [m for m in messages if m.kind == Kind.REJECTED]
    if rejected:  # one line for all a step refuses: a flood of forged results must not flood the job log
        more = f" (and {len(rejected) - 1} more result message(s) refused in this batch)" if len(rejected) > 1 else ""
        logs.append((logging.ERROR, rejected[0].reason + more, None))
    return outcomes


def _write_logs(job_id: int, logs: list[tuple[int, str, str | None]]) -> None:
    for level, message, image_id in logs:
        job_log(job_id, level, message, image_id=image_id, emit=False)


def _after_commit(runtime: Runtime, job: Job, step: DrainStep, logs: list[LogLine]) -> None:
    """Log lines, TERMs of the tasks of bad results, and the cleanup of a job this step ended."""
    for level, message, image_id in logs:
        job_log(job.id, level, message, image_id=image_id, persist=False)
    late = [m for m in step.messages if m.action == Action.LATE]
    if late:
        log.info("job=%s %s result message(s) for a %s job refused (images %s): nothing saved or counted", job.id,
                 len(late), step.written.status if step.written else job.status,
                 ids_text(dict.fromkeys(i for m in late for i in m.image_ids)))
    for m in step.messages:
        if m.kind == Kind.BAD and m.replies:
            try:
                runtime.tasks.term_many(m.replies, f"image={','.join(m.image_ids) or '?'} {m.reason}"[:300])
            except TransientError as exc:  # its task comes back and its next result is handled again
                log.warning("job=%s could not terminate the tasks of a bad result: %s", job.id, exc)
    if step.written is not None:
        finish(runtime, job, step.written)


def _drop_for_unknown_job(runtime: Runtime, job_id: int, entries: list[InboxEntry]) -> DrainStep:
    step = DrainStep()
    own = [r for e in entries for r in names.task_replies(e.replies)
           if names.reply_belongs_to_job(r, job_id)]
    with write_transaction():
        _delete_entries([e.id for e in entries])
    log.error("job=%s %s result message(s) for an unknown job dropped; their tasks are terminated", job_id,
              len(entries))
    if own:
        runtime.tasks.term_many(own, f"unknown job {job_id}")
    step.messages = [Message(e.id, e.source, [], action=Action.UNKNOWN_JOB) for e in entries]
    return step


@dataclasses.dataclass
class Drained:
    """What one drain did: messages saved, whether it stopped with work left (`more`) or found every lane's
    drainer busy elsewhere (`busy`, those drainers will look at their lanes again)."""

    messages: int = 0
    more: bool = False
    busy: bool = False
    #: What became of each message it handled, by its source (`<stream>:<seq>`, as the inbox keeps it).
    actions: dict[str, Action] = dataclasses.field(default_factory=dict)
    #: It asked for another drainer to join in (a lane had more than a step's worth waiting).
    joined: bool = False
    #: It saved results while a lane was waiting for an earlier result in another lane: it goes through
    #: the lanes once more.
    unblocked: bool = False


def request_drains(runtime: Runtime, job_ids: Iterable[int]) -> None:
    """Ask for the results of these jobs waiting in the inbox to be saved (one `process_pipeline_result`
    message each; a request that finds nothing to save costs one query a lane)."""
    for job_id in job_ids:
        runtime.send(names.PROCESS_PIPELINE_RESULT, job_id)


def save_lanes(runtime: Runtime) -> int:
    """The lanes a job's results are saved in: `PIPELINE_SAVE_LANES` on PostgreSQL, 1 on SQLite, which takes
    one writer at a time (drainers of several lanes would only queue for its write lock, and on this
    project's benchmark cost twice the CPU per image doing so)."""
    return runtime.settings.save_lanes if is_postgres() else 1


def drain(runtime: Runtime, job_id: int, *, budget_s: float = DRAIN_BUDGET_S) -> Drained:
    """Save every result of the job waiting in the inbox, a step per transaction.

    A job's results are saved in `PIPELINE_SAVE_LANES` lanes (a result's lane: its `lane_key`), each with
    one drainer at a time (a Redis lock) that saves the lane's results in the order they arrived. A drain
    goes through the lanes holding results due now: it saves those it can lock, and marks those it finds
    busy to be looked at again by their drainer. When a lane holds more than one step's worth, it asks once
    for another drain (a `process_pipeline_result` message), which takes the next free lane: a big backlog
    is saved by as many threads and processes as there are lanes, a small one by one.
    """
    started = time.monotonic()
    drained = Drained()
    lanes = save_lanes(runtime)
    while True:
        due = _lanes_due(job_id, lanes)
        busy = 0
        drained.unblocked = False
        for lane in due:
            if not _drain_lane(runtime, job_id, lane, lanes, started, budget_s, drained):
                busy += 1
            if drained.more:
                return drained
        drained.busy = bool(due) and busy == len(due)
        if not drained.unblocked:
            break
    if not drained.messages and not drained.busy:
        _clean_up_if_ended(runtime, job_id)
    return drained


def _drain_lane(runtime: Runtime, job_id: int, lane: int, lanes: int, started: float, budget_s: float,
                drained: Drained) -> bool:
    """Save the lane's results, or, if another drainer holds the lane, ask it to look once more; False then."""
    state = runtime.state
    lock, again = names.drain_lock_key(job_id, lane), names.drain_again_key(job_id, lane)
    blocked = names.drain_blocked_key(job_id)
    while True:
        try:
            token = state.try_lock(lock, DRAIN_LOCK_MS)
        except Exception as exc:  # noqa: BLE001 - redis errors: the gate needs Redis too
            raise TransientError(f"redis unavailable for job {job_id}: {exc}") from exc
        if token is None:
            state.set_flag(again, DRAIN_LOCK_MS // 1000 * 4)
            return False
        try:
            singly = 0  # after a step failed on data the database refused: that many messages one at a time
            while True:
                state.take_flag(again)
                try:
                    limit = 1 if singly else DRAIN_MESSAGES
                    step = drain_step(runtime, job_id, limit=limit, lane=lane, lanes=lanes)
                    if step.blocked:  # its oldest result waits for an earlier one in another lane
                        state.set_flag(blocked, DRAIN_LOCK_MS // 1000 * 4)
                        step = drain_step(runtime, job_id, limit=limit, lane=lane, lanes=lanes)  # saved meanwhile?
                    singly = max(singly - 1, 0)
                except StepFailed as failed:
                    if len(failed.entry_ids) > 1:
                        singly = DRAIN_MESSAGES  # find the message at fault, one at a time
                        continue
                    [entry_id] = failed.entry_ids
                    if is_unstorable(failed.cause):
                        step = _refuse(runtime, job_id, entry_id, failed.cause)
                    else:  # a bug or data the code cannot handle: bounded attempts, then parked
                        became = unsaved.failed_attempt(runtime, job_id, entry_id, failed.cause)
                        step = DrainStep(messages=[Message(entry_id, "", [], action=became)])
                if step.blocked:
                    break  # whoever saves results of the job next has the lanes looked at again (the flag)
                drained.messages += len(step.messages)
                drained.actions.update((m.source, m.action) for m in step.messages if m.source and m.action)
                if not step.messages:
                    break
                if state.take_flag(blocked):  # a lane was waiting, maybe for what this step saved
                    drained.unblocked = True
                    request_drains(runtime, [job_id])
                if step.full and lanes > 1 and not drained.joined:  # a backlog: another drainer takes a lane
                    drained.joined = True
                    request_drains(runtime, [job_id])
                if time.monotonic() - started > budget_s:
                    drained.more = True
                    return True
                state.extend_lock(lock, token, DRAIN_LOCK_MS)
        finally:
            state.release(lock, token)
        if not state.take_flag(again):  # a request came while we held the lock: look once more
            return True


def _refuse(runtime: Runtime, job_id: int, entry_id: int, exc: Exception) -> DrainStep:
    """Inbox row `entry_id` holds a result the database refuses to store (a value longer than its column, a
    number out of range): fail the images it names with the reason, TERM its tasks, drop the row
    (invariant 10: never a retry loop for data that can never be saved, never a stalled job)."""
    found = _read_entry(entry_id)
    if found is None:
        return DrainStep()
    _, source, body, header, proof, _ = found
    replies = names.task_replies(header)
    reason = short(f"bad result: the database refused to store it ({type(exc).__name__}: {str(exc).strip()})")
    image_ids = unsaved.images_of(runtime, body, replies, proof)
    if proof is not None:  # TERM only the tasks of images it proved it holds
        replies = [r for r, image in inbox.task_images(runtime, job_id, replies).items() if image in image_ids]
    message = Message(entry_id, source, replies, kind=Kind.BAD, image_ids=tuple(image_ids), reason=reason,
                      action=Action.FAILED if image_ids else Action.LEFT_PENDING)
    job = load_job(job_id)
    step = DrainStep(messages=[message])

    with write_transaction():  # the row goes whether or not the job still runs
        if job is not None and image_ids:
            _, step.snapshot, step.written = settle(runtime, job, lambda: fail_images(job_id, image_ids, reason))
        _delete_entries([entry_id])
    log.error("job=%s image=%s %s", job_id, ids_text(image_ids) or "?", reason)
    if job is not None:
        job_log(job_id, logging.ERROR, reason, image_id=ids_text(image_ids) or None, emit=False)
        _after_commit(runtime, job, step, [])
    return step


def _clean_up_if_ended(runtime: Runtime, job_id: int) -> None:
    """Finish the cleanup of a job that ended in a drain whose process died right after its commit."""
    job = load_job(job_id)
    if job is not None and job.status in JobStatus.TERMINAL and job.cleaned_up_at is None:
        finish(runtime, job, progress.ProgressWrite(job.status, False))
