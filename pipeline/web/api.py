"""The JSON API, `/api/v1/…`: what the CLI does, over HTTP, through the same functions. OpenAPI docs at
`/api/docs`. Errors are `{"error": "…"}` with the status that says what kind: 400 bad input, 401 no
credentials, 403 not allowed, 404 no such thing, 503 a dependency unreachable."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterable, Iterator

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

import models
from models import DispatchMode
from pipeline.core import unsaved
from pipeline.core.image_policy import ImagePolicy
from pipeline.core.registry import list_pipelines, register_pipeline
from pipeline.errors import NothingToDo, UserInputError
from pipeline.infra import dlq
from pipeline.ops import actions, export
from pipeline.ops.health import build_report
from pipeline.ops.job_views import (
    failed_images,
    job_logs,
    job_summaries,
    job_summary,
    list_jobs,
    status_counts,
)
from pipeline.ops.sources import image_urls_from_upload, url_lines
from pipeline.schemas import decode_pipeline_spec
from pipeline.web.deps import allowed, runtime_of, with_db

router = APIRouter(prefix="/api/v1")
READ = Depends(allowed("read"))
WRITE = Depends(allowed("write"))

#: Most jobs or log lines one request lists.
MAX_PAGE = 500
#: Image URLs one JSON job request may name (a file upload has no such limit: it is streamed).
MAX_URLS_IN_BODY = 100_000


class JobRequest(BaseModel):
    pipeline: str = Field(description="slug of a registered pipeline")
    urls: list[str] = Field(description="image URLs (file://, http://, https://) or absolute paths",
                            max_length=MAX_URLS_IN_BODY)
    name: str | None = None
    dispatch_mode: DispatchMode = DispatchMode.ASYNC_API
    pickup_timeout_s: float | None = Field(default=None, gt=0, description="default PIPELINE_JOB_PICKUP_TIMEOUT")
    deadline_s: float | None = Field(default=None, gt=0, description="fail images still pending this long from now")


class ReplayRequest(BaseModel):
    ids: list[str] = Field(default_factory=list, description="ids from GET /api/v1/dlq")
    all: bool = False


def create_and_start(request: Request, pipeline: str, urls: Iterable[str], name: str | None, mode: str,
                     **limits) -> dict:
    """`cli.py enqueue-job`, for the API and the pages: the new job's summary. Its images are held to this
    web server's image policy, as a job asked for over the network."""
    job = actions.enqueue(runtime_of(request), pipeline, urls, name=name, dispatch_mode=mode, over_network=True,
                          policy=ImagePolicy.from_settings(request.app.state.settings), **limits)
    return job_summary(job)


# ---- jobs ------------------------------------------------------------------------------------------------
@router.get("/jobs", summary="List jobs, newest first")
@with_db
def api_jobs(status: list[str] = Query(default=[]), pipeline: str | None = None,
             q: str | None = Query(default=None, description="part of the job's name"),
             before: int | None = Query(default=None, description="only jobs with a smaller id (paging)"),
             limit: int = Query(default=50, ge=1, le=MAX_PAGE), _=READ) -> dict:
    rows = list_jobs(statuses=status, pipeline=pipeline, search=q, before_id=before, limit=limit)
    return {"jobs": job_summaries(rows), "counts": status_counts(),
            "next_before": rows[-1].id if len(rows) == limit else None}


@router.post("/jobs", status_code=201, summary="Create a job over image URLs and start it")
@with_db
def api_create_job(body: JobRequest, request: Request, _=WRITE) -> dict:
    return create_and_start(request, body.pipeline, url_lines(body.urls), body.name, body.dispatch_mode,
                            pickup_timeout_s=body.pickup_timeout_s, deadline_s=body.deadline_s)


@router.post("/jobs/from-file", status_code=201, summary="Create a job from an uploaded file of URLs, one a line")
@with_db
def api_create_job_from_file(request: Request, pipeline: str = Form(), name: str | None = Form(default=None),
                             dispatch_mode: DispatchMode = Form(default=DispatchMode.ASYNC_API),
                             urls_file: UploadFile = File(), _=WRITE) -> dict:
    return create_and_start(request, pipeline, image_urls_from_upload(urls_file.file, urls_file.filename), name,
                            dispatch_mode)


@router.get("/jobs/{job_id}", summary="A job: status, stages, counters, throughput, first failures")
@with_db
def api_job(job_id: int, _=READ) -> dict:
    return actions.job_detail(job_id)


@router.post("/jobs/{job_id}/cancel", summary="Cancel a job (its tasks leave NATS; it ends REVOKED)")
@with_db
def api_cancel(job_id: int, request: Request, _=WRITE) -> dict:
    try:
        return {"status": actions.cancel(runtime_of(request), job_id)}
    except NothingToDo as exc:
        return {"status": actions.existing_job(job_id).status, "nothing_to_do": str(exc)}


@router.post("/jobs/{job_id}/retry-failed", summary="A new job over the failed images of an ended job")
@with_db
def api_retry_failed(job_id: int, request: Request, _=WRITE):
    try:
        retry = actions.retry_failed(runtime_of(request), job_id)
    except NothingToDo as exc:
        return {"nothing_to_do": str(exc)}
    return JSONResponse({**job_summary(retry), "retry_of": job_id}, status_code=201)


@router.get("/jobs/{job_id}/failures", summary="Failed images with their reasons, by image id")
@with_db
def api_failures(job_id: int, after: int = Query(default=0, description="image id to continue after"),
                 limit: int = Query(default=100, ge=1, le=MAX_PAGE), _=READ) -> dict:
    actions.existing_job(job_id)
    rows = failed_images(job_id, limit, after_image=after)
    return {"failures": rows, "next_after": int(rows[-1]["image_id"] or 0) if len(rows) == limit else None}


@router.get("/jobs/{job_id}/logs", summary="The job's log, oldest first")
@with_db
def api_logs(job_id: int, after: int = Query(default=0, description="log line id to continue after"),
             limit: int = Query(default=200, ge=1, le=MAX_PAGE), _=READ) -> dict:
    actions.existing_job(job_id)
    lines = job_logs(job_id, after_id=after, limit=limit)
    return {"lines": [{"id": line.id, "at": line.created_at.isoformat(timespec="seconds") + "Z",
                       "level": line.level, "message": line.message} for line in lines],
            "last": lines[-1].id if lines else after}


@router.get("/jobs/{job_id}/results", summary="Export the job's results (streamed)",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {}, "text/csv": {}}}})
async def api_results(job_id: int, format: str = Query(default="jsonl", pattern="^(jsonl|csv)$"),  # noqa: A002
                      _=READ) -> StreamingResponse:
    chunks = await run_in_threadpool(_checked_export, job_id, format)
    filename = f"job-{job_id}-results.{format}"
    return StreamingResponse(_stream(chunks), media_type=export.MEDIA_TYPES[format],
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def _checked_export(job_id: int, fmt: str) -> Iterator[str]:
    with models.thread_connection():
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
def api_health(request: Request, _=READ) -> dict:
    runtime = runtime_of(request)
    _, report = build_report(runtime.settings, runtime.runner)
    return report


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
async def api_register_pipeline(request: Request, _=WRITE) -> JSONResponse:
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
def api_parked(job_id: int | None = Query(default=None, description="only this job's"), _=READ) -> dict:
    return {"parked": [p.as_dict() for p in unsaved.list_parked(job_id=job_id)]}


@router.post("/parked/replay", summary="Put parked results back to be saved (results of ended jobs are refused)")
@with_db
def api_parked_replay(body: ParkedRequest, request: Request, _=WRITE) -> dict:
    replayed, skipped = unsaved.replay(runtime_of(request), ids=body.ids or None, job_id=body.job_id, every=body.all)
    return {"replayed": replayed, "left_parked": skipped}


@router.post("/parked/drop", summary="Delete parked results for good (their images stay failed)")
@with_db
def api_parked_drop(body: ParkedRequest, _=WRITE) -> dict:
    return {"dropped": unsaved.drop(ids=body.ids or None, job_id=body.job_id, every=body.all)}


@router.get("/dlq", summary="Dramatiq's dead letters")
def api_dlq(request: Request, _=READ) -> dict:
    return {"messages": [d.as_dict() for d in dlq.list_dead(runtime_of(request).redis)]}


@router.post("/dlq/replay", summary="Send dead messages again with a fresh retry budget")
def api_dlq_replay(body: ReplayRequest, request: Request, _=WRITE) -> dict:
    if not body.ids and not body.all:
        raise UserInputError("name the messages to replay (ids) or set all")
    runtime = runtime_of(request)
    done = dlq.replay(runtime.broker, runtime.redis, None if body.all else set(body.ids))
    return {"replayed": [d.redis_id for d in done]}
