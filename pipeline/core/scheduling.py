"""A job's claim on the processing services: its project (and that project's weight), its priority, and
whether it is paused. The database holds them; the job's NATS consumer carries them for services to read
(its metadata, and a server-side pause where NATS can pause a consumer, 2.11 and later). The rule that
turns claims into an order is pipeline/fairshare.py.

Pausing holds a job's new tasks back and nothing else: tasks in flight finish and are saved, and every
idle-time verdict (lost images, the pickup deadline, the job's deadline) leaves the paused time out.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from models import (
    DEFAULT_PROJECT,
    DispatchMode,
    Job,
    JobStatus,
    Pipeline,
    Project,
    tuples,
    utcnow,
)
from pipeline import fairshare
from pipeline.core.joblog import job_log
from pipeline.errors import NotFound, NothingToDo, TransientError, UserInputError
from pipeline.infra.runtime import Runtime

log = logging.getLogger(__name__)

# ---- projects ---------------------------------------------------------------------------------------------
def project_for_job(name: str | None) -> Project:
    """The project a new job joins (created on first use, weight 1)."""
    name = fairshare.check_project_name(name or DEFAULT_PROJECT)
    Project.insert(name=name).on_conflict_ignore().execute()
    return Project.get(Project.name == name)


def set_project_weight(runtime: Runtime, name: str, weight: float) -> tuple[Project, int]:
    """Give project `name` (created if new) its share weight; its running jobs' consumers carry the new
    weight at once. (project, running jobs told)."""
    weight = fairshare.check_weight(weight)
    project = project_for_job(name)
    Project.update(weight=weight).where(Project.id == project.id).execute()
    project.weight = weight
    running = [job.id for job in Job.select(Job.id).where(
        (Job.project == project.id) & Job.status.in_(JobStatus.RUNNING))]
    for job_id in running:
        publish_claim(runtime, job_id)
    log.info("project %s: weight %s (%s running job(s) told)", name, weight, len(running))
    return project, len(running)


def list_projects() -> list[dict[str, Any]]:
    """Every project with its weight and its running and total jobs, by name."""
    import peewee

    running = peewee.fn.SUM(peewee.Case(None, [(Job.status.in_(JobStatus.RUNNING), 1)], 0))
    rows = (Project.select(Project.name, Project.weight, peewee.fn.COUNT(Job.id).alias("jobs"),
                           running.alias("running"))
            .join(Job, peewee.JOIN.LEFT_OUTER).group_by(Project.id, Project.name, Project.weight)
            .order_by(Project.name))
    return [{"name": name, "weight": weight, "jobs": jobs, "running": int(run or 0)}
            for name, weight, jobs, run in tuples(rows)]


# ---- claims -------------------------------------------------------------------------------------------------
def running_claims(pipeline_slugs: list[str] | None = None) -> list[tuple[fairshare.Claim, str, bool]]:
    """(claim, pipeline slug, paused) of every STARTED async job (of these pipelines), by job id."""
    query = (Job.select(Job, Pipeline, Project).join(Pipeline).switch(Job).join(Project)
             .where((Job.status == JobStatus.STARTED) & (Job.dispatch_mode == DispatchMode.ASYNC_API))
             .order_by(Job.id))
    if pipeline_slugs:
        query = query.where(Pipeline.slug.in_(pipeline_slugs))
    return [(claim_of(job), job.pipeline.slug, job.is_paused) for job in query]


def _job_with_project(job_id: int) -> Job:
    job = (Job.select(Job, Pipeline, Project).join(Pipeline).switch(Job).join(Project)
           .where(Job.id == job_id).get_or_none())
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def claim_of(job: Job) -> fairshare.Claim:
    """The job's claim; `job` read with its project (`Job.project` joined)."""
    return fairshare.Claim(job.id, job.project_name, job.priority or 0, job.project_weight)


def consumer_options(job_id: int) -> dict[str, Any]:
    """How the job's consumer is made: its metadata (the claim) and whether it starts paused."""
    job = _job_with_project(job_id)
    return {"metadata": fairshare.metadata_of(claim_of(job), paused=job.is_paused), "paused": job.is_paused}


def consumer_made(runtime: Runtime, job_id: int, pipeline_slug: str, *, server_paused: bool,
                  claim: dict[str, str]) -> None:
    """The job's consumer was just made, or found, paused or not and carrying `claim`: it follows the database
    (read again now: a pause, resume or new priority may have come in since; they write the database first,
    then the consumer, so one of the two writers sees the other's change)."""
    job = _job_with_project(job_id)
    wanted = fairshare.metadata_of(claim_of(job), paused=job.is_paused)
    if job.is_paused != server_paused:
        runtime.tasks.pause_job_consumer(job_id, pipeline_slug, paused=job.is_paused)
    if claim != wanted:
        runtime.tasks.set_job_claim(job_id, pipeline_slug, wanted)


def publish_claim(runtime: Runtime, job_id: int) -> bool:
    """Write the job's claim into its consumer (if it has one) and tell its services to list again; False
    when NATS could not be reached (the next dispatch or resume writes it)."""
    job = _job_with_project(job_id)
    slug = job.pipeline.slug
    try:
        if runtime.tasks.set_job_claim(job_id, slug, fairshare.metadata_of(claim_of(job), paused=job.is_paused)):
            runtime.tasks.announce_job(slug, job_id)
        return True
    except TransientError as exc:
        log.warning("job=%s could not write its claim to its consumer (%s)", job_id, exc)
        return False


def set_priority(runtime: Runtime, job_id: int, priority: int, *, by: str) -> None:
    job = _job_with_project(job_id)
    if job.is_terminal:
        raise NothingToDo(f"job {job_id} already ended {job.status}: its priority no longer matters")
    if (job.priority or 0) == priority:
        raise NothingToDo(f"job {job_id} already has priority {fairshare.priority_name(priority)}")
    Job.update(priority=priority, updated_at=utcnow()).where(Job.id == job_id).execute()
    job_log(job_id, logging.INFO, f"priority {fairshare.priority_name(job.priority)} -> "
                                  f"{fairshare.priority_name(priority)} (by {by})")
    publish_claim(runtime, job_id)


# ---- pause and resume -------------------------------------------------------------------------------------------
def pause(runtime: Runtime, job_id: int, *, by: str, reason: str | None = None) -> None:
    """Hold back the job's new tasks until it is resumed; tasks in flight finish and are saved. NATS
    unreachable: nothing changes (TransientError)."""
    job = _job_with_project(job_id)
    if job.is_terminal or job.status == JobStatus.CANCELING:
        raise NothingToDo(f"job {job_id} is {job.status}: there is nothing to pause")
    if job.is_paused:
        raise NothingToDo(f"job {job_id} is already paused (since {_iso(job.paused_at)})")
    if job.dispatch_mode != DispatchMode.ASYNC_API:
        raise UserInputError(f"job {job_id} runs in {job.dispatch_mode} mode, inside a worker: only async_api jobs, "
                             "whose tasks services pull, can be paused")
    reason = (reason or "").strip()[:500] or None
    now = utcnow()
    # the database first, then the consumer: a consumer being made meanwhile reads the pause (`consumer_made`)
    done = Job.update(paused_at=now, pause_reason=reason, updated_at=now).where(
        (Job.id == job_id) & Job.paused_at.is_null() & Job.status.in_(
            (JobStatus.CREATED, JobStatus.PENDING, JobStatus.STARTED))).execute()
    if not done:
        raise NothingToDo(f"job {job_id} changed meanwhile: look at it again")
    try:
        held = _consumer_paused(runtime, job, paused=True)
    except TransientError as exc:
        Job.update(paused_at=None, pause_reason=None).where((Job.id == job_id) & (Job.paused_at == now)).execute()
        raise TransientError(f"job {job_id} was not paused: {exc}") from exc
    job_log(job_id, logging.INFO, f"paused by {by}" + (f": {reason}" if reason else "") + f"; {held}")


def resume(runtime: Runtime, job_id: int, *, by: str) -> None:
    """Hand out the paused job's tasks again. Its deadline and its idle clock move on by the time it was paused.
    NATS unreachable: it stays paused (TransientError)."""
    job = _job_with_project(job_id)
    if job.paused_at is None or job.is_terminal:
        raise NothingToDo(f"job {job_id} is not paused" if job.paused_at is None
                          else f"job {job_id} already ended {job.status}: there is nothing to resume")
    now = utcnow()
    paused = now - job.paused_at
    was = {Job.paused_at: job.paused_at, Job.pause_reason: job.pause_reason, Job.paused_s: job.paused_s,
           Job.deadline_at: job.deadline_at, Job.last_progress_at: job.last_progress_at}
    changes: dict[Any, Any] = {Job.paused_at: None, Job.pause_reason: None, Job.updated_at: now,
                               Job.paused_s: (job.paused_s or 0.0) + paused.total_seconds()}
    if job.deadline_at is not None:
        changes[Job.deadline_at] = job.deadline_at + paused
    idle_since = job.last_progress_at or job.dispatched_at
    if idle_since is not None:
        changes[Job.last_progress_at] = min(idle_since + paused, now)
    done = Job.update(changes).where((Job.id == job_id) & (Job.paused_at == job.paused_at)).execute()
    if not done:
        raise NothingToDo(f"job {job_id} changed meanwhile: look at it again")
    try:
        held = _consumer_paused(runtime, job, paused=False)
    except TransientError as exc:
        Job.update(was).where((Job.id == job_id) & Job.paused_at.is_null()).execute()
        raise TransientError(f"job {job_id} is still paused: {exc}") from exc
    job_log(job_id, logging.INFO, f"resumed by {by} after {_duration(paused)} paused; {held}"
                                  + (f"; deadline now {_iso(job.deadline_at + paused)}" if job.deadline_at else ""))


def _consumer_paused(runtime: Runtime, job: Job, *, paused: bool) -> str:
    """Pause or resume the job's consumer, and tell its services; what happened, for the job log. Raises
    TransientError when NATS cannot be reached."""
    held = runtime.tasks.pause_job_consumer(job.id, job.pipeline.slug, paused=paused)
    publish_claim(runtime, job.id)
    if held is False:
        return "it has no consumer now: its consumer is made " + ("paused" if paused else "running")
    if held is None:
        return ("this NATS server cannot pause a consumer (2.11 and later can): the gateway hands out none of its "
                "tasks, nor do services that read the job's metadata (NATS 2.10 and later keep it); any other "
                "service may still pull them" if paused else "services hand out its tasks again")
    return "the NATS server holds its tasks; those in flight finish" if paused else "the NATS server delivers again"


def _iso(value: dt.datetime | None) -> str:
    return value.isoformat(timespec="seconds") + "Z" if value else "?"


def _duration(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    return f"{seconds // 60} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
