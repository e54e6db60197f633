"""The dashboard: server-rendered pages (Jinja2, autoescaped: text from services and job names is shown
literally, never as markup), kept live by a little plain JavaScript that polls the JSON API. Forms that
change something carry the CSRF value (see auth.py) and go through the same functions as the CLI."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote, urlsplit

import jinja2
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException

import models
from models import DEFAULT_PROJECT, JobStatus
from pipeline import fairshare, names
from pipeline.core import scheduling, webhooks
from pipeline.core.manifests import Row
from pipeline.core.registry import list_pipelines, register_pipeline
from pipeline.errors import Forbidden, NothingToDo, UserInputError
from pipeline.infra import dlq
from pipeline.ops import actions, bulk
from pipeline.ops.health import build_report
from pipeline.ops.job_views import (
    failed_images,
    get_job,
    job_summaries,
    job_summary,
    list_jobs,
    pipeline_taxa,
    retried_as,
    status_counts,
    taxon_counts,
)
from pipeline.ops.sources import uploaded_images, url_lines
from pipeline.schemas import decode_pipeline_spec
from pipeline.web.api import create_and_start, visible
from pipeline.web.auth import CSRF_COOKIE, SESSION_COOKIE, SESSION_S, Principal, csrf_ok, new_csrf_value
from pipeline.web.deps import allowed, principal_of, runtime_of, with_db

router = APIRouter(include_in_schema=False)
READ = Depends(allowed("read", page=True))
WRITE = Depends(allowed("write", page=True))
READ_ALL = Depends(allowed("read", page=True, everywhere=True))  # spans every project
WRITE_ALL = Depends(allowed("write", page=True, everywhere=True))
PAGE_SIZE = 50
FAILURES_PER_PAGE = 50
TAXA_SHOWN = 30

_templates = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                                autoescape=True, undefined=jinja2.StrictUndefined)


def render(request: Request, template: str, http_status: int = 200, **context) -> HTMLResponse:
    """A page; it carries the CSRF value its forms submit (a new one is set as a cookie if missing)."""
    csrf = request.cookies.get(CSRF_COOKIE) or new_csrf_value()
    who = principal_of(request)
    public = request.app.state.settings.web_public_url
    html = _templates.get_template(template).render(
        request=request, who=who, can_write=bool(who and who.may("write")), csrf=csrf,
        base_url=public.rstrip("/") + "/" if public else str(request.base_url),  # for the copyable commands
        logged_in=bool(request.cookies.get(SESSION_COOKIE)), **context)
    response = HTMLResponse(html, status_code=http_status)
    if request.cookies.get(CSRF_COOKIE) != csrf:
        response.set_cookie(CSRF_COOKIE, csrf, httponly=True, samesite="strict", secure=_https(request))
    return response


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    return render(request, "error.html", http_status=status, status_code=status, message=message)


async def checked_form(request: Request) -> FormData:
    """The posted form, if its CSRF value matches the cookie's; else 403. A field may be as large as a request
    may be (PIPELINE_WEB_MAX_BODY_MB: 100,000 pasted URLs are about 6 MB); files are spooled to disk."""
    limit = int(request.app.state.settings.web_max_body_mb * 1024 * 1024)
    try:
        form = await request.form(max_part_size=limit)
    except MultiPartException as exc:
        raise UserInputError(f"the form could not be read: {exc.message}") from None
    submitted = form.get("csrf")
    if not csrf_ok(request.cookies.get(CSRF_COOKIE), submitted if isinstance(submitted, str) else None):
        raise HTTPException(403, "the form has expired or came from another site: reload the page and try again")
    return form


def _safe_next(path: str | None) -> str:
    """Only a path on this site (never another host) to go back to after logging in."""
    if not path or not path.startswith("/") or path.startswith("//") or urlsplit(path).netloc:
        return "/"
    return path


# ---- log in and out --------------------------------------------------------------------------------------
@router.get("/login")
def login_form(request: Request, next: str = "/"):  # noqa: A002
    return render(request, "login.html", next=_safe_next(next), failed=False)


@router.post("/login")
async def login(request: Request):
    form = await checked_form(request)
    tokens = request.app.state.tokens
    who = tokens.lookup(str(form.get("token", "")))
    target = _safe_next(str(form.get("next", "/")))
    if who is None or who.role == "service":
        request.app.state.throttle.failed(request.client.host if request.client else "?")
        return render(request, "login.html", http_status=401, next=target, failed=True)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(SESSION_COOKIE, tokens.session_cookie(who), max_age=SESSION_S, httponly=True,
                        samesite="strict", secure=_https(request))
    return response


def _https(request: Request) -> bool:
    """Served over https, here or at a proxy that says so: cookies then go over https only."""
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"


@router.post("/logout")
async def logout(request: Request):
    await checked_form(request)
    session = request.app.state.tokens.session_of(request.cookies.get(SESSION_COOKIE))
    if session is not None:  # the cookie is dead on the server too, not only deleted in this browser
        session_id, expiry = session
        ttl = max(1, expiry - int(time.time()))
        client = runtime_of(request).redis
        await run_in_threadpool(client.set, names.web_session_revoked_key(session_id), "1", ex=ttl)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


# ---- jobs ------------------------------------------------------------------------------------------------
@router.get("/")
@with_db
def jobs_page(request: Request, status: str = "", pipeline: str = "", project: str = "", q: str = "",
              before: int | None = None, who: Principal = READ):
    return jobs_page_with(request, who, status=None, filters={"status": status, "pipeline": pipeline,
                                                               "project": project, "q": q}, before=before)


def jobs_page_with(request: Request, who: Principal, *, status: int | None, filters: dict | None = None,
                   before: int | None = None, form_error: str | None = None, typed: dict | None = None):
    """The jobs page; after a refused new-job form, with its reason and the form as it was typed."""
    filters = filters or {"status": "", "pipeline": "", "project": "", "q": ""}
    projects = visible(who, [filters["project"]] if filters["project"] else None)
    rows = list_jobs(statuses=[filters["status"]] if filters["status"] else (), pipeline=filters["pipeline"] or None,
                     search=filters["q"] or None, before_id=before, limit=PAGE_SIZE, projects=projects)
    default_project = sorted(who.projects)[0] if who.projects else DEFAULT_PROJECT
    typed = typed or {"pipeline": "", "name": "", "urls": "", "project": default_project, "priority": "normal",
                      "dispatch_mode": "async_api"}
    return render(request, "jobs.html", http_status=status or 200, jobs=job_summaries(rows),
                  counts=status_counts(projects), pipelines=list_pipelines(), projects=_projects(who),
                  priorities=list(fairshare.PRIORITIES), form_error=form_error, typed=typed,
                  next_before=rows[-1].id if len(rows) == PAGE_SIZE else None, **filters)


def _projects(who: Principal) -> list[dict]:
    return [p for p in scheduling.list_projects() if who.may_see(p["name"])]


@router.post("/jobs")
async def create_job_form(request: Request, who: Principal = WRITE):
    """A job from the form: pasted URLs and/or an uploaded file of them (read as the API reads one). Bad input
    shows the jobs page again with the reason and what was typed, not a bare error page."""
    form = await checked_form(request)
    upload = form.get("urls_file")  # starlette's UploadFile: the form parser makes that class, not FastAPI's
    typed = {key: str(form.get(key) or "") for key in ("pipeline", "name", "urls", "project", "priority",
                                                        "dispatch_mode")}
    urls: Iterable[str | Row] = url_lines(typed["urls"].splitlines())
    if isinstance(upload, UploadFile) and upload.filename:
        urls = itertools.chain(urls, uploaded_images(upload.file, upload.filename))

    def create():
        with models.thread_connection():
            return create_and_start(request, who, typed["pipeline"], urls, typed["name"] or None,
                                    typed["dispatch_mode"] or "async_api", project=typed["project"].strip() or None,
                                    priority=typed["priority"] or "normal")

    try:
        job = await run_in_threadpool(create)
    except UserInputError as exc:
        reason, status = str(exc), 403 if isinstance(exc, Forbidden) else 400

        def again():
            with models.thread_connection():
                return jobs_page_with(request, who, form_error=reason, typed=typed, status=status)

        return await run_in_threadpool(again)
    return RedirectResponse(f"/jobs/{job['id']}", status_code=303)


@router.get("/jobs/{job_id}")
@with_db
def job_page(request: Request, job_id: int, after: int = 0, who: Principal = READ):
    job = get_job(job_id, who.projects)
    if job is None:
        return error_page(request, 404, f"no job {job_id}")
    failures = failed_images(job_id, FAILURES_PER_PAGE, after_image=after)
    return render(request, "job.html", job=job_summary(job), failures=failures, after=after,
                  retried_as=retried_as(job_id), taxa=taxon_counts(job_id, limit=TAXA_SHOWN),
                  samples=(job.progress or {}).get("samples", []), webhooks=webhooks.of_job(job_id),
                  next_after=failures[-1]["image_id"] if len(failures) == FAILURES_PER_PAGE else None,
                  terminal=job.is_terminal)


@router.post("/jobs/{job_id}/cancel")
async def cancel_form(request: Request, job_id: int, who: Principal = WRITE):
    await checked_form(request)
    await _act(actions.cancel, request, job_id, who)
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


@router.post("/jobs/{job_id}/pause")
async def pause_form(request: Request, job_id: int, who: Principal = WRITE):
    form = await checked_form(request)
    await _act(actions.pause, request, job_id, who, reason=str(form.get("reason") or "").strip() or None)
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


@router.post("/jobs/{job_id}/resume")
async def resume_form(request: Request, job_id: int, who: Principal = WRITE):
    await checked_form(request)
    await _act(actions.resume, request, job_id, who)
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


async def _act(action, request: Request, job_id: int, who: Principal, **options) -> None:
    """`action(runtime, job_id, by=…, projects=…)`; a job that changed meanwhile is fine: the page shows how."""
    def act():
        with models.thread_connection():
            try:
                action(runtime_of(request), job_id, by=who.name, projects=who.projects, **options)
            except NothingToDo:
                pass

    await run_in_threadpool(act)


@router.post("/jobs/{job_id}/retry-failed")
async def retry_form(request: Request, job_id: int, who: Principal = WRITE):
    await checked_form(request)

    def retry():
        with models.thread_connection():
            try:
                return actions.retry_failed(runtime_of(request), job_id, by=who.name, projects=who.projects).id
            except NothingToDo:
                return job_id

    target = await run_in_threadpool(retry)
    return RedirectResponse(f"/jobs/{target}", status_code=303)


# ---- bulk actions ----------------------------------------------------------------------------------------
BULK_FIELDS = ("action", "project", "pipeline", "status", "name", "older_than", "reason")


def _bulk_filter(fields: dict[str, str], ids: tuple[int, ...] = ()) -> bulk.Filter:
    return bulk.Filter(projects=(fields["project"],) if fields["project"] else (),
                       pipelines=(fields["pipeline"],) if fields["pipeline"] else (),
                       statuses=(fields["status"],) if fields["status"] else (), name=fields["name"] or None,
                       older_than_s=bulk.parse_age(fields["older_than"]) if fields["older_than"] else None, ids=ids)


@router.get("/bulk")
@with_db
def bulk_page(request: Request, who: Principal = WRITE):
    fields = {key: str(request.query_params.get(key, "")).strip() for key in BULK_FIELDS}
    plan = selection = None
    if fields["action"]:
        selection = _bulk_filter(fields)
        plan = bulk.plan(fields["action"], selection, scope=who.projects)
    return render(request, "bulk.html", form=fields, actions=bulk.ACTIONS, projects=_projects(who),
                  pipelines=list_pipelines(), statuses=JobStatus.ALL, plan=plan, done=None,
                  filter_text=selection.describe() if selection else "")


@router.post("/bulk")
async def bulk_form(request: Request, who: Principal = WRITE):
    """Apply a bulk action to the jobs the confirmation page listed (and that the filter still picks)."""
    form = await checked_form(request)
    fields = {key: str(form.get(key) or "").strip() for key in BULK_FIELDS}
    try:
        ids = tuple(int(value) for value in form.getlist("id") if isinstance(value, str))
    except ValueError:
        raise UserInputError("the confirmed job ids are not numbers") from None
    if not ids:
        raise UserInputError("no job was confirmed: show what would change first")

    def apply():
        with models.thread_connection():
            return bulk.apply(runtime_of(request), fields["action"], _bulk_filter(fields, ids), by=who.name,
                              scope=who.projects, reason=fields["reason"] or None)

    done = await run_in_threadpool(apply)
    with models.thread_connection():
        return render(request, "bulk.html", form=fields, actions=bulk.ACTIONS, projects=_projects(who),
                      pipelines=list_pipelines(), statuses=JobStatus.ALL, plan=None, done=done, filter_text="")


# ---- health, dead letters, pipelines ---------------------------------------------------------------------
@router.get("/health")
@with_db
def health_page(request: Request, _=READ_ALL):
    runtime = runtime_of(request)
    _, report = build_report(runtime.settings, runtime.runner)
    return render(request, "health.html", report=report)


@router.get("/dlq")
def dlq_page(request: Request, _=READ_ALL):
    dead = [d.as_dict() for d in dlq.list_dead(runtime_of(request).redis)]
    return render(request, "dlq.html", messages=dead)


@router.post("/dlq/replay")
async def dlq_replay_form(request: Request, _=WRITE_ALL):
    form = await checked_form(request)
    ids = {value for value in form.getlist("id") if isinstance(value, str)}
    if not ids and not form.get("all"):
        raise UserInputError("choose the messages to replay")
    runtime = runtime_of(request)
    await run_in_threadpool(dlq.replay, runtime.broker, runtime.redis, None if form.get("all") else ids)
    return RedirectResponse("/dlq", status_code=303)


@router.get("/pipelines")
@with_db
def pipelines_page(request: Request, who: Principal = READ):
    pipelines = list_pipelines()
    taxa = {p["slug"]: pipeline_taxa(p["slug"]) for p in pipelines} if who.projects is None else {}
    return render(request, "pipelines.html", pipelines=pipelines, taxa=taxa)


@router.post("/pipelines")
async def register_form(request: Request, _=WRITE_ALL):
    form = await checked_form(request)
    spec = decode_pipeline_spec(str(form.get("spec", "")).encode(), source="the form")

    def register():
        with models.thread_connection():
            register_pipeline(spec)

    await run_in_threadpool(register)
    return RedirectResponse(f"/pipelines#{quote(spec.slug)}", status_code=303)


@router.get("/favicon.ico")
def favicon() -> Response:
    return Response(status_code=204)
