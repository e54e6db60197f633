"""The JSON API, `/api/v1/…`: what the CLI does, over HTTP, through the same functions. OpenAPI docs at
`/api/docs`. Errors are `{"error": "…"}` with the status that says what kind: 400 bad input, 401 no
credentials, 403 not allowed, 404 no such thing, 503 a dependency unreachable."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

import models
from models import DispatchMode
from pipeline.core import scheduling, unsaved
from pipeline.core.image_policy import ImagePolicy
from pipeline.core.manifests import Row
from pipeline.core.registry import existing_pipeline, list_pipelines, register_pipeline
from pipeline.errors import NotFound, NothingToDo, UserInputError
from pipeline.infra import backlog, dlq
from pipeline.ops import actions, bulk, export, result_files, schedule
from pipeline.ops.health import build_report
from pipeline.ops.job_views import (
    failed_images,
    gallery,
    job_logs,
    job_summaries,
    job_summary,
    list_jobs,
    pipeline_taxa,
    status_counts,
    taxon_counts,
)
from pipeline.ops.sources import image_suffixes, manifest_from_objects, uploaded_images, url_lines
from pipeline.schemas import decode_pipeline_spec
from pipeline.web import thumbnails
from pipeline.web.auth import Principal
from pipeline.web.deps import allowed, runtime_of, with_db

router = APIRouter(prefix="/api/v1")
READ = Depends(allowed("read"))
WRITE = Depends(allowed("write"))
READ_ALL = Depends(allowed("read", everywhere=True))  # spans every project: not for a project-limited token
WRITE_ALL = Depends(allowed("write", everywhere=True))

#: Most jobs or log lines one request lists.
MAX_PAGE = 500
#: Image URLs one JSON job request may name (a file upload has no such limit: it is streamed).
MAX_URLS_IN_BODY = 100_000


class JobRequest(BaseModel):
    pipeline: str = Field(description="slug of a registered pipeline")
    urls: list[str] = Field(default_factory=list, max_length=MAX_URLS_IN_BODY,
                            description="image URLs (file://, http://, https://, s3://) or absolute paths; an "
                            "s3://bucket/prefix/ stands for every image under it (PIPELINE_S3_BUCKETS only)")
    images: list[dict] = Field(default_factory=list, max_length=MAX_URLS_IN_BODY,
                               description="a manifest: an image an object, {url, deployment, timestamp (ISO 8601 "
                               "with a time zone), latitude, longitude, and fields of your own}")
    reuse: bool = Field(default=True, description="keep the results an earlier job of the pipeline's current version "
                        "saved for the same images (not sent to a service again)")
    suffixes: list[str] | None = Field(default=None, description="which objects of an s3:// prefix are images, by "
                                       "name ending (default .png, .jpg, .jpeg, .tif, .tiff, .bmp, .webp)")
    name: str | None = None
    dispatch_mode: DispatchMode = DispatchMode.ASYNC_API
    pickup_timeout_s: float | None = Field(default=None, gt=0, description="default PIPELINE_JOB_PICKUP_TIMEOUT")
    deadline_s: float | None = Field(default=None, gt=0, description="fail images still pending this long from now")
    project: str | None = Field(default=None, description="default `default` (a project-limited token: its project)")
    priority: int | str = Field(default=0, description="low, normal, high, urgent or a whole number from -10 to 10")
    notify_url: str | None = Field(default=None, description="POSTed a signed JSON summary when the job ends")
    notify_secret: str | None = Field(default=None, description="signs those deliveries (16 characters or more); "
                                      "never shown again")
    notify_events: list[str] | None = Field(default=None, description="what notify_url is told of: started, failing "
                                            "(its failed images passed the failure threshold), ended (the default)")


class ReplayRequest(BaseModel):
    ids: list[str] = Field(default_factory=list, description="ids from GET /api/v1/dlq")
    all: bool = False


class PauseRequest(BaseModel):
    reason: str | None = Field(default=None, max_length=500, description="shown in the job log and on its page")


class PriorityRequest(BaseModel):
    priority: int | str = Field(description="low, normal, high, urgent or a whole number from -10 to 10")


class BulkRequest(BaseModel):
    action: str = Field(description=f"one of {', '.join(bulk.ACTIONS)}")
    dry_run: bool = Field(default=True, description="list what would change, change nothing (the default)")
    projects: list[str] = Field(default_factory=list)
    pipelines: list[str] = Field(default_factory=list)
    statuses: list[str] = Field(default_factory=list)
    name: str | None = Field(default=None, description="a pattern of job names: * any text, ? one character")
    older_than: str | None = Field(default=None, description="created at least this long ago: 90, 30m, 12h, 7d")
    ids: list[int] = Field(default_factory=list, max_length=bulk.MAX_JOBS)
    reason: str | None = Field(default=None, max_length=500, description="for pause")


class WeightRequest(BaseModel):
    weight: float = Field(description="its share of the services beside other projects' (default 1)")


def create_and_start(request: Request, who: Principal, pipeline: str, urls: Iterable[str | Row],
                     name: str | None,
                     mode: str, *, project: str | None = None, **limits) -> dict:
    """`cli.py enqueue-job`, for the API and the pages: the new job's summary. Its images are held to this
    web server's image policy, as a job asked for over the network; its project must be one `who` may use."""
    job = actions.enqueue(runtime_of(request), pipeline, urls, name=name, dispatch_mode=mode, over_network=True,
                          policy=ImagePolicy.from_settings(request.app.state.settings),
                          project=who.project_for_new_job(project), **limits)
    return job_summary(job)


def visible(who: Principal, requested: list[str] | None = None) -> list[str] | None:
    """The projects a listing shows: those asked for (all if none) that `who` may see."""
    if who.projects is None:
        return requested or None
    return [p for p in requested if p in who.projects] if requested else sorted(who.projects)


# ---- jobs ------------------------------------------------------------------------------------------------
@router.get("/jobs", summary="List jobs, newest first")
@with_db
def api_jobs(status: list[str] = Query(default=[]), pipeline: str | None = None,
             project: list[str] = Query(default=[], description="only jobs of these projects"),
             q: str | None = Query(default=None, description="part of the job's name"),
             before: int | None = Query(default=None, description="only jobs with a smaller id (paging)"),
             limit: int = Query(default=50, ge=1, le=MAX_PAGE), who: Principal = READ) -> dict:
    projects = visible(who, project)
    rows = list_jobs(statuses=status, pipeline=pipeline, search=q, before_id=before, limit=limit, projects=projects)
    return {"jobs": job_summaries(rows), "counts": status_counts(projects),
            "next_before": rows[-1].id if len(rows) == limit else None}


@router.post("/jobs", status_code=201, summary="Create a job over image URLs and start it")
@with_db
def api_create_job(body: JobRequest, request: Request, who: Principal = WRITE) -> dict:
    images: Iterable[str | Row] = itertools.chain(url_lines(body.urls), manifest_from_objects(body.images))
    return create_and_start(request, who, body.pipeline, images, body.name, body.dispatch_mode,
                            pickup_timeout_s=body.pickup_timeout_s, deadline_s=body.deadline_s,
                            project=body.project, priority=body.priority, suffixes=image_suffixes(body.suffixes),
                            reuse=body.reuse,
                            notify=(body.notify_url, body.notify_secret or "", body.notify_events or ())
                            if body.notify_url else None)


@router.post("/jobs/from-file", status_code=201,
             summary="Create a job from an uploaded file: URLs one a line, or a manifest (.csv, .jsonl)")
@with_db
def api_create_job_from_file(request: Request, pipeline: str = Form(), name: str | None = Form(default=None),
                             dispatch_mode: DispatchMode = Form(default=DispatchMode.ASYNC_API),
                             project: str | None = Form(default=None), priority: str = Form(default="normal"),
                             urls_file: UploadFile = File(), who: Principal = WRITE) -> dict:
    return create_and_start(request, who, pipeline, uploaded_images(urls_file.file, urls_file.filename), name,
                            dispatch_mode, project=project or None, priority=priority)


@router.get("/jobs/{job_id}", summary="A job: status, stages, counters, throughput, first failures")
@with_db
def api_job(job_id: int, who: Principal = READ) -> dict:
    return actions.job_detail(job_id, projects=who.projects)


@router.post("/jobs/{job_id}/cancel", summary="Cancel a job (its tasks leave NATS; it ends REVOKED)")
@with_db
def api_cancel(job_id: int, request: Request, who: Principal = WRITE) -> dict:
    try:
        return {"status": actions.cancel(runtime_of(request), job_id, by=who.name, projects=who.projects)}
    except NothingToDo as exc:
        return {"status": actions.existing_job(job_id).status, "nothing_to_do": str(exc)}


@router.post("/jobs/{job_id}/pause", summary="Pause a job: it hands out no new task; those in flight finish")
@with_db
def api_pause(job_id: int, request: Request, body: PauseRequest | None = None, who: Principal = WRITE) -> dict:
    return _changed(job_id, lambda: actions.pause(runtime_of(request), job_id, by=who.name,
                                                  reason=body.reason if body else None, projects=who.projects))


@router.post("/jobs/{job_id}/resume", summary="Resume a paused job (its deadline moves on by the paused time)")
@with_db
def api_resume(job_id: int, request: Request, who: Principal = WRITE) -> dict:
    return _changed(job_id, lambda: actions.resume(runtime_of(request), job_id, by=who.name, projects=who.projects))


@router.post("/jobs/{job_id}/priority", summary="Change a running job's priority")
@with_db
def api_priority(job_id: int, body: PriorityRequest, request: Request, who: Principal = WRITE) -> dict:
    return _changed(job_id, lambda: actions.set_priority(runtime_of(request), job_id, body.priority, by=who.name,
                                                         projects=who.projects))


def _changed(job_id: int, change: Callable[[], models.Job]) -> dict:
    """The job's summary after `change`; with `nothing_to_do` saying why when there was nothing to change."""
    try:
        return job_summary(change())
    except NothingToDo as exc:
        return {**job_summary(actions.existing_job(job_id)), "nothing_to_do": str(exc)}


@router.post("/jobs/bulk", summary="Cancel, retry-failed, pause or resume every job a filter picks (dry run first)")
@with_db
def api_bulk(body: BulkRequest, request: Request, who: Principal = WRITE) -> dict:
    selection = bulk.Filter(projects=tuple(body.projects), pipelines=tuple(body.pipelines),
                            statuses=tuple(body.statuses), name=body.name, ids=tuple(body.ids),
                            older_than_s=bulk.parse_age(body.older_than) if body.older_than else None)
    outcomes = (bulk.plan(body.action, selection, scope=who.projects) if body.dry_run else
                bulk.apply(runtime_of(request), body.action, selection, by=who.name, scope=who.projects,
                           reason=body.reason))
    return {"action": body.action, "dry_run": body.dry_run, "filter": selection.describe(),
            "jobs": [o.as_dict() for o in outcomes], "changed": 0 if body.dry_run else sum(o.ok for o in outcomes)}


@router.post("/jobs/{job_id}/retry-failed", summary="A new job over the failed images of an ended job")
@with_db
def api_retry_failed(job_id: int, request: Request, who: Principal = WRITE):
    try:
        retry = actions.retry_failed(runtime_of(request), job_id, by=who.name, projects=who.projects)
    except NothingToDo as exc:
        return {"nothing_to_do": str(exc)}
    return JSONResponse({**job_summary(retry), "retry_of": job_id}, status_code=201)


@router.get("/jobs/{job_id}/failures", summary="Failed images with their reasons, by image id")
@with_db
def api_failures(job_id: int, after: int = Query(default=0, description="image id to continue after"),
                 limit: int = Query(default=100, ge=1, le=MAX_PAGE), who: Principal = READ) -> dict:
    actions.existing_job(job_id, who.projects)
    rows = failed_images(job_id, limit, after_image=after)
    return {"failures": rows, "next_after": int(rows[-1]["image_id"] or 0) if len(rows) == limit else None}


@router.get("/jobs/{job_id}/taxa", summary="The job's detections by classified taxon, most first, with mean score")
@with_db
def api_taxa(job_id: int, limit: int = Query(default=100, ge=1, le=MAX_PAGE), who: Principal = READ) -> dict:
    actions.existing_job(job_id, who.projects)
    return {"taxa": taxon_counts(job_id, limit=limit)}


@router.get("/jobs/{job_id}/images", summary="A page of the job's images with their boxes and top taxon (by key)")
@with_db
def api_images(job_id: int, after: int = Query(default=0, description="image id to continue after"),
               limit: int = Query(default=48, ge=1, le=MAX_PAGE),
               taxon: str | None = Query(default=None, description="only images with a detection of this taxon"),
               min_score: float | None = Query(default=None, ge=0, le=1, description="... scoring at least this"),
               failed: bool = Query(default=False, description="only failed images"), who: Principal = READ) -> dict:
    actions.existing_job(job_id, who.projects)
    return gallery(job_id, after=after, limit=limit, taxon=taxon or None, min_score=min_score, failed=failed)


@router.get("/jobs/{job_id}/images/{image_id}/{kind}", summary="A thumbnail or a screen-sized picture of an image",
            response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
async def api_picture(job_id: int, image_id: int, kind: str, request: Request, who: Principal = READ) -> Response:
    if kind not in thumbnails.SIZES:
        raise NotFound(f"no picture {kind!r} (thumbnail or full)")

    def make() -> thumbnails.Picture:
        with models.thread_connection():
            actions.existing_job(job_id, who.projects)
            url = (models.JobImage.select(models.SourceImage.url).join(models.SourceImage)
                   .where((models.JobImage.job == job_id) & (models.JobImage.image == image_id)).scalar())
        if url is None:
            raise NotFound(f"image {image_id} is not part of job {job_id}")
        return thumbnails.picture(url, kind, ImagePolicy.from_settings(request.app.state.settings))

    made = await run_in_threadpool(make)
    return Response(made.jpeg, media_type="image/jpeg", headers={
        "X-Image-Size": f"{made.width}x{made.height}", "Cache-Control": "private, max-age=3600"})


@router.get("/jobs/{job_id}/logs", summary="The job's log, oldest first")
@with_db
def api_logs(job_id: int, after: int = Query(default=0, description="log line id to continue after"),
             limit: int = Query(default=200, ge=1, le=MAX_PAGE), who: Principal = READ) -> dict:
    actions.existing_job(job_id, who.projects)
    lines = job_logs(job_id, after_id=after, limit=limit)
    return {"lines": [{"id": line.id, "at": line.created_at.isoformat(timespec="seconds") + "Z",
                       "level": line.level, "message": line.message} for line in lines],
            "last": lines[-1].id if lines else after}


@router.get("/jobs/{job_id}/results", summary="Export the job's results (streamed)",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {}, "text/csv": {}}}})
async def api_results(job_id: int, format: str = Query(default="jsonl",  # noqa: A002
                                                       pattern="^(jsonl|csv|parquet|camtrap-dp)$"),
                      who: Principal = READ) -> Response:
    filename = f"job-{job_id}-results.{export.ENDINGS[format]}"
    disposition = {"Content-Disposition": f'attachment; filename="{filename}"'}
    if format in export.FILE_FORMATS:  # written to a temporary file first, then sent and removed
        path = await run_in_threadpool(_checked_file, job_id, format, who)
        return FileResponse(path, media_type=export.MEDIA_TYPES[format], headers=disposition,
                            background=BackgroundTask(os.remove, path))
    chunks = await run_in_threadpool(_checked_export, job_id, format, who)
    return StreamingResponse(_stream(chunks), media_type=export.MEDIA_TYPES[format], headers=disposition)


def _checked_file(job_id: int, fmt: str, who: Principal) -> str:
    handle, path = tempfile.mkstemp(prefix=f"jetpipe-job-{job_id}-", suffix=f".{export.ENDINGS[fmt]}")
    os.close(handle)
    try:
        with models.thread_connection():
            actions.existing_job(job_id, who.projects)
            result_files.write_file(job_id, fmt, path)
    except BaseException:
        os.remove(path)
        raise
    return path


def _checked_export(job_id: int, fmt: str, who: Principal) -> Iterator[str]:
    with models.thread_connection():
        actions.existing_job(job_id, who.projects)
        return export.export(job_id, fmt)  # raises NotFound before any byte is sent


async def _stream(chunks: Iterator[str]) -> AsyncIterator[bytes]:
    while True:
        batch = await run_in_threadpool(_take, chunks)
        if not batch:
            return
        yield "".join(batch).encode("utf-8")


def _take(chunks: Iterator[str], count: int = 64) -> list[str]:
    with models.thread_connection():  # each batch may run on another pool thread
        return list(itertools.islice(chunks, count))


# ---- health, pipelines, dead letters ---------------------------------------------------------------------
@router.get("/health", summary="What `cli.py health` reports (status: healthy, degraded, unreachable)")
@with_db
def api_health(request: Request, _=READ_ALL) -> dict:
    runtime = runtime_of(request)
    _, report = build_report(runtime.settings, runtime.runner)
    return report


@router.get("/projects", summary="Projects with their weights and running jobs")
@with_db
def api_projects(who: Principal = READ) -> dict:
    return {"projects": [p for p in scheduling.list_projects() if who.may_see(p["name"])]}


@router.put("/projects/{name}/weight", summary="Set a project's share weight (created if new)")
@with_db
def api_project_weight(name: str, body: WeightRequest, request: Request, _=WRITE_ALL) -> dict:
    project, told = scheduling.set_project_weight(runtime_of(request), name, body.weight)
    return {"name": project.name, "weight": project.weight, "running_jobs_told": told}


@router.get("/pipelines/{slug}/schedule", summary="Which job of the pipeline a service should serve next, and shares")
@with_db
def api_schedule(slug: str, request: Request, who: Principal = READ) -> dict:
    answer = schedule.of_pipeline(runtime_of(request), slug)
    answer["jobs"] = [j for j in answer["jobs"] if who.may_see(j["project"])]
    return answer


@router.get("/pipelines/{slug}/stats", summary="A pipeline's backlog for autoscalers: tasks waiting and in flight, "
            "the oldest waiting task's age, services at work")
@with_db
def api_pipeline_stats(slug: str, request: Request, _=READ_ALL) -> dict:
    existing_pipeline(slug)
    runtime = runtime_of(request)
    return backlog.backlogs(runtime.tasks, runtime.redis, pipeline=slug)[slug].as_dict()


@router.get("/pipelines/{slug}/taxa", summary="Detections by taxon across every job of a pipeline, most first")
@with_db
def api_pipeline_taxa(slug: str, limit: int = Query(default=100, ge=1, le=MAX_PAGE), _=READ_ALL) -> dict:
    existing_pipeline(slug)
    return {"pipeline": slug, "taxa": pipeline_taxa(slug, limit=limit)}


@router.get("/pipelines", summary="Registered pipelines and their algorithms")
@with_db
def api_pipelines(_=READ) -> dict:
    return {"pipelines": list_pipelines()}


PIPELINE_SPEC_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["slug", "name", "algorithms"], "example": {
        "slug": "moth-demo", "name": "Moth demo", "algorithms": [
            {"key": "blob-detector-v1", "name": "Dark blob detector", "task_type": "detection"}]}}}}}}


@router.post("/pipelines", summary="Register (or update) a pipeline from its JSON spec",
             openapi_extra=PIPELINE_SPEC_BODY)
async def api_register_pipeline(request: Request, _=WRITE_ALL) -> JSONResponse:
    body = await request.body()
    spec = decode_pipeline_spec(body, source="request body")

    def register() -> bool:
        with models.thread_connection():
            return register_pipeline(spec)

    created = await run_in_threadpool(register)
    return JSONResponse({"slug": spec.slug, "created": created, "algorithms": len(spec.algorithms)},
                        status_code=201 if created else 200)


class ParkedRequest(BaseModel):
    ids: list[int] = Field(default_factory=list, description="ids from GET /api/v1/parked")
    job_id: int | None = Field(default=None, description="every parked result of this job")
    all: bool = False


@router.get("/parked", summary="Result messages that could not be saved, parked after their attempts")
@with_db
def api_parked(job_id: int | None = Query(default=None, description="only this job's"), _=READ_ALL) -> dict:
    return {"parked": [p.as_dict() for p in unsaved.list_parked(job_id=job_id)]}


@router.post("/parked/replay", summary="Put parked results back to be saved (results of ended jobs are refused)")
@with_db
def api_parked_replay(body: ParkedRequest, request: Request, _=WRITE_ALL) -> dict:
    replayed, skipped = unsaved.replay(runtime_of(request), ids=body.ids or None, job_id=body.job_id, every=body.all)
    return {"replayed": replayed, "left_parked": skipped}


@router.post("/parked/drop", summary="Delete parked results for good (their images stay failed)")
@with_db
def api_parked_drop(body: ParkedRequest, _=WRITE_ALL) -> dict:
    return {"dropped": unsaved.drop(ids=body.ids or None, job_id=body.job_id, every=body.all)}


@router.get("/dlq", summary="Dramatiq's dead letters")
def api_dlq(request: Request, _=READ_ALL) -> dict:
    return {"messages": [d.as_dict() for d in dlq.list_dead(runtime_of(request).redis)]}


@router.post("/dlq/replay", summary="Send dead messages again with a fresh retry budget")
def api_dlq_replay(body: ReplayRequest, request: Request, _=WRITE_ALL) -> dict:
    if not body.ids and not body.all:
        raise UserInputError("name the messages to replay (ids) or set all")
    runtime = runtime_of(request)
    done = dlq.replay(runtime.broker, runtime.redis, None if body.all else set(body.ids))
    return {"replayed": [d.redis_id for d in done]}
