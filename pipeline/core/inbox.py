"""The results inbox: where a processing service's result is held, durably, between the results stream
and the transaction that saves it (invariant 11: a result in hand decides its image).

Taking a batch of result messages (the bridge, for every fetch):

1. check what each message proves (invariant 12): the task tokens in its `Pipeline-Task-Token` header
   must all be tokens of its job's tasks, and every image it decides must be one of theirs; otherwise it
   is refused as a whole (recorded with the reason, saved as nothing, its tasks left alone);
   then read which tasks it settles: a reply subject in `Pipeline-Task-Reply` counts only if it names
   the task of an image the message decides and proves (the stream sequence in the reply subject is the
   one the image's task was stored at);
2. commit the messages to the `ResultInbox` table (one transaction; a redelivered message is taken once);
3. ACK the tasks they settle: a task whose result is in the database is done, whatever the backlog of
   saving, so JetStream never redelivers it (no model run twice) nor gives up on it (no false "lost");
4. the caller then ACKs the result messages on the results stream.

A crash before 2 leaves the result messages un-acked: JetStream redelivers them to a bridge. A crash
after 2 leaves the rows: the drain (`pipeline/core/outcomes.py`) saves them, and a redelivered message finds
its row taken already. Memory stays bounded: the backlog waits on disk, in the stream or in this table.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import uuid
import zlib
from collections.abc import Iterable

import msgspec
import peewee
from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind

from models import ResultInbox, insert_ignoring_duplicates, tuples, utcnow, write_transaction
from pipeline import names
from pipeline.core import task_runs, task_tokens
from pipeline.core.result_rows import canonical_image_id
from pipeline.errors import TasksNotAcked, TransientError
from pipeline.infra import tracing
from pipeline.infra.crashpoints import crash_point
from pipeline.infra.runtime import Runtime
from pipeline.schemas import MAX_RESULT_OBJECT_BYTES

log = logging.getLogger(__name__)

#: Rows the inbox may hold before the bridge stops taking more (a backlog of ~50,000 result messages
#: waits in the database; beyond that it waits in the results stream, where JetStream holds it).
MAX_ROWS = 50_000
INBOX_FIELDS = ("job_id", "source", "stream_seq", "body", "task_replies", "received_at", "images", "proof",
                "lane_key", "first_image", "last_image", "trace_parent")


def placement(images: Iterable[str]) -> tuple[int | None, int | None, int | None]:
    """Where a result naming these images (canonical ids) is saved: its `lane_key` (a hash of the smallest
    id, so a job's results spread over the lanes and every result for one image alone shares a lane), and
    the smallest and largest id it names; (None, None, None) if it names none."""
    numeric = [int(i) for i in images if i.isdigit()]
    if not numeric:
        return None, None, None
    first = min(numeric)
    return zlib.crc32(str(first).encode()) & 0x7FFF_FFFF, first, max(numeric)


@dataclasses.dataclass(frozen=True)
class Incoming:
    """A result message as it arrived on `pipeline.results.<pipeline>.<job_id>`."""

    job_id: int
    body: bytes
    replies: tuple[str, ...]  # the task reply subjects its Pipeline-Task-Reply header names
    source: str  # what makes a redelivery of the same message recognisable
    stream_seq: int | None = None
    tokens: tuple[str, ...] = ()  # the task tokens its Pipeline-Task-Token header names
    pipeline: str | None = None  # the pipeline its subject names (None: `pipeline.results.<job_id>`, or direct)
    trace: str | None = None  # its `traceparent` header: the span of the service that made it
    #: Its Pipeline-Result-Object header: the body is a reference to the object holding the result
    result_object: str | None = None

    @classmethod
    def from_msg(cls, job_id: int, msg: Msg) -> Incoming:
        meta = msg.metadata
        seq = meta.sequence.stream
        headers = msg.headers or {}
        return cls(job_id, msg.data, tuple(names.task_replies(headers.get(names.HDR_TASK_REPLY))),
                   f"{seq}:{int(meta.timestamp.timestamp() * 1e9)}", seq,
                   tuple(names.task_tokens(headers.get(names.HDR_TASK_TOKEN))),
                   names.pipeline_from_result_subject(msg.subject), headers.get(tracing.TRACEPARENT),
                   headers.get(names.HDR_RESULT_OBJECT))

    @classmethod
    def direct(cls, job_id: int, body: bytes, reply: str | None, tokens: str | None = None) -> Incoming:
        """A result handed over without the results stream (tests, tools): taken like any other; `reply`
        and `tokens` as its two headers would hold them."""
        return cls(job_id, body, tuple(names.task_replies(reply)), f"direct:{uuid.uuid4().hex}",
                   tokens=tuple(names.task_tokens(tokens)))

    @functools.cached_property
    def images(self) -> set[str]:
        """The images it decides (canonical ids), read from its body once."""
        return named_images(self.body)

    def foreign_replies(self) -> list[str]:
        return [r for r in self.replies if not names.reply_belongs_to_job(r, self.job_id)]


class _Named(msgspec.Struct):
    """The part of a result that says which images it decides (the rest is read when it is saved)."""

    source_images: list[dict[str, object]] = []
    image_id: str | int | None = None
    error: object = None


_names = msgspec.json.Decoder(_Named)


def named_images(body: bytes) -> set[str]:
    """The images a result message decides (canonical ids); empty if it does not parse as a result."""
    try:
        named = _names.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return set()
    ids: list[object]
    if named.error is not None:
        ids = [named.image_id] if named.image_id is not None else []
    else:
        ids = [image.get("id") for image in named.source_images if isinstance(image, dict)]
    return {c for c in map(canonical_image_id, ids) if c is not None}


@dataclasses.dataclass(frozen=True)
class Proof:
    """What a message's task tokens proved when it was taken: the images it may decide, or why it is
    refused as a whole."""

    images: frozenset[str] = frozenset()
    refused: str = ""

    def to_json(self) -> str:
        return json.dumps({"refused": self.refused} if self.refused else {"images": sorted(self.images, key=int)})

    @classmethod
    def from_json(cls, text: str | None) -> Proof | None:
        if text is None:
            return None  # taken for a job made before task tokens
        data = json.loads(text)
        return cls(frozenset(data.get("images", ())), data.get("refused", ""))


def prove(incoming: list[Incoming]) -> list[Proof | None]:
    """Each message's proof (None for a job made before task tokens, or one that does not exist)."""
    jobs = task_tokens.job_secrets(m.job_id for m in incoming)
    proofs: list[Proof | None] = []
    for m in incoming:
        secret, pipeline = jobs.get(m.job_id, (None, ""))
        proofs.append(_prove(secret, pipeline, m) if secret else None)
    return proofs


def _prove(secret: str, pipeline: str, m: Incoming) -> Proof:
    if m.pipeline is not None and m.pipeline != pipeline:
        return Proof(refused=f"result refused: published on the results subject of pipeline {m.pipeline!r}, "
                             f"but job {m.job_id} runs {pipeline!r} (pipeline.results.<pipeline>.<job_id>)")
    if not m.tokens:
        return Proof(refused=f"result refused: it names no task token ({names.HDR_TASK_TOKEN} header), so it "
                             "decides nothing; a service must return the task_token of each task it answers "
                             "(docs/processing-services.md, 'The result'). Its tasks come back to be answered again")
    proven, forged = task_tokens.proven_images(secret, m.job_id, m.tokens)
    if forged:
        return Proof(refused=f"result refused: {names.HDR_TASK_TOKEN} {forged[0][:60]!r} is not the token of a "
                             f"task of job {m.job_id} (only the holder of a task decides its image); nothing of "
                             "it is saved")
    strays = sorted(m.images - proven, key=int)
    if strays:
        return Proof(refused=f"result refused: it decides image(s) {strays[:10]} without naming their task tokens "
                             f"in {names.HDR_TASK_TOKEN} (only the holder of a task decides its image); nothing of "
                             "it is saved")
    return Proof(frozenset(proven))


def task_images(runtime: Runtime, job_id: int, replies: Iterable[str]) -> dict[str, str]:
    """The image (canonical id) of each reply subject that names a task of the job.

    The task a reply subject names is its stream sequence; dispatch recorded which image's task each sequence
    holds (`task_runs`), jetpipe's own record. Tasks published before that record existed (or answered before
    the dispatch recorded their sequence) are read from the tasks stream instead.
    """
    seqs: dict[str, int] = {}
    for reply in replies:
        parsed = names.parse_ack_subject(reply)
        if parsed is not None and names.reply_belongs_to_job(reply, job_id):
            seqs[reply] = parsed[3]
    if not seqs:
        return {}
    image_of_seq = task_runs.images_of(job_id, seqs.values())
    found = {reply: image_of_seq[seq] for reply, seq in seqs.items() if seq in image_of_seq}
    unknown = [reply for reply in seqs if reply not in found]
    if unknown:  # published before the record existed, or answered before its sequence was recorded
        for reply, (task_job, image_id) in runtime.tasks.task_images(unknown).items():
            image = canonical_image_id(image_id)
            if task_job == job_id and image is not None:
                found[reply] = image
    return found


def settled_replies(runtime: Runtime, incoming: list[Incoming], proofs: list[Proof | None] | None = None) -> list[str]:
    """The task reply subjects the messages settle: a task of the message's own job whose image it decides
    (and proves, with task tokens). A message with any reply subject of another job settles nothing (it is
    rejected when saved), nor does one its proof refuses."""
    proofs = proofs if proofs is not None else [None] * len(incoming)
    deciding = []
    for m, proof in zip(incoming, proofs, strict=True):
        if not m.replies or m.foreign_replies() or (proof is not None and proof.refused):
            continue
        images = m.images if proof is None else m.images & proof.images
        if images:
            deciding.append((m, images))
    by_job: dict[int, list[str]] = {}
    for m, _ in deciding:
        by_job.setdefault(m.job_id, []).extend(m.replies)
    image_of = {job_id: task_images(runtime, job_id, replies) for job_id, replies in by_job.items()}  # a query a job
    settled = [reply for m, images in deciding for reply in m.replies if image_of[m.job_id].get(reply) in images]
    return list(dict.fromkeys(settled))


def take(runtime: Runtime, incoming: list[Incoming]) -> list[int]:
    """Commit result messages to the inbox and ACK the tasks they settle; the ids of their jobs.

    Raises TransientError when NATS or the database cannot be reached. Nothing is lost either way: the
    caller leaves the messages un-acked, they are redelivered and taken again (adding no second row), and
    the tasks are ACKed then. TasksNotAcked says the results were committed all the same (their jobs'
    saving can go on meanwhile: a NATS node lost mid-ACK must not hold up saving).
    """
    if not incoming:
        return []
    incoming, taken_objects = with_big_results(runtime, incoming)
    if not incoming:
        return []
    try:
        proofs = prove(incoming)
        settle = settled_replies(runtime, incoming, proofs)
    except peewee.DatabaseError as exc:
        raise TransientError(f"database: could not read the tasks of {len(incoming)} result(s): {exc}") from exc
    now = utcnow()
    # a span per message, the child of the service's: the message's save joins the trace through it
    spans = [tracing.start("jetpipe.take", parent=m.trace, kind=SpanKind.CONSUMER,
                           attributes={"jetpipe.job_id": m.job_id, "jetpipe.images": len(m.images)}) for m in incoming]
    rows = [(m.job_id, m.source, m.stream_seq, m.body, ",".join(m.replies)[:100_000], now, len(m.images),
             proof.to_json() if proof is not None else None, *placement(m.images), tracing.traceparent(span))
            for m, proof, span in zip(incoming, proofs, spans, strict=True)]
    try:
        with write_transaction():
            insert_ignoring_duplicates(ResultInbox, INBOX_FIELDS, rows)
    except peewee.DatabaseError as exc:
        raise TransientError(f"database: could not take {len(rows)} result(s) into the inbox: {exc}") from exc
    finally:
        tracing.end(spans)
    crash_point("after_inbox", messages=len(incoming))
    _delete_taken(runtime, taken_objects)
    job_ids = sorted({m.job_id for m in incoming})
    if settle:  # NATS down: the caller leaves the messages un-acked, a redelivery ACKs their tasks
        try:
            runtime.tasks.ack_many(settle)
        except TransientError as exc:
            raise TasksNotAcked(f"{len(rows)} result(s) taken, but the ACKs of their {len(settle)} task(s) were "
                                f"not confirmed: {exc}", job_ids=job_ids) from exc
    crash_point("after_task_ack", tasks=len(settle))
    return job_ids


class _Reference(msgspec.Struct):
    result_object: str
    size: int
    sha256: str


_decode_reference = msgspec.json.Decoder(_Reference)


def with_big_results(runtime: Runtime, incoming: list[Incoming]) -> tuple[list[Incoming], dict[str, list[str]]]:
    """`incoming` with each reference to a result object (docs/processing-services.md, "Big results") replaced by
    the result it holds, read from the pipeline's bucket, and the objects read (by pipeline). A reference that
    cannot be honoured (no such object: never uploaded, or taken already; another job's; not what it says;
    over MAX_RESULT_OBJECT_BYTES) is dropped, saying why: nothing of it is taken, and its tasks come back after
    ack_wait if no other result settles them. TransientError when NATS cannot be reached."""
    kept: list[Incoming] = []
    taken: dict[str, list[str]] = {}
    for m in incoming:
        if m.result_object is None:
            kept.append(m)
            continue
        body, why = _object_body(runtime, m)
        if body is None:
            log.warning("job=%s result object %r not taken (%s); its message is dropped, and its tasks come back "
                        "after ack_wait unless another result settles them", m.job_id, m.result_object[:120], why)
            continue
        kept.append(dataclasses.replace(m, body=body))
        taken.setdefault(m.pipeline or "", []).append(m.result_object)
    return kept, taken


def _object_body(runtime: Runtime, m: Incoming) -> tuple[bytes | None, str]:
    name = m.result_object or ""
    try:
        reference = _decode_reference.decode(m.body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None, "its message is not a result object reference ({result_object, size, sha256})"
    if reference.result_object != name or not name.startswith(names.result_object_prefix(m.job_id)):
        return None, f"a reference of job {m.job_id} must name an object {names.result_object_prefix(m.job_id)}…"
    if m.pipeline is None:
        return None, "a result object needs the pipeline in its message's subject"
    if not 0 < reference.size <= MAX_RESULT_OBJECT_BYTES:
        return None, f"its size {reference.size} is not from 1 to {MAX_RESULT_OBJECT_BYTES} bytes"
    stored = runtime.tasks.result_object_size(m.pipeline, name)
    if stored is None:
        return None, "no such object (never uploaded, or taken already)"
    if stored != reference.size:
        return None, f"the object holds {stored} bytes, the reference says {reference.size}"
    body = runtime.tasks.result_object(m.pipeline, name)
    if body is None:
        return None, "no such object (deleted meanwhile)"
    if hashlib.sha256(body).hexdigest() != reference.sha256.lower():
        return None, "its content does not have the SHA-256 the reference says"
    return body, ""


def _delete_taken(runtime: Runtime, taken: dict[str, list[str]]) -> None:
    """Remove the result objects whose results are now in the inbox (leftovers go when their job ends)."""
    for pipeline, object_names in taken.items():
        try:
            runtime.tasks.delete_result_objects(pipeline, object_names)
        except TransientError as exc:
            log.info("result objects %s not deleted yet (%s); they go when their job ends", object_names[:5], exc)


def size() -> int:
    """Rows in the inbox (result messages taken and not yet saved)."""
    return ResultInbox.select().count()


def jobs_waiting(older_than_s: float = 0.0) -> list[int]:
    """Jobs with results in the inbox taken more than `older_than_s` seconds ago and due to be saved now
    (not waiting out the backoff after a failed attempt)."""
    now = utcnow()
    cutoff = now - dt.timedelta(seconds=older_than_s)
    return [job_id for (job_id,) in tuples(ResultInbox.select(ResultInbox.job_id)
            .where((ResultInbox.received_at <= cutoff) & _due(now)).group_by(ResultInbox.job_id))]


def images_waiting(job_id: int) -> set[str]:
    """The images named by the job's results in the inbox (taken, not yet saved)."""
    bodies = tuples(ResultInbox.select(ResultInbox.body).where(ResultInbox.job_id == job_id))
    return {image for (body,) in bodies for image in named_images(bytes(body))}


def _due(now: dt.datetime) -> peewee.Expression:
    return ResultInbox.next_attempt_at.is_null() | (ResultInbox.next_attempt_at <= now)


@dataclasses.dataclass(frozen=True)
class Waiting:
    """A job's results taken and not yet saved."""

    messages: int
    images: int
    oldest: dt.datetime
    retrying: int  # messages waiting for another attempt after an error that is not an outage

    def age_s(self, now: dt.datetime) -> float:
        return max(0.0, (now - self.oldest).total_seconds())

    def as_dict(self, now: dt.datetime) -> dict[str, int | float]:
        return {"messages": self.messages, "images": self.images, "oldest_age_s": round(self.age_s(now), 1),
                "retrying": self.retrying}


def waiting(job_ids: Iterable[int] | None = None) -> dict[int, Waiting]:
    """Per job (of `job_ids`, or every job): its results in the inbox, how many images they name, and when
    the oldest was taken."""
    query = ResultInbox.select(
        ResultInbox.job_id, peewee.fn.COUNT(ResultInbox.id), peewee.fn.SUM(peewee.fn.COALESCE(ResultInbox.images, 1)),
        peewee.fn.MIN(ResultInbox.received_at), peewee.fn.COUNT(ResultInbox.attempts)).group_by(ResultInbox.job_id)
    if job_ids is not None:
        ids = list(job_ids)
        if not ids:
            return {}
        query = query.where(ResultInbox.job_id.in_(ids))
    return {job_id: Waiting(messages, int(images or 0), _as_datetime(oldest), retrying)
            for job_id, messages, images, oldest, retrying in tuples(query)}


def _as_datetime(value: object) -> dt.datetime:
    """MIN() of a timestamp column: SQLite hands back its text."""
    return value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))


def outstanding(runtime: Runtime, job_id: int, *, published_up_to: int | None = None) -> bool:
    """True while results of the job are in jetpipe's hands but not saved: in the inbox, or in the
    results stream not yet taken. With `published_up_to` (a results stream sequence), only results
    published up to it count: a result that came later cannot have been the one a verdict waited for.
    """
    query = ResultInbox.select().where(ResultInbox.job_id == job_id)
    if published_up_to is not None:
        query = query.where(ResultInbox.stream_seq.is_null() | (ResultInbox.stream_seq <= published_up_to))
    if query.exists():
        return True
    oldest = runtime.tasks.oldest_result_seq(job_id)
    return oldest is not None and (published_up_to is None or oldest <= published_up_to)
