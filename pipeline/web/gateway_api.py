"""The HTTP gateway for processing services, `/api/v2/…`: the reference system's task protocol, so that a
worker written for it (or any HTTP client) works against jetpipe unchanged. It never connects such a
worker to NATS: it reserves tasks for it and publishes its results to `pipeline.results.<pipeline>.<job_id>`
exactly as a NATS service would, so validation, saving, the exactly-once gate and the ACK are the same code.

Unlike the reference system it checks, on every request, that a `service` token uses only its own
pipelines (403), and on every result that each reply subject was handed to the caller itself
(`pipeline/web/leases.py`) and that the job runs and is `async_api` (409 / 400, and nothing is published);
it publishes each result with its task's token, and refuses bodies over PIPELINE_WEB_MAX_BODY_MB with 413.
docs/processing-services.md documents every status.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import mimetypes
import os
import threading

import msgspec
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

import models
from models import DispatchMode, Job, JobImage, JobStatus, Pipeline, Project, SourceImage, thread_connection, tuples
from pipeline import names
from pipeline.core.image_policy import ImagePolicy
from pipeline.core.registry import register_pipeline
from pipeline.errors import Conflict, Forbidden, NotFound, TooLarge, TransientError, UserInputError
from pipeline.infra import presence, tracing
from pipeline.schemas import decode_pipeline_spec
from pipeline.web import image_links, leases
from pipeline.web.announcements import MAX_WAIT_S, JobAnnouncements, until
from pipeline.web.auth import Principal
from pipeline.web.deps import allowed, runtime_of, with_db
from pipeline.web.gateway_share import GatewayShare
from pipeline.web.gateway_tasks import Gateway, Reserved

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v2", tags=["processing-service gateway"])
SERVICE = Depends(allowed("gateway"))

#: Most tasks one reservation hands out.
MAX_BATCH = 500
#: Seconds a reservation, a publication or a +WPI may take on the event loop before the request fails.
LOOP_TIMEOUT_S = 30.0


class TasksRequest(BaseModel):
    batch_size: int = Field(ge=1, le=MAX_BATCH)
    client_info: dict | None = None


class InProgressRequest(BaseModel):
    reply_subjects: list[str] = Field(max_length=MAX_BATCH)


class AlgorithmConfig(BaseModel):
    """An algorithm as the reference's services describe it (other fields are ignored)."""

    name: str
    key: str
    task_type: str | None = None
    version: str | int | None = None


class PipelineConfig(BaseModel):
    name: str
    slug: str
    algorithms: list[AlgorithmConfig] = Field(default_factory=list)
    version: str | int | None = None


class RegistrationRequest(BaseModel):
    processing_service_name: str
    pipelines: list[PipelineConfig] = Field(default_factory=list, max_length=100)


class _ResultItem(msgspec.Struct):
    reply_subject: str
    result: msgspec.Raw  # handed on as it came, never re-encoded
    traceparent: str | None = None  # the caller's span for the task, where it traces


class _ResultBatch(msgspec.Struct):
    results: list[_ResultItem]
    client_info: dict | None = None


_decode_batch = msgspec.json.Decoder(_ResultBatch)
_gateway_lock = threading.Lock()
_announcements_lock = threading.Lock()  # its own: a listing connecting to NATS never holds up a reservation


def share_of(request: Request) -> GatewayShare:
    """The process's fair share between jobs (pipeline/web/gateway_share.py)."""
    state = request.app.state
    with _gateway_lock:
        if getattr(state, "gateway_share", None) is None:
            state.gateway_share = GatewayShare()
        return state.gateway_share


def gateway_of(request: Request) -> Gateway:
    """The process's gateway (one per web process; created on the first request that needs NATS)."""
    state = request.app.state
    with _gateway_lock:
        if getattr(state, "gateway", None) is None:
            runtime = runtime_of(request)
            state.gateway = Gateway(runtime.tasks.queue)
            runtime.runner.spawn(state.gateway.keep_tidy(ended_jobs))
        return state.gateway


def ended_jobs(job_ids: list[int]) -> set[int]:
    """Those of `job_ids` that ended or no longer exist."""
    with thread_connection():
        running = {job_id for (job_id,) in tuples(Job.select(Job.id).where(
            Job.id.in_(job_ids) & Job.status.not_in(JobStatus.TERMINAL)))}
    return set(job_ids) - running


def _job(job_id: int, who: Principal, *, running: bool) -> Job:
    job = Job.select(Job, Pipeline, Project).join(Pipeline).switch(Job).join(Project).where(Job.id == job_id) \
        .get_or_none()
    if job is None:
        raise NotFound(f"no job {job_id}")
    if who.role == "service" and job.pipeline.registered_by != who.name:
        owner = f"service {job.pipeline.registered_by!r}" if job.pipeline.registered_by else "no service"
        raise Forbidden(f"job {job_id} runs pipeline {job.pipeline.slug!r}, which belongs to {owner}: service "
                        f"{who.name!r} may use only its own pipelines (it registers them, or an operator gives "
                        "them to it: `cli.py pipeline register FILE --service NAME`)")
    if not who.may_see(job.project_name):
        raise NotFound(f"no job {job_id}")  # another project's job: as if there were none
    if job.dispatch_mode != DispatchMode.ASYNC_API:
        raise UserInputError(f"job {job_id} runs in {job.dispatch_mode} mode: it has no tasks for services")
    if running and job.status != JobStatus.STARTED:
        raise HTTPException(409, f"job {job_id} is {job.status}: it takes no results")
    return job


def _check_replies(job_id: int, replies: list[str]) -> None:
    foreign = [r for r in replies if not names.reply_belongs_to_job(r, job_id)]
    if foreign:
        raise Conflict(f"{len(foreign)} reply_subject(s) are not tasks of job {job_id} "
                       f"(first: {foreign[0][:120]!r}); nothing was accepted")


@router.get("/jobs/", summary="Running async jobs, for services looking for work (the reference's shape)")
async def service_jobs(request: Request, ids_only: bool = False, incomplete_only: bool = False,
                       pipeline__slug__in: str | None = Query(default=None, description="slugs, comma-separated"),
                       dispatch_mode: DispatchMode = Query(default=DispatchMode.ASYNC_API,
                                                           description="only async_api jobs have tasks for services"),
                       limit: int = Query(default=100, ge=1, le=1000), offset: int = Query(default=0, ge=0),
                       wait: float = Query(default=0, ge=0, le=MAX_WAIT_S, description=(
                           "jetpipe's addition: when no job is listed, wait up to this many seconds for one of "
                           "these pipelines to be announced, then answer (a long poll)")),
                       who: Principal = SERVICE) -> dict:
    slugs = [s.strip() for s in (pipeline__slug__in or "").split(",") if s.strip()]

    def listing() -> dict:
        with thread_connection():
            return _list_jobs(request, ids_only, incomplete_only, slugs, dispatch_mode, limit, offset, who)

    announcements = await run_in_threadpool(announcements_of, request) if wait else None
    if announcements is None:
        return await run_in_threadpool(listing)
    with announcements.waiter(slugs) as announced:  # registered first: an announcement now is not missed
        answer = await run_in_threadpool(listing)
        if answer["results"] or not await until(announced, wait):
            return answer
    return await run_in_threadpool(listing)


def announcements_of(request: Request) -> JobAnnouncements | None:
    """The process's listener of job announcements (started on the first long poll); None while NATS cannot be
    reached (the listing then answers at once)."""
    state = request.app.state
    with _announcements_lock:
        if getattr(state, "announcements", None) is None:
            runtime = runtime_of(request)
            listener = JobAnnouncements()
            try:
                runtime.runner.run(listener.listen(runtime.tasks.queue), timeout=10)
            except (TransientError, TimeoutError) as exc:
                log.warning("gateway: cannot hear job announcements (%s); listings answer without waiting", exc)
                return None
            state.announcements = listener
        return state.announcements


def _list_jobs(request: Request, ids_only: bool, incomplete_only: bool, slugs: list[str], dispatch_mode: str,
               limit: int, offset: int, who: Principal) -> dict:
    query = (Job.select(Job, Pipeline).join(Pipeline).switch(Job).join(Project)
             .where(Job.dispatch_mode == dispatch_mode)
             .where(Job.dispatch_mode == DispatchMode.ASYNC_API).order_by(Job.id))
    if who.role == "service":  # a service sees the jobs of its own pipelines only
        query = query.where(Pipeline.registered_by == who.name)
    if who.projects is not None:
        query = query.where(Project.name.in_(sorted(who.projects)))
    if incomplete_only:  # the jobs to take tasks of: running and not paused, in the order to serve them
        query = query.where(Job.status.in_((JobStatus.CREATED, JobStatus.PENDING, JobStatus.STARTED))
                            & Job.paused_at.is_null())
    if slugs:
        query = query.where(Pipeline.slug.in_(slugs))
    if incomplete_only:  # the running jobs, read once: ordered here, counted from what was read
        every = list(query)
        ranks = share_of(request).rank(runtime_of(request), sorted({j.pipeline.slug for j in every}))
        every.sort(key=lambda j: (j.id not in ranks, ranks.get(j.id, (0, 0)), j.id))
        count, rows = len(every), every[offset:offset + limit]
    else:
        count, rows = query.count(), list(query.limit(limit).offset(offset))
    # the reference's minimal job: id and pipeline_slug (its worker takes the slug from here)
    results = [{"id": j.id, "pipeline_slug": j.pipeline.slug} if ids_only else {
        "id": j.id, "pipeline_slug": j.pipeline.slug, "status": j.status, "pipeline": j.pipeline.slug,
        "dispatch_mode": j.dispatch_mode, "total_images": j.total_images} for j in rows]
    more = offset + len(rows) < count
    base = str(request.url.remove_query_params(["offset"]))
    return {"count": count, "next": f"{base}{'&' if '?' in base else '?'}offset={offset + limit}" if more else None,
            "previous": None, "results": results}


@router.get("/projects/", summary="The projects this token may use")
@with_db
def service_projects(who: Principal = SERVICE) -> dict:
    models.default_project()  # a fresh install has it before its first job: a service registers into it
    projects = [{"id": p.id, "name": p.name} for p in Project.select().order_by(Project.id) if who.may_see(p.name)]
    return {"count": len(projects), "next": None, "previous": None, "results": projects}


@router.post("/projects/{project_id}/pipelines/",
             summary="Register the pipelines of the calling service (`ami worker register`)")
@with_db
def register_service_pipelines(project_id: int, body: RegistrationRequest, who: Principal = SERVICE) -> dict:
    """A service registers or updates its own pipelines; one registered by another service or by an
    operator is refused (403) and nothing of the request is registered."""
    project = Project.get_or_none(Project.id == project_id)
    if project is None or not who.may_see(project.name):
        raise NotFound(f"no project {project_id} (GET /api/v2/projects/ lists those this token may use)")
    specs = [decode_pipeline_spec(json.dumps({"slug": p.slug, "name": p.name, "version": p.version, "algorithms": [
        {"key": a.key, "name": a.name, "task_type": a.task_type or "unknown", "version": a.version}
        for a in p.algorithms]}).encode(), source=f"pipeline {p.slug!r}") for p in body.pipelines]
    created: list[str] = []
    updated: list[str] = []
    with models.database.atomic():  # all of them or none
        for spec in specs:
            (created if register_pipeline(spec, service=who.name) else updated).append(spec.slug)
    log.info("gateway: service %s (%s) registered pipelines %s, updated %s", who.name,
             body.processing_service_name[:100], created, updated)
    return {"pipelines_created": created, "pipelines_updated": updated, "processing_service_id": None}


@router.post("/jobs/{job_id}/tasks/", summary="Reserve up to batch_size tasks (each leased for ack_wait)")
@with_db
def reserve_tasks(job_id: int, body: TasksRequest, request: Request, who: Principal = SERVICE) -> dict:
    job = _job(job_id, who, running=False)
    runtime = runtime_of(request)
    if job.status != JobStatus.STARTED:
        log.debug("job=%s gateway: %s asked for tasks of a %s job; none", job_id, who.name, job.status)
        if job.status in JobStatus.TERMINAL:
            runtime.runner.run(gateway_of(request).release([job_id]), timeout=LOOP_TIMEOUT_S)
        return {"tasks": []}
    slug, share = job.pipeline.slug, share_of(request)
    if job.is_paused or not share.due(runtime, slug, job_id, body.batch_size):
        log.debug("job=%s gateway: %s asked for tasks; none now (%s)", job_id, who.name,
                  "paused" if job.is_paused else "another job of the pipeline is due first")
        return {"tasks": []}
    reserved = runtime.runner.run(gateway_of(request).reserve(job_id, slug, body.batch_size),
                                  timeout=LOOP_TIMEOUT_S)
    share.served(slug, job_id, len(reserved))
    leases.record(runtime.redis, runtime.settings, job_id, who.name, reserved)
    if reserved:
        log.info("job=%s gateway: %s reserved %s of %s task(s)", job_id, who.name, len(reserved), body.batch_size)
    _seen(runtime, who, job, reserved=len(reserved))
    return {"tasks": [r.as_task() for r in _reachable(request, runtime, job_id, reserved)]}


def _reachable(request: Request, runtime, job_id: int, reserved: list[Reserved]) -> list[Reserved]:
    """The tasks with their local images (file://) as signed links to this server, unless the operator
    chose to hand out paths (PIPELINE_WEB_LOCAL_IMAGES=file)."""
    settings = runtime.settings
    local = [r for r in reserved if r.image_url.startswith("file://")]
    if not local or settings.web_local_images == "file":
        return reserved
    key = image_links.secret(runtime.redis)
    base = settings.web_public_url or str(request.base_url)
    lifetime = settings.nats_task_ttr * settings.nats_max_deliver + image_links.MARGIN_S
    return [dataclasses.replace(r, image_url=image_links.link(key, base, job_id, r.image_id, lifetime))
            if r.image_url.startswith("file://") else r for r in reserved]


@router.get("/images/{job_id}/{image_id}", summary="A job's local image, through a signed link from its task",
            response_class=FileResponse)
@with_db
def local_image(job_id: int, image_id: int, request: Request, expires: int = Query(), signature: str = Query()):
    image_links.check(image_links.secret(runtime_of(request).redis), job_id, str(image_id), expires, signature)
    url = (JobImage.select(SourceImage.url).join(SourceImage)
           .where((JobImage.job == job_id) & (JobImage.image == image_id)).scalar())
    if url is None:
        raise NotFound(f"image {image_id} is not part of job {job_id}")
    path = image_links.local_path(url)
    policy = ImagePolicy.from_settings(request.app.state.settings)
    if (policy.roots and not policy.local_path_allowed(path)) or not os.path.isfile(path):
        raise NotFound(f"the file of image {image_id} is gone")  # never which path: a service may not learn it
    return FileResponse(path, media_type=mimetypes.guess_type(path)[0] or "application/octet-stream")


@router.post("/jobs/{job_id}/tasks/in_progress/", summary="Extend the lease of reserved tasks (+WPI)")
@with_db
def tasks_in_progress(job_id: int, body: InProgressRequest, request: Request, who: Principal = SERVICE) -> dict:
    _job(job_id, who, running=True)
    _check_replies(job_id, body.reply_subjects)
    runtime = runtime_of(request)
    leases.leases_of(runtime.redis, job_id, who.name, body.reply_subjects)  # only its own tasks' leases
    runtime.runner.run(gateway_of(request).in_progress(body.reply_subjects), timeout=LOOP_TIMEOUT_S)
    return {"extended": len(body.reply_subjects)}


@router.post("/jobs/{job_id}/result/", summary="Return results; each names its task's reply_subject",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                 "type": "object", "required": ["results"], "properties": {"results": {"type": "array", "items": {
                     "type": "object", "required": ["reply_subject", "result"]}}}}}}}})
async def post_results(job_id: int, request: Request, who: Principal = SERVICE) -> dict:
    limit = int(request.app.state.settings.web_max_body_mb * 1024 * 1024)
    body = await _read_limited(request, limit)
    try:
        batch = _decode_batch.decode(body)
    except msgspec.DecodeError as exc:
        raise UserInputError(f"not a result batch ({{\"results\": [{{\"reply_subject\", \"result\"}}]}}): {exc}") \
            from None
    if not batch.results:
        raise UserInputError("results is empty")
    if len(batch.results) > MAX_BATCH:
        raise TooLarge(f"{len(batch.results)} results in one request; at most {MAX_BATCH}: send fewer per request")
    return await run_in_threadpool(_accept, request, who, job_id, batch.results)


@with_db
def _accept(request: Request, who: Principal, job_id: int, items: list[_ResultItem]) -> dict:
    job = _job(job_id, who, running=True)
    replies = [item.reply_subject for item in items]
    _check_replies(job_id, replies)
    runtime = runtime_of(request)
    leased = leases.leases_of(runtime.redis, job_id, who.name, replies)
    # each result's span: the child of the caller's span for its task if it says so, else of the hand-out
    spans = [tracing.start("jetpipe.gateway.result", parent=tracing.first_valid(item.traceparent, lease.trace),
                           attributes={"jetpipe.job_id": job_id, "jetpipe.service": who.name})
             for item, lease in zip(items, leased, strict=True)]
    try:
        seqs = runtime.runner.run(gateway_of(request).publish_results(job_id, job.pipeline.slug, [
            (item.reply_subject, bytes(item.result), lease.token, tracing.traceparent(span))
            for item, lease, span in zip(items, leased, spans, strict=True)]), timeout=LOOP_TIMEOUT_S)
    finally:
        tracing.end(spans)
    log.info("job=%s gateway: %s returned %s result(s)", job_id, who.name, len(items))
    _seen(runtime, who, job, returned=len(items))
    # task_id: where the result waits in PIPELINE_RESULTS (the reference gives its Celery task's id)
    return {"status": "accepted", "job_id": job_id, "results_queued": len(items),
            "tasks": [{"reply_subject": reply, "status": "queued", "task_id": f"{names.RESULTS_STREAM}:{seq}"}
                      for reply, seq in zip(replies, seqs, strict=True)]}


async def _read_limited(request: Request, limit: int) -> bytes:
    """The body, read as it arrives; 413 as soon as it is larger than `limit` (nothing of it is used)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {int(declared)} bytes is over the {limit}-byte limit "
                                 "(PIPELINE_WEB_MAX_BODY_MB): send fewer results per request")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body is over the {limit}-byte limit (PIPELINE_WEB_MAX_BODY_MB): "
                                     "send fewer results per request")
        chunks.append(chunk)
    return b"".join(chunks)


def _seen(runtime, who: Principal, job: Job, *, reserved: int = 0, returned: int = 0) -> None:
    try:
        presence.service_seen(runtime.redis, who.name, pipeline=job.pipeline.slug, job_id=job.id,
                              reserved=reserved, returned=returned)
    except Exception as exc:  # noqa: BLE001 - bookkeeping for `health`; the request itself succeeded
        log.debug("gateway: could not record %s's request: %s", who.name, exc)
