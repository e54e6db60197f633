"""What a person can do to jobs, whichever door they come through: `cli.py` and the web (pages and the JSON
API) both call these, so each rule (may this job be cancelled? is there anything to retry?) is decided here
once. The state changes themselves go through `pipeline.core`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from models import DispatchMode, Job
from pipeline import fairshare
from pipeline.core import jobs, scheduling, webhooks
from pipeline.core.image_policy import IMAGE_SUFFIXES, ImagePolicy
from pipeline.core.joblog import job_log
from pipeline.core.manifests import Row
from pipeline.errors import NothingToDo
from pipeline.infra.runtime import Runtime
from pipeline.ops.job_views import existing_job, failed_images, job_summary, retried_as

#: The projects a caller may act on (a token limited to some projects); None: every project.
Projects = Iterable[str] | None


def enqueue(runtime: Runtime, pipeline_slug: str, urls: Iterable[str | Row], *, name: str | None = None,
            limit: int | None = None, dispatch_mode: str = DispatchMode.ASYNC_API,
            pickup_timeout_s: float | None = None, deadline_s: float | None = None, over_network: bool = False,
            policy: ImagePolicy | None = None, project: str | None = None, priority: int | str = 0,
            notify: webhooks.Endpoint | tuple[str, ...] | None = None,
            suffixes: Iterable[str] = IMAGE_SUFFIXES, reuse: bool = True) -> Job:
    """Create a job over `urls` and start it: the started job. Bad input creates nothing (`jobs.create_job`);
    `over_network`: asked for through the web, so local files must lie under PIPELINE_IMAGE_ROOTS."""
    job = jobs.create_job(pipeline_slug, urls, name=name, limit=limit, dispatch_mode=dispatch_mode,
                          pickup_timeout_s=pickup_timeout_s, deadline_s=deadline_s, over_network=over_network,
                          policy=policy, project=project, priority=fairshare.parse_priority(priority), notify=notify,
                          suffixes=suffixes, reuse=reuse)
    jobs.start_job(runtime, job)
    return existing_job(job.id)


def cancel(runtime: Runtime, job_id: int, *, by: str = "operator", projects: Projects = None) -> str:
    """Cancel a running job: its final status. Raises NotFound, or NothingToDo for a job that already ended."""
    job = existing_job(job_id, projects)
    if job.is_terminal:
        raise NothingToDo(f"job {job_id} already ended {job.status}: nothing to cancel")
    return jobs.cancel(runtime, job_id, by=by)


def retry_failed(runtime: Runtime, job_id: int, *, by: str = "operator", projects: Projects = None) -> Job:
    """Start a new job over the failed images of the ended job `job_id`: the new job. Raises NotFound,
    UserInputError (the job still runs) or NothingToDo (no failed image)."""
    existing_job(job_id, projects)
    retry = jobs.retry_failed(job_id)
    jobs.start_job(runtime, retry)
    job_log(job_id, logging.INFO, f"failed images retried as job {retry.id} (by {by})")
    return existing_job(retry.id)


def pause(runtime: Runtime, job_id: int, *, by: str = "operator", reason: str | None = None,
          projects: Projects = None) -> Job:
    """Hold back the job's new tasks (pipeline/core/scheduling.py); raises NotFound, NothingToDo, UserInputError."""
    existing_job(job_id, projects)
    scheduling.pause(runtime, job_id, by=by, reason=reason)
    return existing_job(job_id)


def resume(runtime: Runtime, job_id: int, *, by: str = "operator", projects: Projects = None) -> Job:
    existing_job(job_id, projects)
    scheduling.resume(runtime, job_id, by=by)
    return existing_job(job_id)


def set_priority(runtime: Runtime, job_id: int, priority: int | str, *, by: str = "operator",
                 projects: Projects = None) -> Job:
    existing_job(job_id, projects)
    scheduling.set_priority(runtime, job_id, fairshare.parse_priority(priority), by=by)
    return existing_job(job_id)


def job_detail(job_id: int, *, failures: int = 20, projects: Projects = None) -> dict:
    """A job's summary with its first `failures` failed images, the jobs that retried its failed images, its
    progress over time (`samples`: [unix seconds, settled, failed]) and its webhook deliveries; raises NotFound."""
    job = existing_job(job_id, projects)
    return {**job_summary(job), "failed_images": failed_images(job_id, failures), "retried_as": retried_as(job_id),
            "samples": (job.progress or {}).get("samples", []), "webhooks": webhooks.of_job(job_id)}
