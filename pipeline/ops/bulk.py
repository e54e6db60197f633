"""One action over every job a filter picks: cancel, retry-failed, pause, resume. A dry run lists what would
change and changes nothing; a real run acts on each job on its own (one failing does not stop the others)
and writes one job-log line per job naming who did it and with which filter."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
from collections.abc import Iterable

import peewee

from models import DispatchMode, ImageStatus, Job, JobImage, JobStatus, Pipeline, Project, utcnow
from pipeline.errors import NotFound, NothingToDo, PipelineError, UserInputError
from pipeline.infra.runtime import Runtime
from pipeline.ops import actions
from pipeline.ops.job_views import with_project

log = logging.getLogger(__name__)

ACTIONS = ("cancel", "retry-failed", "pause", "resume")
#: Most jobs one bulk action changes: a filter that matches more is refused (narrow it, or run it again).
MAX_JOBS = 5000
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """Seconds from `90`, `90s`, `30m`, `12h` or `7d`."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:
        raise UserInputError(f"age {text!r}: use a number of seconds or one with a unit, e.g. 30m, 12h, 7d")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


@dataclasses.dataclass(frozen=True)
class Filter:
    """Which jobs: every field given must match (`projects`, `pipelines`, `statuses`: any of them)."""

    projects: tuple[str, ...] = ()
    pipelines: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    name: str | None = None  # a pattern: `*` any text, `?` one character; case-insensitive
    older_than_s: float | None = None  # created at least this long ago
    ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        unknown = [s for s in self.statuses if s.upper() not in JobStatus.ALL]
        if unknown:
            raise UserInputError(f"unknown status {unknown[0]!r} (use {', '.join(JobStatus.ALL)})")
        if self.older_than_s is not None and self.older_than_s < 0:
            raise UserInputError("older-than must not be negative")

    @property
    def empty(self) -> bool:
        return not (self.projects or self.pipelines or self.statuses or self.name or self.older_than_s is not None
                    or self.ids)

    def describe(self) -> str:
        parts = [f"{key}={','.join(map(str, value))}" for key, value in (
            ("project", self.projects), ("pipeline", self.pipelines), ("status", self.statuses), ("id", self.ids))
            if value]
        if self.name:
            parts.append(f"name={self.name!r}")
        if self.older_than_s is not None:
            parts.append(f"older-than={self.older_than_s:g}s")
        return " ".join(parts) or "every job"

    def query(self, scope: Iterable[str] | None) -> peewee.ModelSelect[Job]:
        query = with_project().order_by(Job.id)
        if scope is not None:
            query = query.where(Project.name.in_(list(scope)))
        if self.projects:
            query = query.where(Project.name.in_(list(self.projects)))
        if self.pipelines:
            query = query.where(Pipeline.slug.in_(list(self.pipelines)))
        if self.statuses:
            query = query.where(Job.status.in_([s.upper() for s in self.statuses]))
        if self.name:
            like = self.name.lower().replace("!", "!!").replace("%", "!%").replace("_", "!_")
            like = like.replace("*", "%").replace("?", "_")
            query = query.where(peewee.NodeList((peewee.fn.LOWER(Job.name), peewee.SQL("LIKE"), like,
                                                 peewee.SQL("ESCAPE '!'"))))
        if self.older_than_s is not None:
            query = query.where(Job.created_at <= utcnow() - dt.timedelta(seconds=self.older_than_s))
        if self.ids:
            query = query.where(Job.id.in_(list(self.ids)))
        return query


def _applies(action: str, query: peewee.ModelSelect[Job]) -> peewee.ModelSelect[Job]:
    """The jobs of `query` that `action` would change."""
    if action == "cancel":
        return query.where(Job.status.not_in(JobStatus.TERMINAL))
    if action == "pause":
        return query.where(Job.status.in_((JobStatus.CREATED, JobStatus.PENDING, JobStatus.STARTED))
                           & Job.paused_at.is_null() & (Job.dispatch_mode == DispatchMode.ASYNC_API))
    if action == "resume":
        return query.where(Job.paused_at.is_null(False) & Job.status.not_in(JobStatus.TERMINAL))
    if action == "retry-failed":
        failed = JobImage.select(JobImage.id).where((JobImage.job == Job.id) & (JobImage.status == ImageStatus.FAILED))
        return query.where(Job.status.in_(JobStatus.TERMINAL) & peewee.fn.EXISTS(failed))
    raise UserInputError(f"unknown bulk action {action!r} (use {', '.join(ACTIONS)})")


@dataclasses.dataclass
class Outcome:
    job_id: int
    name: str
    project: str
    status: str
    result: str  # what happened, or would happen in a dry run
    ok: bool = True

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan(action: str, selection: Filter, *, scope: Iterable[str] | None = None) -> list[Outcome]:
    """The jobs `action` would change among those `selection` picks within `scope` (a caller's projects;
    None: all); changes nothing."""
    jobs = _picked(action, selection, scope)
    what = {"cancel": "would be canceled", "pause": "would be paused", "resume": "would be resumed",
            "retry-failed": "its failed images would go to a new job"}[action]
    return [Outcome(j.id, j.name, j.project_name, j.status, what) for j in jobs]


def apply(runtime: Runtime, action: str, selection: Filter, *, by: str, scope: Iterable[str] | None = None,
          reason: str | None = None) -> list[Outcome]:
    """Apply `action` to every job `selection` picks within `scope`, each on its own."""
    scope = list(scope) if scope is not None else None
    jobs = _picked(action, selection, scope)
    who = f"{by} (bulk {action}: {selection.describe()})"
    outcomes = [_one(runtime, action, job, who, reason, scope) for job in jobs]
    done = sum(o.ok for o in outcomes)
    log.info("bulk %s by %s over %s: %s job(s) changed, %s not", action, by, selection.describe(), done,
             len(outcomes) - done)
    return outcomes


def _picked(action: str, selection: Filter, scope: Iterable[str] | None) -> list[Job]:
    if selection.empty:
        raise UserInputError("a bulk action needs a filter (project, pipeline, status, name, older-than or ids)")
    jobs = list(_applies(action, selection.query(scope)).limit(MAX_JOBS + 1))
    if len(jobs) > MAX_JOBS:
        raise UserInputError(f"the filter picks more than {MAX_JOBS} jobs for {action}: narrow it (e.g. --project, "
                             "--older-than), or run it again after this many")
    return jobs


def _one(runtime: Runtime, action: str, job: Job, who: str, reason: str | None,
         scope: list[str] | None) -> Outcome:
    outcome = Outcome(job.id, job.name, job.project_name, job.status, "")
    try:
        if action == "cancel":
            outcome.result = f"canceled: {actions.cancel(runtime, job.id, by=who, projects=scope)}"
        elif action == "pause":
            actions.pause(runtime, job.id, by=who, reason=reason, projects=scope)
            outcome.result = "paused"
        elif action == "resume":
            actions.resume(runtime, job.id, by=who, projects=scope)
            outcome.result = "resumed"
        else:
            outcome.result = f"retried as job {actions.retry_failed(runtime, job.id, by=who, projects=scope).id}"
    except (NothingToDo, NotFound) as exc:  # it changed since it was picked
        outcome.result, outcome.ok = f"skipped: {exc}", False
    except PipelineError as exc:
        outcome.result, outcome.ok = f"failed: {exc}", False
    return outcome
