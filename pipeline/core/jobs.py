"""Job lifecycle: create a job from image URLs, load its Redis state from the database, dispatch its
tasks to JetStream, cancel it, and clean up after its one terminal transition."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar
from urllib.parse import urlsplit

import msgspec
from nats.js.api import ConsumerConfig

from models import (
    DEFAULT_PROJECT,
    DispatchMode,
    ImageStatus,
    Job,
    JobImage,
    JobStatus,
    Pipeline,
    SourceImage,
    database,
    insert_ignoring_duplicates,
    plain_rows,
    select_in,
    tuples,
    utcnow,
    utcnow_stored,
    write_transaction,
)
from pipeline import fairshare, names
from pipeline.core import manifests, progress, scheduling, slots, task_runs, task_tokens, webhooks
from pipeline.core import reuse as reuse_
from pipeline.core.image_policy import IMAGE_SUFFIXES, ImagePolicy
from pipeline.core.joblog import job_log
from pipeline.core.registry import existing_pipeline
from pipeline.errors import NotFound, NothingToDo, TransientError, UserInputError
from pipeline.infra import objectstore, tracing
from pipeline.infra.crashpoints import crash_point
from pipeline.infra.jobstate import JobState
from pipeline.infra.runtime import Runtime
from pipeline.infra.taskqueue import SyncTaskQueue
from pipeline.schemas import Task
from pipeline.settings import DEFAULT_WEBHOOK_EVENTS, Settings, get_settings

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Image URLs inserted per statement when a job is created.
CREATE_CHUNK = 1000
URL_SCHEMES = ("file", "http", "https", "s3")


def check_url(url: str) -> str:
    """`url` if it is a usable image URL; raises UserInputError saying why not."""
    parts = urlsplit(url)
    if parts.scheme not in URL_SCHEMES:
        raise UserInputError(f"not an image URL (want file://, http://, https:// or s3://): {url!r}")
    if parts.scheme == "file" and not parts.path:
        raise UserInputError(f"file URL without a path: {url!r}")
    if parts.scheme in ("http", "https") and not parts.hostname:
        raise UserInputError(f"URL without a host: {url!r}")
    if parts.scheme == "s3":
        bucket, key = objectstore.split(url)
        if not key or key.endswith("/"):
            raise UserInputError(f"s3:// URL without an object key: {url!r}")
    return url


def is_prefix(url: str) -> bool:
    """Whether `url` names many images: an object storage prefix (`s3://bucket/` or `s3://bucket/photos/`)."""
    return objectstore.is_s3(url) and (url.endswith("/") or "/" not in url[len("s3://"):])


def _expanded(items: Iterable[str | manifests.Row], policy: ImagePolicy, *, over_network: bool,
              suffixes: Iterable[str]) -> Iterator[manifests.Row]:
    """`items` (URLs, or manifest rows) as manifest rows, each object storage prefix replaced by the images under
    it (listed a page at a time, once its bucket is one the policy lets this job read)."""
    for item in items:
        if not isinstance(item, str):
            yield item
        elif is_prefix(url := item.strip()):
            policy.check_new(url, over_network=over_network)
            yield from (manifests.Row(u, None, etag) for u, etag in objectstore.list_objects(
                url, get_settings(), suffixes=suffixes))
        elif url:
            yield manifests.Row(url, None)


def reachable(task: Task, settings: Settings) -> Task:
    """`task` with an image URL its reader can open: an object in object storage as a presigned https URL."""
    if objectstore.is_s3(task.image_url):
        return msgspec.structs.replace(task, image_url=objectstore.presigned(task.image_url, settings))
    return task


def create_job(pipeline_slug: str, urls: Iterable[str | manifests.Row], *, name: str | None = None,
               limit: int | None = None,
               suffixes: Iterable[str] = IMAGE_SUFFIXES,
               dispatch_mode: str = DispatchMode.ASYNC_API, pickup_timeout_s: float | None = None,
               deadline_s: float | None = None, over_network: bool = False,
               policy: ImagePolicy | None = None, project: str | None = None, priority: int = 0,
               retry_of: int | None = None, notify: webhooks.Endpoint | tuple[str, ...] | None = None,
               reuse: bool = True) -> Job:
    """A new CREATED job over `urls` (streamed, deduplicated); all or nothing: bad input leaves no row.

    A URL may be an object storage prefix (`s3://bucket/prefix/`): the objects under it whose names end with one of
    `suffixes` are the job's images, listed as the job is made (a page at a time). An item may also be a manifest
    row (`pipeline/core/manifests.py`): its image, with what the manifest says of it.

    Every URL must be one the image policy lets jetpipe read (`pipeline/core/image_policy.py`): `over_network`
    for a job asked for through the web API, which may name local files only under PIPELINE_IMAGE_ROOTS;
    `policy`: the one to hold them to (default: this process's settings).

    `pickup_timeout_s`: seconds after dispatch within which a service must pull one of its tasks (default
    PIPELINE_JOB_PICKUP_TIMEOUT); `deadline_s`: seconds from now by which the whole job must have ended.
    `project` (default `default`, created on first use) and `priority` (pipeline/fairshare.py) decide when
    services serve it beside other jobs of its pipeline. `notify`: (url, secret[, events]) of an endpoint told
    when the job ends, or of the events it names (pipeline/core/webhooks.py). `reuse`: images an earlier job of
    the pipeline's current version processed keep their saved results and are not sent again
    (pipeline/core/reuse.py).
    """
    pipeline = existing_pipeline(pipeline_slug)
    if dispatch_mode not in DispatchMode.ALL:
        raise UserInputError(f"unknown dispatch mode {dispatch_mode!r} (use {' or '.join(DispatchMode.ALL)})")
    if limit is not None and limit < 1:
        raise UserInputError("--limit must be at least 1")
    for option, value in (("pickup timeout", pickup_timeout_s), ("deadline", deadline_s)):
        if value is not None and not value > 0:
            raise UserInputError(f"the {option} must be a positive number of seconds, not {value!r}")
    deadline_at = utcnow() + dt.timedelta(seconds=deadline_s) if deadline_s else None
    priority = fairshare.parse_priority(priority)
    endpoint = webhooks.Endpoint(*notify) if notify is not None else None
    events = webhooks.check_events(endpoint.events) if endpoint is not None else None
    if endpoint is not None:
        webhooks.check_endpoint(endpoint.url, endpoint.secret)
    fairshare.check_project_name(project or DEFAULT_PROJECT)
    policy = policy or ImagePolicy.from_settings(get_settings())
    resolved_dirs: dict[str, str] = {}  # this job's image directories, each resolved once

    def allowed(url: str) -> str:
        policy.check_new(check_url(url), over_network=over_network, dirs=resolved_dirs)
        return url

    with tracing.span("jetpipe.enqueue", attributes={"jetpipe.pipeline": pipeline_slug,
                                                     "jetpipe.project": project or DEFAULT_PROJECT}) as span:
        with database.atomic():
            job = Job.create(name=name or f"{pipeline_slug} job", pipeline=pipeline, dispatch_mode=dispatch_mode,
                             project=scheduling.project_for_job(project), priority=priority, retry_of=retry_of,
                             notify_url=endpoint.url if endpoint else None,
                             notify_secret=endpoint.secret if endpoint else None,
                             notify_events=",".join(events) if events and events != DEFAULT_WEBHOOK_EVENTS else None,
                             task_secret=task_tokens.new_secret(),
                             progress=progress.initial_progress(), pickup_timeout_s=pickup_timeout_s,
                             deadline_at=deadline_at, trace_parent=tracing.traceparent(),
                             pipeline_version=pipeline.version)
            total = reused = 0
            listed = _expanded(urls, policy, over_network=over_network, suffixes=suffixes)
            for chunk in _chunks(_limited(listed, limit), CREATE_CHUNK):
                rows: dict[str, manifests.Row] = {}  # by url (a url twice: the first says)
                for row in chunk:
                    rows.setdefault(allowed(row.url), row)
                now = utcnow_stored()
                insert_ignoring_duplicates(SourceImage, ("url", "created_at"), [(u, now) for u in rows])
                ids = dict(select_in('SELECT url, id FROM "source_image" WHERE url IN ({in})', list(rows)))
                earlier = reuse_.earlier_results(pipeline.id, pipeline.version if reuse else None,
                                                 list(ids.values()), before_job=job.id)
                made = [reuse_.job_image_row(job, i, json.dumps(rows[u].meta, ensure_ascii=False) if rows[u].meta
                                             else None, rows[u].etag,
                                             reuse_.same_content(earlier.get(i), rows[u].etag), now)
                        for u, i in ids.items()]
                total += insert_ignoring_duplicates(JobImage, reuse_.JOB_IMAGE_FIELDS, made)
                reused += any(r[reuse_.REUSED_FROM] is not None for r in made)
            reused = reuse_.reused_count(job.id) if reused else 0
            if total == 0:
                raise UserInputError("no images: the job would be empty")
            job.total_images, job.reused_images = total, reused or None
            job.progress = progress.initial_progress(total)
            job.save(only=[Job.total_images, Job.progress, Job.reused_images])
        span.set_attributes({"jetpipe.job_id": job.id, "jetpipe.images": total, "jetpipe.reused": reused})
        log.info("job=%s created: pipeline=%s images=%s (%s with results reused) mode=%s project=%s priority=%s",
                 job.id, pipeline_slug, total, reused, dispatch_mode, project or DEFAULT_PROJECT, priority)
    return job


def _limited(rows: Iterable[manifests.Row], limit: int | None) -> Iterator[manifests.Row]:
    for n, row in enumerate(rows):
        if limit is not None and n >= limit:
            return
        yield row


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---- Redis state from the database ---------------------------------------------------------------------
def load_state_from_db(state: JobState, job_id: int, *, force: bool = False) -> bool:
    """Load the job's Redis state from its JobImage rows; False if a complete state existed (no force).

    One streamed query gives pending ids, failed ids and the counters from a single consistent read.
    """
    rows = plain_rows(JobImage.select(JobImage.image, JobImage.status, JobImage.detections, JobImage.classifications)
                      .where(JobImage.job == job_id))
    return state.load(job_id, ((str(i), status, d, c) for i, status, d, c in rows), force=force)


def rebuild_state(state: JobState, job_id: int, *, even_if_present: bool = False) -> bool:
    """Rebuild a running job's missing Redis state from the database, once however many ask at the same
    time; False if it was not needed (another process rebuilt it, or the job has ended).

    `even_if_present`: reload it although it exists, because it disagrees with the database (the source
    of truth): it counted images whose results were never committed.
    """
    with state.rebuild_lock(job_id):
        if not even_if_present and state.snapshot(job_id) is not None:
            return False  # rebuilt by whoever held the lock before us
        if Job.select(Job.status).where(Job.id == job_id).scalar() != JobStatus.STARTED:
            return False
        load_state_from_db(state, job_id, force=True)
        return True


# ---- dispatch -------------------------------------------------------------------------------------------
#: Tasks of a dispatch's first round (the rest go PIPELINE_DISPATCH_CHUNK at a time).
FIRST_ROUND = 500


def pending_chunk(job: Job, *, after_id: int, limit: int, presign: bool = True) -> list[tuple[int, Task]]:
    """(JobImage.id, Task) of the job's next `limit` pending images after `after_id`, in id order, read in
    full: no read stays open while the caller writes (a SQLite connection whose read snapshot is older
    than another writer's commit cannot start writing: "database is locked" at once). `presign`: images in object
    storage as presigned https URLs (`reachable`), as a processing service is handed them."""
    query = (JobImage.select(JobImage.id, JobImage.image, SourceImage.url).join(SourceImage)
             .where((JobImage.job == job.id) & (JobImage.status == ImageStatus.PENDING) & (JobImage.id > after_id))
             .order_by(JobImage.id).limit(limit))
    slug, secret = job.pipeline.slug, job.task_secret
    tasks = [(row_id, Task(job_id=job.id, image_id=str(image_id), image_url=url, pipeline=slug,
                           task_token=task_tokens.token_for(secret, job.id, str(image_id)) if secret else ""))
             for row_id, image_id, url in plain_rows(query)]
    if presign:
        settings = get_settings()
        tasks = [(row_id, reachable(task, settings)) for row_id, task in tasks]
    return tasks


def record_published(job_id: int, image_ids: list[str], seqs: list[int], cursor: int) -> None:
    """Record which image each published task is for, by the stream sequence its PubAck gave (`task_runs`), and
    the job's checkpoint, in one transaction. Rows are only added (the image rows are not written), so this
    takes no lock that saving the job's results meanwhile holds, but the job row's, last, as every writer does."""
    with write_transaction():
        task_runs.record(job_id, image_ids, seqs)
        Job.update(dispatch_cursor=cursor, updated_at=utcnow()).where(Job.id == job_id).execute()


def dispatch(runtime: Runtime, job: Job, *, consumer: ConsumerConfig | None = None) -> int:
    """Publish the job's pending tasks from its checkpoint on, then mark it dispatched; returns tasks sent.
    `consumer`: the job's consumer if the caller has just taken its slot (else it is taken here).

    Resumable: the checkpoint (`dispatch_cursor`) advances after each published chunk, and a chunk
    republished after a crash is deduplicated by its `Nats-Msg-Id`s. Each chunk is read in full before
    anything is written, so saving results while a job is being dispatched never meets a lock upgrade.
    """
    settings = runtime.settings
    tasks = runtime.tasks
    accepted = consumer or slots.take_job_slot(runtime, job)
    job_log(job.id, logging.INFO, f"consumer {names.job_consumer(job.id)} ready: max_deliver="
                                  f"{accepted.max_deliver} ack_wait={accepted.ack_wait}s")
    sent = new = 0
    cursor = job.dispatch_cursor
    crash_point("before_publish", job=job.id)
    # the first round is small: services start on it while the rest is read and published
    chunk = pending_chunk(job, after_id=cursor, limit=min(FIRST_ROUND, settings.dispatch_chunk))
    while chunk:
        # each round's traceparent goes on its tasks: a service's span for a task joins the job's trace there
        with tracing.span("jetpipe.dispatch", parent=None if tracing.in_span() else job.trace_parent,
                          attributes={"jetpipe.job_id": job.id, "jetpipe.tasks": len(chunk)}):
            publishing = tasks.start_publishing([task for _, task in chunk], headers=tracing.headers())
            try:  # the next round is read while this one is published (a read: the checkpoint is written after)
                upcoming = pending_chunk(job, after_id=chunk[-1][0], limit=settings.dispatch_chunk)
            except BaseException:
                publishing.cancel()
                raise
            published = tasks.published(publishing)
        new += sum(p.new for p in published)
        sent += len(chunk)
        cursor = chunk[-1][0]
        record_published(job.id, [task.image_id for _, task in chunk], [p.seq for p in published], cursor)
        if sent == len(chunk):  # its first tasks are out: services waiting for work may pull at once
            _announce(tasks, job)
        crash_point("mid_publish", job=job.id, sent=sent)
        status = Job.select(Job.status).where(Job.id == job.id).scalar()
        if status == JobStatus.CANCELING or status in JobStatus.TERMINAL:
            # canceled while dispatching: the cancel's purge may have run before this chunk was published
            cleanup(runtime, job.id, job.pipeline.slug)
            job_log(job.id, logging.INFO, f"dispatch stopped after {sent} task(s): the job is {status}; its "
                                          "tasks were removed from NATS")
            return sent
        chunk = upcoming
    crash_point("after_publish", job=job.id, sent=sent)
    Job.update(dispatched_at=utcnow(), updated_at=utcnow()).where(Job.id == job.id).execute()
    job_log(job.id, logging.INFO, f"dispatched {sent} task(s) ({new} new) to "
                                  f"{names.task_subject(job.pipeline.slug, job.id)}")
    crash_point("after_dispatch", job=job.id)
    return sent


def _announce(tasks: SyncTaskQueue, job: Job) -> None:
    try:
        tasks.announce_job(job.pipeline.slug, job.id)
    except TransientError as exc:  # a hint only: services find the job at their next listing anyway
        log.info("job=%s could not announce the job to its services (%s); they find it by listing", job.id, exc)


# ---- cleanup and cancel ---------------------------------------------------------------------------------
def cleanup(runtime: Runtime, job_id: int, pipeline_slug: str) -> bool:
    """Remove the job's NATS consumer (and leftover tasks) and Redis state; True if both went.

    Runs once, after the job's terminal transition; a failure is logged and left to the zombie sweep.
    """
    parent = Job.select(Job.trace_parent).where(Job.id == job_id).scalar() if tracing.exporting() else None
    with tracing.span("jetpipe.cleanup", parent=parent, attributes={"jetpipe.job_id": job_id}):
        return _cleanup(runtime, job_id, pipeline_slug)


def _cleanup(runtime: Runtime, job_id: int, pipeline_slug: str) -> bool:
    ok = True
    try:
        runtime.tasks.delete_job_consumer(job_id, pipeline_slug)
        slots.wake_a_waiting_job(runtime)
        # results uploaded as objects and never taken (a service stopped between its upload and its publish)
        runtime.tasks.delete_result_objects(pipeline_slug, runtime.tasks.job_result_objects(pipeline_slug, job_id))
    except TransientError as exc:
        ok = False
        log.warning("job=%s cleanup: NATS consumer not removed (%s); the zombie sweep will retry", job_id, exc)
    try:
        runtime.state.delete(job_id)
    except TransientError as exc:
        ok = False
        log.warning("job=%s cleanup: Redis state not removed (%s); the zombie sweep will retry", job_id, exc)
    if ok:
        Job.update(cleaned_up_at=utcnow()).where(Job.id == job_id).execute()
        job_log(job_id, logging.INFO, f"cleaned up: consumer {names.job_consumer(job_id)} and Redis state removed; "
                                      f"stages at cleanup: {stages_text(job_id)}")
    return ok


def stages_text(job_id: int) -> str:
    """`collect SUCCESS 100%, process SUCCESS 100%, results SUCCESS 100%`: which stages satisfied completion."""
    stages = (Job.select(Job.progress).where(Job.id == job_id).scalar() or {}).get("stages", {})
    return ", ".join(f"{name} {stage.get('status', '?')} {stage.get('progress', 0) * 100:.0f}%"
                     for name, stage in stages.items()) or "none recorded"


def cancel(runtime: Runtime, job_id: int, *, by: str = "operator") -> str:
    """Cancel a job: CANCELING, then clean up, then REVOKED; returns the job's final status. `by`: who asked."""
    job = Job.get_or_none(Job.id == job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    if job.status in JobStatus.TERMINAL:
        return job.status
    progress.transition(job_id, JobStatus.CANCELING, allowed_from=(JobStatus.CREATED, JobStatus.PENDING,
                                                                   JobStatus.STARTED))
    job_log(job_id, logging.INFO, f"cancel requested by {by}: status CANCELING")
    if job.dispatch_mode == DispatchMode.ASYNC_API:
        cleanup(runtime, job_id, job.pipeline.slug)
    if progress.transition(job_id, JobStatus.REVOKED, allowed_from=(JobStatus.CANCELING,),
                           error=f"canceled by {by}"):
        job_log(job_id, logging.INFO, "job REVOKED (canceled); its tasks were removed from NATS")
    return Job.get_by_id(job_id).status


def start_job(runtime: Runtime, job: Job) -> None:
    """Queue run_job for a CREATED job (status PENDING); if the queue is unreachable the job is removed."""
    import redis

    progress.transition(job.id, JobStatus.PENDING, allowed_from=(JobStatus.CREATED,))
    try:
        runtime.send(names.RUN_JOB, job.id)
    except redis.RedisError as exc:
        job.delete_instance(recursive=True)
        raise TransientError(f"could not queue the job (Redis unavailable: {exc}); nothing was created") from exc
    log.info("job=%s queued for run_job", job.id)


def failed_image_rows(job_id: int, *, limit: int | None = None) -> Iterator[tuple[int, str, str | None]]:
    """(image id, url, reason) of the job's failed images, by image id, streamed."""
    query = (JobImage.select(JobImage.image, SourceImage.url, JobImage.error).join(SourceImage)
             .where((JobImage.job == job_id) & (JobImage.status == ImageStatus.FAILED)).order_by(JobImage.image))
    return tuples(query.limit(limit) if limit else query, stream=True)


def retry_failed(job_id: int) -> Job:
    """A new CREATED job over the failed images of an ended job (same pipeline and dispatch mode, the images'
    manifest metadata)."""
    job = Job.select(Job, Pipeline).join(Pipeline).where(Job.id == job_id).get_or_none()
    if job is None:
        raise NotFound(f"no job {job_id}")
    if job.status not in JobStatus.TERMINAL:
        raise UserInputError(f"job {job_id} is still {job.status}: retry its failed images once it has ended")
    if not JobImage.select().where((JobImage.job == job_id) & (JobImage.status == ImageStatus.FAILED)).exists():
        raise NothingToDo(f"job {job_id} has no failed images: nothing to retry")
    failed = (JobImage.select(SourceImage.url, JobImage.meta, JobImage.etag).join(SourceImage)
              .where((JobImage.job == job_id) & (JobImage.status == ImageStatus.FAILED)).order_by(JobImage.image))
    rows = (manifests.Row(url, json.loads(meta) if meta else None, etag)
            for url, meta, etag in tuples(failed, stream=True))
    return create_job(job.pipeline.slug, rows, name=f"retry of job {job_id} ({job.name})",
                      dispatch_mode=job.dispatch_mode, project=job.project_name, priority=job.priority or 0,
                      retry_of=job_id, notify=webhooks.Endpoint(job.notify_url, job.notify_secret or "",
                                                                webhooks.job_events(job)) if job.notify_url else None)
