"""jetpipe command line: `python cli.py COMMAND --help`."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import sys
from collections.abc import Iterable
from pathlib import Path

import click
import nats.js.errors
import peewee
from rich.console import Console

RET_OK = 0           # success (for watch/demo: the job ended SUCCESS)
RET_ERROR = 1        # bad input or a failed operation; one readable line on stderr
RET_USAGE = 2        # wrong command-line usage (click)
RET_UNAVAILABLE = 3  # a dependency (database, Redis, NATS) could not be reached
RET_JOB_FAILED = 4   # watch/demo: the job ended FAILURE or REVOKED, or did not end in time

STACK_DIR = Path(".pipeline")
STACK_FILE = STACK_DIR / "stack.json"


def _env_help() -> str:
    from pipeline.settings import OPTIONS

    lines = [f"  {o.env:<36} {o.help} (default: {o.default or 'not set'})" for o in OPTIONS.values()]
    return "\n".join(lines)


EPILOG = f"""\b
Examples:
  python cli.py up                      # embedded NATS + Redis under .pipeline/, prints exports
  python cli.py init-db
  python cli.py pipeline register examples/moth-demo.json
  python cli.py enqueue-job --pipeline moth-demo --images-dir ./traps --name "night 12"
  python cli.py watch 1                 # progress bar until the job ends
  dramatiq pipeline.actors              # a worker (runs the results bridge too)
  python cli.py process --pipeline moth-demo   # the reference processing service
  python cli.py demo                    # everything above, self-contained, 200 images
  python cli.py demo-images traps --count 50   # synthetic trap images to enqueue yourself

\b
`jetpipe` (installed with the package) is the same command: `jetpipe status 1`.
  python cli.py health                  # dependencies, workers, services, running jobs (exit 0/1/3)
  python cli.py health --run            # run one jobs_health_check now
  python cli.py parked list             # results that could not be saved; parked replay ID once fixed

\b
Exit codes:
  {RET_OK} ok (watch/demo: job SUCCESS)     {RET_ERROR} bad input or failed operation
  {RET_USAGE} usage error                        {RET_UNAVAILABLE} database, Redis or NATS unreachable
  {RET_JOB_FAILED} watch/demo: job FAILURE, REVOKED or not finished in time

\b
Environment (read once at start):
{_env_help()}
"""

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = RET_ERROR, *, as_json: bool = False):
    """One readable line on stderr and exit `code`; with --json also `{"error", "exit_code"}` on stdout."""
    from rich.markup import escape

    if as_json:
        click.echo(json.dumps({"error": message, "exit_code": code}))
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def handles_errors(fn):
    """Turn every expected failure into one readable line and an exit code (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import redis

        import models
        from pipeline.errors import ConfigError, NothingToDo, PipelineError, TransientError, UserInputError
        from pipeline.settings import redact

        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except NothingToDo as exc:
            if as_json:
                click.echo(json.dumps({"nothing_to_do": str(exc)}))
            else:
                console.print(str(exc), highlight=False, markup=False)
        except (UserInputError, ConfigError, models.DatabaseURLError, models.SchemaMissing) as exc:
            fail(str(exc), as_json=as_json)
        except TransientError as exc:
            fail(str(exc), RET_UNAVAILABLE, as_json=as_json)
        except redis.RedisError as exc:
            fail(f"Redis unavailable: {exc}", RET_UNAVAILABLE, as_json=as_json)
        except peewee.PeeweeException as exc:
            if not models.is_transient(exc):
                raise  # a bug: its traceback is what a report needs
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            fail(f"database unavailable: {redact(text)}", RET_UNAVAILABLE, as_json=as_json)
        except PipelineError as exc:
            fail(str(exc), as_json=as_json)

    return wrapper


def runtime():
    from pipeline.infra.runtime import get_runtime

    return get_runtime()


def bind_db():
    import models
    from pipeline.settings import get_settings

    models.bind(get_settings().database_url, session=get_settings().db_session())


#: The name a command's traces go by (OTEL_SERVICE_NAME overrides it); every other command: jetpipe-cli.
TRACED_AS = {"web": "jetpipe-web", "process": "jetpipe-service"}


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """jetpipe: run asynchronous ML jobs over many images, reliably."""
    from pipeline.errors import ConfigError
    from pipeline.infra import logs, tracing
    from pipeline.settings import Settings, get_settings

    try:
        settings = get_settings()
    except ConfigError:  # the command reports it, in one line
        settings = Settings.from_env({})
    logs.configure(settings, level=logging.WARNING - 10 * min(verbose, 2))
    try:
        tracing.setup(TRACED_AS.get(ctx.invoked_subcommand or "", "jetpipe-cli"))
    except ConfigError as exc:
        fail(str(exc))


@main.command("init-db")
@handles_errors
def init_db() -> None:
    """Create the database tables (idempotent)."""
    import models
    from pipeline.settings import get_settings, redact

    bind_db()
    models.create_schema()
    console.print(f"database ready: {redact(get_settings().database_url)}")


# ---- pipelines -----------------------------------------------------------------------------------------
@main.group()
def pipeline() -> None:
    """Register and list pipelines."""


@pipeline.command("register")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--service", metavar="NAME",
              help="The processing service it belongs to (a `service` web token's name): only that service may "
                   "use it through the HTTP gateway. Kept when omitted on an update.")
@handles_errors
def pipeline_register(file: str, service: str | None) -> None:
    """Register (or update) a pipeline and its algorithms from a JSON FILE."""
    from pipeline.core.registry import register_pipeline
    from pipeline.errors import UserInputError
    from pipeline.schemas import decode_pipeline_spec

    try:
        body = Path(file).read_bytes()
    except OSError as exc:
        raise UserInputError(f"cannot read {file}: {exc.strerror}") from None
    bind_db()
    spec = decode_pipeline_spec(body, source=file)
    if service is not None and not service.strip():
        raise UserInputError("--service needs the name of a service token")
    created = register_pipeline(spec, for_service=service)
    console.print(f"pipeline {spec.slug} {'registered' if created else 'updated'} "
                  f"with {len(spec.algorithms)} algorithm(s)" + (f", for service {service}" if service else ""),
                  markup=False, highlight=False)


@pipeline.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handles_errors
def pipeline_list(as_json: bool) -> None:
    """List registered pipelines and their algorithms."""
    from rich.table import Table
    from rich.text import Text

    from pipeline.core.registry import list_pipelines

    bind_db()
    rows = list_pipelines()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("slug", "name", "service", "algorithms")
    for p in rows:
        table.add_row(*(Text(cell) for cell in (p["slug"], p["name"], p["service"] or "-", ", ".join(
            f"{a['key']} ({a['task_type']})" for a in p["algorithms"]))))
    console.print(table)


@main.group("nats")
def nats_group() -> None:
    """NATS configuration for processing services."""


@nats_group.command("service-user")
@click.argument("name")
@click.option("--pipeline", "pipelines", multiple=True, required=True, metavar="SLUG",
              help="A pipeline the service serves (repeat for several).")
@click.option("--password-env", metavar="VAR", help="The server's environment variable holding the password "
              "(default JETPIPE_NATS_<NAME>_PASSWORD).")
@handles_errors
def nats_service_user(name: str, pipelines: tuple[str, ...], password_env: str | None) -> None:
    """Print the NATS user NAME for a processing service limited to its pipelines, for
    deploy/nats-users.conf (the SDK reads replies on _INBOX.NAME)."""
    from pipeline.ops.nats_users import service_user_block

    click.echo(service_user_block(name, list(pipelines), password_var=password_env))


# ---- jobs -------------------------------------------------------------------------------------------------
@main.command("enqueue-job")
@click.option("--pipeline", "pipeline_slug", required=True, help="Slug of a registered pipeline.")
@click.option("--images", "locations", multiple=True, metavar="WHERE",
              help="Where the images are: an object storage prefix (s3://bucket/prefix/: every image under it) or a "
                   "local directory. May be given more than once.")
@click.option("--images-dir", type=click.Path(file_okay=False), help="Every image file in this directory.")
@click.option("--images-file", type=click.Path(dir_okay=False), help="A file listing one URL or path per line.")
@click.option("--manifest", type=click.Path(dir_okay=False),
              help="A .csv (a header naming url and any of deployment, timestamp, latitude, longitude and fields of "
                   "your own) or .jsonl file (an object a line): an image a row, with what it says of it.")
@click.option("--suffix", "suffixes", metavar="ENDINGS",
              help="Which objects of an s3:// prefix are images, by name ending, comma-separated "
                   "(default: .png,.jpg,.jpeg,.tif,.tiff,.bmp,.webp).")
@click.option("--name", help="A name for the job.")
@click.option("--limit", type=int, help="Take at most this many images.")
@click.option("--dispatch-mode", type=click.Choice(["async_api", "internal"]), default="async_api",
              show_default=True, help="async_api: external services via NATS; internal: the worker runs it.")
@click.option("--pickup-timeout", type=float, metavar="SECONDS",
              help="End the job FAILURE if no processing service pulls one of its tasks within this long after "
                   "dispatch (default: PIPELINE_JOB_PICKUP_TIMEOUT, 24 h).")
@click.option("--deadline", type=float, metavar="SECONDS",
              help="Fail the images still pending this long after now (the threshold then decides the job).")
@click.option("--project", help="The project the job belongs to (default: default; created on first use).")
@click.option("--priority", default="normal", show_default=True,
              help="low, normal, high, urgent, or a whole number from -10 to 10: services serve a pipeline's jobs of "
                   "the highest priority first.")
@click.option("--notify", metavar="URL", help="POST the job's signed summary there when it ends (webhook); the "
              "signing secret comes from the variable --notify-secret-env names.")
@click.option("--notify-secret-env", metavar="VAR", default="PIPELINE_NOTIFY_SECRET", show_default=True,
              help="Environment variable holding the webhook's signing secret (never on the command line).")
@click.option("--notify-on", metavar="EVENTS", default="ended", show_default=True,
              help="What --notify is told of, comma-separated: started, failing (its failed images passed the failure "
                   "threshold: it will end FAILURE), ended.")
@click.option("--reuse/--no-reuse", default=True, show_default=True,
              help="Keep the results an earlier job of the pipeline's current version saved for the same images "
                   "(they are not sent to a service again).")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@click.argument("urls", nargs=-1)
@handles_errors
def enqueue_job(pipeline_slug, locations, images_dir, images_file, manifest, suffixes, name, limit, dispatch_mode,
                pickup_timeout, deadline, project, priority, notify, notify_secret_env, notify_on, reuse, as_json,
                urls) -> None:
    """Create a job over images and start it; prints the job id.

    Images come from --images-dir, --images-file and/or arguments: URLs (file://, http://, https://) or
    local paths.
    """
    import itertools

    from pipeline.core.manifests import Row
    from pipeline.errors import UserInputError
    from pipeline.ops import actions
    from pipeline.ops.sources import (
        image_suffixes,
        image_urls_from_dir,
        image_urls_from_file,
        local_image_urls,
        manifest_from_file,
    )

    sources: list[Iterable[str | Row]] = []
    for where in locations:
        if "://" in where and not where.startswith("s3://"):
            raise UserInputError(f"--images takes an s3:// prefix or a local directory, not {where[:200]!r}")
        sources.append([where.rstrip("/") + "/"] if where.startswith("s3://") else image_urls_from_dir(where))
    if images_dir:
        sources.append(image_urls_from_dir(images_dir))
    if images_file:
        sources.append(image_urls_from_file(images_file))
    if manifest:
        sources.append(manifest_from_file(manifest))
    if urls:
        sources.append(local_image_urls(urls))
    if not sources:
        raise UserInputError("no images given: use --images, --images-dir, --images-file, --manifest or URL "
                             "arguments")
    if notify and not os.environ.get(notify_secret_env):
        raise UserInputError(f"--notify needs the webhook's signing secret (16 characters or more) in the "
                             f"environment variable {notify_secret_env}")
    job = actions.enqueue(runtime(), pipeline_slug, itertools.chain(*sources), name=name, limit=limit,
                          dispatch_mode=dispatch_mode, pickup_timeout_s=pickup_timeout, deadline_s=deadline,
                          project=project, priority=priority, suffixes=image_suffixes(suffixes), reuse=reuse,
                          notify=(notify, os.environ.get(notify_secret_env, ""), notify_on) if notify else None)
    if as_json:
        from pipeline.ops.job_views import job_summary

        click.echo(json.dumps(job_summary(job), indent=2))
    else:
        console.print(f"job {job.id} queued: {job.total_images} image(s), pipeline {pipeline_slug}, "
                      f"project {job.project_name}, mode {dispatch_mode}", highlight=False, markup=False)


@main.command("jobs")
@click.option("--status", "statuses", multiple=True, help="Only jobs with this status (repeatable).")
@click.option("--pipeline", "pipeline_slug", help="Only jobs of this pipeline.")
@click.option("--project", "projects", multiple=True, help="Only jobs of this project (repeatable).")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@handles_errors
def jobs_cmd(statuses, pipeline_slug, projects, limit, as_json) -> None:
    """List recent jobs."""
    from pipeline.ops.job_views import job_summaries, list_jobs, render_jobs

    bind_db()
    rows = job_summaries(list_jobs(statuses=statuses, pipeline=pipeline_slug, limit=limit,
                                   projects=projects or None))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        render_jobs(console, rows)


def _job_or_fail(job_id: int):
    from pipeline.ops.actions import existing_job

    return existing_job(job_id)


@main.command("status")
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@handles_errors
def status(job_id: int, as_json: bool) -> None:
    """Show a job's status, stages, counters, throughput and failed images."""
    from pipeline.ops.actions import job_detail
    from pipeline.ops.job_views import render_status

    bind_db()
    detail = job_detail(job_id)
    if as_json:
        click.echo(json.dumps(detail, indent=2))
    else:
        render_status(console, detail, detail["failed_images"])


@main.command("watch")
@click.argument("job_id", type=int)
@click.option("--timeout", type=float, help="Give up after this many seconds (exit 4).")
@handles_errors
def watch(job_id: int, timeout: float | None) -> None:
    """Show a live progress bar until the job ends; exit 0 iff it ends SUCCESS."""
    from models import JobStatus
    from pipeline.ops.job_views import literal
    from pipeline.ops.job_views import watch as watch_job

    bind_db()
    _job_or_fail(job_id)
    job = watch_job(console, job_id, timeout_s=timeout)
    console.print(literal(f"job {job_id}: {job.status}" + (f" ({job.error})" if job.error else "")))
    sys.exit(RET_OK if job.status == JobStatus.SUCCESS else RET_JOB_FAILED)


@main.command("logs")
@click.argument("job_id", type=int)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job ends.")
@click.option("--json", "as_json", is_flag=True)
@handles_errors
def logs(job_id: int, follow: bool, as_json: bool) -> None:
    """Print a job's log."""
    import time

    from models import JobStatus
    from pipeline.ops.job_views import job_logs, plain

    bind_db()
    _job_or_fail(job_id)
    last = 0
    while True:
        for line in job_logs(job_id, after_id=last):
            last = line.id
            if as_json:
                click.echo(json.dumps({"at": line.created_at.isoformat(), "level": line.level,
                                       "message": line.message}))
            else:
                click.echo(f"{line.created_at:%Y-%m-%d %H:%M:%S} {line.level:<7} {plain(line.message, one_line=True)}")
        if not follow or _job_or_fail(job_id).status in JobStatus.TERMINAL:
            return
        time.sleep(0.5)


@main.command("cancel")
@click.argument("job_id", type=int)
@handles_errors
def cancel(job_id: int) -> None:
    """Cancel a job: its tasks leave NATS, its state is cleaned up, and it ends REVOKED."""
    from pipeline.ops.actions import cancel as cancel_job

    console.print(f"job {job_id}: {cancel_job(runtime(), job_id, by=_me())}")


def _me() -> str:
    """Who acts, for the job log: the CLI's user."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


@main.command("pause")
@click.argument("job_id", type=int)
@click.option("--reason", help="Why (kept in the job log and shown with the job).")
@click.option("--json", "as_json", is_flag=True)
@handles_errors
def pause(job_id: int, reason: str | None, as_json: bool) -> None:
    """Pause a job: it hands out no new task; tasks in flight finish and are saved. Paused time counts
    against none of its deadlines."""
    from pipeline.ops import actions

    _print_job(actions.pause(runtime(), job_id, by=_me(), reason=reason), as_json, "paused")


@main.command("resume")
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@handles_errors
def resume(job_id: int, as_json: bool) -> None:
    """Resume a paused job; its deadline moves on by the time it was paused."""
    from pipeline.ops import actions

    _print_job(actions.resume(runtime(), job_id, by=_me()), as_json, "resumed")


@main.command("priority")
@click.argument("job_id", type=int)
@click.argument("level")
@click.option("--json", "as_json", is_flag=True)
@handles_errors
def priority_cmd(job_id: int, level: str, as_json: bool) -> None:
    """Change a running job's priority: low, normal, high, urgent, or -10 to 10."""
    from pipeline.ops import actions

    job = actions.set_priority(runtime(), job_id, level, by=_me())
    _print_job(job, as_json, f"priority {job.priority}")


def _print_job(job, as_json: bool, what: str) -> None:
    if as_json:
        from pipeline.ops.job_views import job_summary

        click.echo(json.dumps(job_summary(job), indent=2))
    else:
        console.print(f"job {job.id}: {what} (status {job.status})", highlight=False, markup=False)


@main.group()
def project() -> None:
    """Projects: who jobs belong to, and their share of the processing services."""


@project.command("list")
@click.option("--json", "as_json", is_flag=True)
@handles_errors
def project_list(as_json: bool) -> None:
    """Every project with its weight and jobs."""
    from rich.table import Table

    from pipeline.core.scheduling import list_projects

    bind_db()
    rows = list_projects()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("project", "weight", "running jobs", "jobs")
    for row in rows:
        table.add_row(row["name"], f"{row['weight']:g}", str(row["running"]), str(row["jobs"]))
    console.print(table)


@project.command("weight")
@click.argument("name")
@click.argument("weight", type=float)
@handles_errors
def project_weight(name: str, weight: float) -> None:
    """Give a project its share weight (default 1): projects with jobs waiting share each pipeline's services
    in proportion to their weights. Running jobs follow at once."""
    from pipeline.core.scheduling import set_project_weight

    found, told = set_project_weight(runtime(), name, weight)
    console.print(f"project {found.name}: weight {found.weight:g} ({told} running job(s) follow it)", highlight=False,
                  markup=False)


@main.command("schedule")
@click.argument("pipeline_slug")
@click.option("--json", "as_json", is_flag=True)
@handles_errors
def schedule_cmd(pipeline_slug: str, as_json: bool) -> None:
    """A pipeline's running jobs in the order services should serve them, with each one's share."""
    from rich.table import Table

    from pipeline.ops.schedule import of_pipeline

    answer = of_pipeline(runtime(), pipeline_slug)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    table = Table("job", "project", "priority", "weight", "share", "tasks waiting", "delivered", "paused",
                  title=f"pipeline {pipeline_slug}: next job {answer['next'] or '-'}")
    for j in answer["jobs"]:
        table.add_row(str(j["job_id"]), j["project"], str(j["priority"]), f"{j['weight']:g}", f"{j['share']:.0%}",
                      str(j["tasks_waiting"]), str(j["delivered"]), "yes" if j["paused"] else "")
    console.print(table)
    if answer.get("nats_error"):
        console.print(f"NATS: {answer['nats_error']}", style="yellow", highlight=False, markup=False)


@main.command("bulk")
@click.argument("action", type=click.Choice(["cancel", "retry-failed", "pause", "resume"]))
@click.option("--project", "projects", multiple=True, help="Jobs of this project (repeatable).")
@click.option("--pipeline", "pipelines", multiple=True, help="Jobs of this pipeline (repeatable).")
@click.option("--status", "statuses", multiple=True, help="Jobs with this status (repeatable).")
@click.option("--name", help="Job names matching this pattern (* any text, ? one character; any case).")
@click.option("--older-than", metavar="AGE", help="Jobs created at least this long ago: 90, 30m, 12h, 7d.")
@click.option("--id", "ids", type=int, multiple=True, help="This job (repeatable).")
@click.option("--reason", help="For pause: why.")
@click.option("--dry-run", is_flag=True, help="List what would change; change nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True)
@handles_errors
def bulk_cmd(action, projects, pipelines, statuses, name, older_than, ids, reason, dry_run, yes, as_json) -> None:
    """Cancel, retry-failed, pause or resume every job a filter picks. Lists them and asks first (or
    --dry-run to only list, --yes to not ask); one job-log line per job says who did it and with which filter."""
    import dataclasses

    from pipeline.ops import bulk

    selection = bulk.Filter(projects=projects, pipelines=pipelines, statuses=statuses, name=name, ids=ids,
                            older_than_s=bulk.parse_age(older_than) if older_than else None)
    bind_db()
    plan = bulk.plan(action, selection)
    if dry_run or not plan:
        _print_bulk(plan, action, selection, as_json, dry_run=True)
        return
    if not yes:
        if as_json:
            fail("--json acts only with --yes (or lists with --dry-run): nothing changed", as_json=True)
        _print_bulk(plan, action, selection, False, dry_run=True)
        if not click.confirm(f"{action} these {len(plan)} job(s)?", err=True):
            fail("not confirmed: nothing changed (use --yes to act without asking)")
    confirmed = dataclasses.replace(selection, ids=tuple(o.job_id for o in plan))  # no job added since the list
    done = bulk.apply(runtime(), action, confirmed, by=_me(), reason=reason)
    _print_bulk(done, action, selection, as_json, dry_run=False)
    if not all(o.ok for o in done):
        sys.exit(RET_ERROR)


def _print_bulk(outcomes, action: str, selection, as_json: bool, *, dry_run: bool) -> None:
    from rich.table import Table
    from rich.text import Text

    from pipeline.ops.job_views import literal, plain

    if as_json:
        click.echo(json.dumps({"action": action, "dry_run": dry_run, "filter": selection.describe(),
                               "jobs": [o.as_dict() for o in outcomes],
                               "changed": 0 if dry_run else sum(o.ok for o in outcomes)}, indent=2))
        return
    title = (f"{len(outcomes)} job(s) would change" if dry_run
             else f"{sum(o.ok for o in outcomes)} of {len(outcomes)} job(s) changed") + f": {action}"
    table = Table("job", "name", "project", "status", "result", title=title)
    for o in outcomes:
        table.add_row(str(o.job_id), literal(o.name), literal(o.project), o.status,
                      literal(o.result) if o.ok else Text(plain(o.result), style="red"))
    console.print(table)


@main.command("failures")
@click.argument("job_id", type=int)
@click.option("--limit", type=int, help="Show at most this many.")
@click.option("--json", "as_json", is_flag=True)
@handles_errors
def failures(job_id: int, limit: int | None, as_json: bool) -> None:
    """List a job's failed images with the reason each one failed."""
    from rich.table import Table

    from pipeline.core.jobs import failed_image_rows
    from pipeline.ops.job_views import literal

    bind_db()
    _job_or_fail(job_id)
    rows = [{"image_id": str(i), "url": url, "reason": why} for i, url, why in failed_image_rows(job_id, limit=limit)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("image", "url", "reason", title=f"job {job_id}: {len(rows)} failed image(s)")
    for r in rows:
        table.add_row(r["image_id"], literal(r["url"]), literal(r["reason"] or ""))
    console.print(table)


@main.command("results")
@click.argument("job_id", type=int)
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "parquet", "camtrap-dp"]), default="jsonl",
              show_default=True,
              help="jsonl: one image a line with its detections and their classifications; csv: one row per "
                   "classification (an image without detections has one row); parquet: the csv's rows, typed; "
                   "camtrap-dp: a Camera Trap Data Package (a zip; the job must come from a manifest giving each "
                   "image's deployment, timestamp, latitude and longitude). parquet and camtrap-dp need -o.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True),
              help="Write to this file instead of standard output.")
@handles_errors
def results(job_id: int, fmt: str, output: str | None) -> None:
    """Export a job's results (streamed: constant memory however many detections)."""
    from pipeline.errors import UserInputError
    from pipeline.ops.export import FILE_FORMATS, export
    from pipeline.ops.result_files import write_file

    bind_db()
    if fmt in FILE_FORMATS:
        if not output:
            raise UserInputError(f"{fmt} is a binary file: give -o FILE")
        try:
            written = write_file(job_id, fmt, output)
        except OSError as exc:
            raise UserInputError(f"cannot write {output}: {exc.strerror}") from None
        what = "observation(s)" if fmt == "camtrap-dp" else "row(s)"
        err_console.print(f"wrote {written:,} {what} to {output} ({fmt})", highlight=False, markup=False,
                          soft_wrap=True)
        return
    chunks = export(job_id, fmt)
    try:
        handle = open(output, "w", encoding="utf-8", newline="") if output else sys.stdout
    except OSError as exc:
        raise UserInputError(f"cannot write {output}: {exc.strerror}") from None
    rows = 0
    try:
        for chunk in chunks:
            handle.write(chunk)
            rows += chunk.count("\n")
    finally:
        if output:
            handle.close()
    if output:  # stdout holds the rows themselves; a file gets a line on stderr saying what went where
        err_console.print(f"wrote {rows:,} {fmt.upper()} line(s) to {output}", highlight=False, markup=False,
                          soft_wrap=True)


@main.command("retry-failed")
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@handles_errors
def retry_failed_cmd(job_id: int, as_json: bool) -> None:
    """Enqueue a new job made of the failed images of an ended job; prints the new job id."""
    from pipeline.ops.actions import retry_failed

    job = retry_failed(runtime(), job_id)
    if as_json:
        click.echo(json.dumps({"id": job.id, "retry_of": job_id, "total_images": job.total_images}))
    else:
        console.print(f"job {job.id} queued: the {job.total_images} failed image(s) of job {job_id}")


@main.group()
def dlq() -> None:
    """Dramatiq's dead-letter queues: messages that failed for good."""


@dlq.command("list")
@click.option("--json", "as_json", is_flag=True)
@handles_errors
def dlq_list(as_json: bool) -> None:
    """List dead messages (actor, arguments, when, last error)."""
    from rich.table import Table

    from pipeline.infra.dlq import list_dead

    rows = [d.as_dict() for d in list_dead(runtime().redis)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("id", "queue", "actor", "args", "died at", "retries", "last error",
                  title=f"{len(rows)} dead message(s)")
    for r in rows:
        table.add_row(r["id"], r["queue"], r["actor"], json.dumps(r["args"])[:60], r["died_at"], str(r["retries"]),
                      r["last_error"] or "")
    console.print(table)


@dlq.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead message.")
@handles_errors
def dlq_replay(ids: tuple[str, ...], replay_all: bool) -> None:
    """Send dead messages again (by id from `dlq list`, or --all) with a fresh retry budget."""
    from pipeline.infra.dlq import replay

    if not ids and not replay_all:
        raise click.UsageError("name the messages to replay (ids from `dlq list`) or pass --all")
    rt = runtime()
    done = replay(rt.broker, rt.redis, None if replay_all else set(ids))
    missing = set(ids) - {d.redis_id for d in done} - {d.message.message_id for d in done}
    console.print(f"replayed {len(done)} message(s)")
    if missing:
        fail(f"not in any dead-letter queue: {', '.join(sorted(missing))}")


@main.group()
def parked() -> None:
    """Result messages that could not be saved (kept after their attempts; their images failed)."""


def _parked_selection(ids: tuple[int, ...], job_id: int | None, every: bool) -> dict:
    if not ids and job_id is None and not every:
        raise click.UsageError("name parked results by id (from `parked list`), or pass --job N or --all")
    return {"ids": list(ids) or None, "job_id": job_id, "every": every}


@parked.command("list")
@click.option("--job", "job_id", type=int, help="Only this job's.")
@click.option("--json", "as_json", is_flag=True)
@handles_errors
def parked_list(job_id: int | None, as_json: bool) -> None:
    """List parked result messages (job, images, attempts, the error that stopped them)."""
    from rich.table import Table

    from pipeline.core.unsaved import list_parked
    from pipeline.ops.job_views import literal

    bind_db()
    rows = [p.as_dict() for p in list_parked(job_id=job_id)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("id", "job", "images", "attempts", "parked at", "error", title=f"{len(rows)} parked result(s)")
    for r in rows:
        images = ",".join(r["image_ids"][:10]) + (f",...(+{len(r['image_ids']) - 10})" if len(r["image_ids"]) > 10
                                                  else "")
        table.add_row(str(r["id"]), str(r["job_id"]), images, str(r["attempts"]), r["parked_at"], literal(r["error"]))
    console.print(table)


@parked.command("show")
@click.argument("parked_id", type=int)
@handles_errors
def parked_show(parked_id: int) -> None:
    """Print a parked result's message body, as the processing service sent it."""
    from pipeline.core.unsaved import parked_body

    bind_db()
    click.echo(parked_body(parked_id).decode("utf-8", errors="replace"))


@parked.command("replay")
@click.argument("ids", nargs=-1, type=int)
@click.option("--job", "job_id", type=int, help="Every parked result of this job.")
@click.option("--all", "every", is_flag=True, help="Every parked result of a running job.")
@handles_errors
def parked_replay(ids: tuple[int, ...], job_id: int | None, every: bool) -> None:
    """Put parked results back to be saved (once the cause is fixed). While its job runs, a replayed result
    that saves supersedes its images' failure; results of ended jobs are refused."""
    from pipeline.core.unsaved import replay

    selection = _parked_selection(ids, job_id, every)
    done, skipped = replay(runtime(), **selection)
    console.print(f"replayed {len(done)} parked result(s)" + (f"; {len(skipped)} left parked: their jobs ended"
                                                              if skipped else ""))


@parked.command("drop")
@click.argument("ids", nargs=-1, type=int)
@click.option("--job", "job_id", type=int, help="Every parked result of this job.")
@click.option("--all", "every", is_flag=True, help="Every parked result.")
@handles_errors
def parked_drop(ids: tuple[int, ...], job_id: int | None, every: bool) -> None:
    """Delete parked results for good (their images stay failed)."""
    from pipeline.core.unsaved import drop

    bind_db()
    console.print(f"dropped {len(drop(**_parked_selection(ids, job_id, every)))} parked result(s)")


# ---- processing service -------------------------------------------------------------------------------
@main.command("process")
@click.option("--pipeline", "pipeline_slug", required=True, help="Pipeline whose tasks to process.")
@click.option("--concurrency", type=int, default=4, show_default=True, help="Tasks processed at once.")
@click.option("--batch-size", type=int, default=50, show_default=True,
              help="Images per result message (1: one message per image).")
@click.option("--task-timeout", type=float, default=600, show_default=True,
              help="Seconds the model may take on one image before the image is failed with a timeout.")
@click.option("--via", "via_url", metavar="URL",
              help="Work through a jetpipe web server's HTTP gateway (http://host:8080) instead of NATS.")
@click.option("--token", envvar="PIPELINE_SERVICE_TOKEN", show_envvar=True,
              help="This service's token for --via (a `service` token of PIPELINE_WEB_TOKENS).")
@handles_errors
def process(pipeline_slug: str, concurrency: int, batch_size: int, task_timeout: float, via_url: str | None,
            token: str | None) -> None:
    """Run the reference processing service for a pipeline with a built-in model (moth-demo).

    It pulls tasks from NATS, or with --via from a web server's HTTP gateway (no NATS needed here).
    """
    from pipeline.errors import UserInputError
    from pipeline.schemas import MAX_IMAGES_PER_RESULT
    from pipeline.sdk import HttpTransport, ProcessingService
    from pipeline.sdk.handlers import HANDLERS, get_handler
    from pipeline.settings import get_settings

    handler = get_handler(pipeline_slug)
    if handler is None:
        raise UserInputError(f"no built-in model for pipeline {pipeline_slug!r} (have: {', '.join(HANDLERS)})")
    if concurrency < 1:
        raise UserInputError("--concurrency must be at least 1")
    if not 1 <= batch_size <= MAX_IMAGES_PER_RESULT:
        raise UserInputError(f"--batch-size must be between 1 and {MAX_IMAGES_PER_RESULT}")
    if task_timeout <= 0:
        raise UserInputError("--task-timeout must be a positive number of seconds")
    settings = get_settings()
    logging.getLogger("pipeline").setLevel(settings.log_level.upper())
    if via_url and not via_url.startswith(("http://", "https://")):
        raise UserInputError(f"--via must be an http:// or https:// URL, not {via_url!r}")
    service = ProcessingService(pipeline_slug, handler, nats_url=settings.nats_url, concurrency=concurrency,
                                nats_creds=settings.nats_creds, nats_tls_ca=settings.nats_tls_ca,
                                batch_size=batch_size, task_timeout_s=task_timeout,
                                transport=HttpTransport(via_url, token=token or "") if via_url else None)

    async def serve():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, service.stop)
        await service.run()

    asyncio.run(serve())
    console.print(f"service stopped: {service.processed} processed, {service.failed} failed")


# ---- health and chaos ------------------------------------------------------------------------------------
@main.command("health")
@click.option("--run", "run_now", is_flag=True, help="Run one jobs_health_check here, now, and print its result.")
@click.option("--json", "as_json", is_flag=True)
@handles_errors
def health(run_now: bool, as_json: bool) -> None:
    """Check NATS, Redis, the database, workers, processing services and running jobs.

    \b
    Exit codes: 0 healthy, 1 degraded (needs attention), 3 a dependency is unreachable.
    """
    from pipeline.ops.job_views import render_check, render_health
    from pipeline.settings import get_settings

    if run_now:
        from pipeline.core.reconciler import run_health_check

        report = run_health_check(runtime())
        if as_json:
            click.echo(json.dumps(report, indent=2))
        else:
            render_check(console, report)
        return
    from pipeline.infra.aio import LoopThread
    from pipeline.ops.health import build_report

    loop = LoopThread(name="jetpipe-health")
    try:
        code, report = build_report(get_settings(), loop)
    finally:
        loop.stop()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        render_health(console, report)
    sys.exit(code)


@main.group()
def chaos() -> None:
    """Break things on purpose (on a stack you own) to see jetpipe recover. See docs/chaos-scenarios.md."""


@chaos.command("flush")
@click.argument("target", type=click.Choice(["redis", "nats"]))
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@handles_errors
def chaos_flush(target: str, yes: bool) -> None:
    """FLUSHALL Redis, or delete jetpipe's NATS streams (tasks, results, advisories)."""
    from pipeline.ops import chaos as tools
    from pipeline.settings import get_settings, redact

    settings = get_settings()
    url = settings.redis_url if target == "redis" else settings.nats_url
    if not yes:
        click.confirm(f"Really destroy all {target} data at {redact(url)}?", abort=True)
    if target == "redis":
        tools.flush_redis(url)
        console.print(f"flushed Redis at {redact(url)}: job state and queued Dramatiq messages are gone")
    else:
        deleted = asyncio.run(tools.flush_nats(url, **settings.nats_options()))
        console.print(f"deleted NATS stream(s): {', '.join(deleted) or 'none existed'}")


@chaos.command("exhaust-max-deliver")
@click.option("--job-id", type=int, required=True)
@click.option("--image-ids", required=True, help="Comma-separated image ids whose tasks to exhaust.")
@click.option("--ensure-stream", "pipeline_slug", metavar="PIPELINE", default=None,
              help="Create the streams and the job consumer for this pipeline first, if missing.")
@click.option("--json", "as_json", is_flag=True)
@handles_errors
def chaos_exhaust(job_id: int, image_ids: str, pipeline_slug: str | None, as_json: bool) -> None:
    """Pull the tasks of these images until JetStream gives up on them, never ACKing; print the counters.

    Other tasks are never fetched: the targets must be the next tasks the job would deliver (else it
    refuses, touching nothing). A job with no tasks yet gets one task per image published by this command.
    Afterwards the consumer shows num_ack_pending=0 (the final pull makes JetStream give up on the targets:
    they are no longer pending, a MAX_DELIVERIES advisory names each) and num_pending = the tasks never
    delivered.
    """
    from pipeline.errors import UserInputError
    from pipeline.ops import chaos as tools
    from pipeline.settings import get_settings

    ids = {i.strip() for i in image_ids.split(",") if i.strip()}
    if not ids:
        raise UserInputError("--image-ids is empty")
    settings = get_settings()
    try:
        out = asyncio.run(tools.exhaust_max_deliver(settings.nats_url, job_id, ids, pipeline=pipeline_slug,
                                                    max_deliver=settings.nats_max_deliver,
                                                    ack_wait_s=settings.nats_task_ttr, **settings.nats_options()))
    except nats.js.errors.NotFoundError:
        raise UserInputError(f"job {job_id} has no consumer (use --ensure-stream PIPELINE)") from None
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        if out["published"]:
            console.print(f"published a task for image(s) {', '.join(out['published'])}", highlight=False)
        console.print(f"deliveries: {out['deliveries']}", highlight=False)
        console.print(f"consumer job-{job_id}: num_pending={out['num_pending']} "
                      f"num_ack_pending={out['num_ack_pending']} num_redelivered={out['num_redelivered']}")


@chaos.command("kill-worker")
@click.option("--master", type=int, help="Only a worker of this `dramatiq` master process.")
@handles_errors
def chaos_kill_worker(master: int | None) -> None:
    """SIGKILL one Dramatiq worker process (its master then exits: a supervisor must restart it)."""
    from pipeline.ops import chaos as tools

    pid = tools.kill_worker(master)
    if pid is None:
        fail("no `dramatiq pipeline.actors` worker process is running")
    console.print(f"SIGKILLed worker process {pid}")


# ---- web ------------------------------------------------------------------------------------------------
@main.command("web")
@click.option("--host", help="Address to listen on (default: PIPELINE_WEB_HOST, 127.0.0.1).")
@click.option("--port", type=int, help="Port to listen on (default: PIPELINE_WEB_PORT, 8080).")
@handles_errors
def web(host: str | None, port: int | None) -> None:
    """Serve the dashboard and the JSON API (/api/v1, docs at /api/docs) until stopped."""
    import uvicorn

    from pipeline.settings import get_settings
    from pipeline.web.app import create_app
    from pipeline.web.auth import Tokens

    settings = get_settings()
    host = host or settings.web_host
    port = port or settings.web_port
    if Tokens.from_settings(settings).open and host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"warning: no PIPELINE_WEB_TOKENS: listening on 127.0.0.1 only, not {host} "
                          "(anyone who reaches it may do anything)", highlight=False, markup=False)
        host = "127.0.0.1"
    elif Tokens.from_settings(settings).open:
        console.print("no PIPELINE_WEB_TOKENS: listening on 127.0.0.1 only; everyone who reaches it is an operator",
                      highlight=False)
    bind_db()
    app = create_app(settings)
    console.print(f"jetpipe web on http://{host}:{port}/ (API docs: http://{host}:{port}/api/docs)", highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


# ---- development stack ----------------------------------------------------------------------------------
@main.command("up")
@handles_errors
def up() -> None:
    """Start an embedded NATS (JetStream) + Redis for development, data under .pipeline/; prints the
    environment to use them (`eval "$(python cli.py up | grep ^export)"`)."""
    from pipeline.ops.devstack import DevStack, pid_alive

    stack = json.loads(STACK_FILE.read_text()) if STACK_FILE.exists() else None
    if stack and all(pid_alive(pid) for pid in stack["pids"]):
        console.print("stack already up (run `python cli.py down` first); its environment:")
    else:
        dev = DevStack.create(STACK_DIR.resolve(), persist=True, detach=True).start()
        stack = {"env": dev.env(), "pids": [dev.nats.pid, dev.redis.pid]}
        STACK_FILE.write_text(json.dumps(stack, indent=2))
        console.print(f"NATS {dev.nats_url} and Redis {dev.redis_url} running; database "
                      f"{dev.database_url} (data in {STACK_DIR.resolve()}/)", highlight=False)
    for key, value in stack["env"].items():
        click.echo(f"export {key}={value}")


@main.command("down")
@handles_errors
def down() -> None:
    """Stop the stack started by `up` (its data stays in .pipeline/), and say which jetpipe processes
    still use it."""
    from pipeline.ops.devstack import jetpipe_processes, stop_pid

    if not STACK_FILE.exists():
        console.print("no stack is up")
        return
    stack = json.loads(STACK_FILE.read_text())
    users = jetpipe_processes()
    stopped = sum(stop_pid(pid) for pid in stack["pids"])
    STACK_FILE.unlink()
    console.print(f"stopped {stopped} server(s); the data stays in {STACK_DIR.resolve()}/ (database, JetStream "
                  "store, Redis AOF): `python cli.py up` starts them on it again, `rm -rf .pipeline` forgets it",
                  highlight=False)
    if users:
        listing = ", ".join(f"{pid} ({what})" for pid, what in users)
        err_console.print(f"warning: jetpipe processes still running will retry until the stack is back or you "
                          f"stop them: {listing}", highlight=False, markup=False)


@main.command("demo-images")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--count", type=int, default=50, show_default=True, help="Images to generate.")
@click.option("--seed", type=int, default=7, show_default=True, help="Same seed, same images.")
@handles_errors
def demo_images(directory: str, count: int, seed: int) -> None:
    """Write synthetic moth-trap images (PNG) and their ground truth (ground_truth.json) to DIRECTORY,
    for `enqueue-job --pipeline moth-demo --images-dir DIRECTORY`."""
    from pipeline.errors import UserInputError
    from pipeline.sdk import moth

    if count < 1:
        raise UserInputError("--count must be at least 1")
    try:
        truth = moth.generate_images(directory, count, seed=seed)
    except OSError as exc:
        raise UserInputError(f"cannot write images to {directory!r}: {exc.strerror}") from None
    moths = sum(len(found) for found in truth.values())
    console.print(f"{count} image(s) with {moths} moth(s) in {Path(directory).resolve()}/ "
                  "(ground truth in ground_truth.json)", highlight=False)


@main.command("demo")
@click.option("--images", type=int, default=200, show_default=True, help="Synthetic images in the job.")
@click.option("--keep", is_flag=True, help="Keep the temporary directory (images, database, logs).")
@click.option("--timeout", type=float, default=600, show_default=True, help="Seconds to wait for the job.")
@click.option("--web", is_flag=True, help="Keep the dashboard (and the demo's stack) up until Ctrl-C.")
@click.option("--http", is_flag=True, help="Run the reference service through the HTTP gateway, not NATS.")
@handles_errors
def demo(images: int, keep: bool, timeout: float, web: bool, http: bool) -> None:
    """Self-contained demo: embedded stack, a worker, the reference service, one real job to the end.

    Exits 0 only if the job ends SUCCESS and its detections equal the generated ground truth.
    """
    from pipeline.errors import UserInputError
    from pipeline.ops.demo import run_demo
    from pipeline.web.server import BackgroundWebServer

    if images < 1:
        raise UserInputError("--images must be at least 1")
    ok = run_demo(console, images=images, keep=keep, timeout_s=timeout, project_dir=Path(__file__).resolve().parent,
                  serve_dashboard=lambda settings, rt: BackgroundWebServer(settings, rt).start(), web=web, http=http)
    sys.exit(RET_OK if ok else RET_JOB_FAILED)


if __name__ == "__main__":
    main(prog_name=os.environ.get("JETPIPE_PROG", "python cli.py"))
