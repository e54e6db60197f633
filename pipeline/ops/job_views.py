"""What operators see about jobs: plain dicts for `--json`, and rich tables and progress bars for people."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Iterable

import peewee
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from models import (
    Algorithm,
    Classification,
    Detection,
    ImageStatus,
    Job,
    JobImage,
    JobLog,
    JobStatus,
    Pipeline,
    Project,
    SourceImage,
    tuples,
    utcnow,
)
from pipeline import fairshare
from pipeline.core import inbox
from pipeline.errors import NotFound

STATUS_STYLE = {JobStatus.SUCCESS: "green", JobStatus.FAILURE: "red", JobStatus.REVOKED: "yellow",
                JobStatus.STARTED: "cyan", JobStatus.CANCELING: "yellow"}


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") + "Z" if value else None


def job_summary(job: Job, *, waiting: inbox.Waiting | None | bool = True) -> dict:
    """The job as a JSON-ready dict: status, stages, counters, timing, errors, and `received`: images whose
    results jetpipe has taken but not saved yet (read from the inbox unless `waiting` is given, as a list
    view does for many jobs at once; False: not read)."""
    if waiting is True:
        waiting = inbox.waiting([job.id]).get(job.id)
    stages = (job.progress or {}).get("stages", {})
    process, results = stages.get("process", {}), stages.get("results", {})
    end = job.finished_at or utcnow()
    elapsed = (end - job.started_at).total_seconds() if job.started_at else None
    processed = process.get("processed", 0)
    reused = job.reused_images or 0
    # images reused from an earlier job were settled at once: the rate is that of those sent to services
    rate = max(processed - reused, 0) / elapsed if elapsed and elapsed > 0 else None
    remaining = process.get("remaining", job.total_images)
    running = job.status not in JobStatus.TERMINAL
    failed = process.get("failed", 0)
    eta = remaining / rate if rate and running else None
    return {
        "id": job.id, "name": job.name, "pipeline": job.pipeline.slug, "dispatch_mode": job.dispatch_mode,
        "project": job.project_name,
        "priority": job.priority or 0, "priority_name": fairshare.priority_name(job.priority),
        "paused": running and job.paused_at is not None,
        "paused_at": _iso(job.paused_at) if running else None, "pause_reason": job.pause_reason if running else None,
        "paused_s": round(job.paused_s or 0.0, 1),
        "status": job.status, "error": job.error, "total_images": job.total_images,
        "processed": processed, "failed": failed, "succeeded": max(processed - failed, 0), "remaining": remaining,
        "reused": reused,
        "settled_percent": round(processed / job.total_images * 100, 1) if job.total_images else (
            0.0 if running else 100.0),
        # SUCCESS with some images failed is told apart from a clean one (the threshold let it succeed)
        "outcome": "SUCCESS-partial" if job.status == JobStatus.SUCCESS and failed else job.status,
        "received": waiting.images if waiting else 0,
        "received_oldest_s": round(waiting.age_s(utcnow()), 1) if waiting else None,
        "captures": results.get("captures", 0), "detections": results.get("detections", 0),
        "classifications": results.get("classifications", 0),
        "progress": (job.progress or {}).get("summary", {}).get("progress", 0.0),
        "stages": stages, "errors": (job.progress or {}).get("errors", []),
        "created_at": _iso(job.created_at), "started_at": _iso(job.started_at),
        "dispatched_at": _iso(job.dispatched_at), "finished_at": _iso(job.finished_at),
        "last_progress_at": _iso(job.last_progress_at),
        "elapsed_s": round(elapsed, 2) if elapsed is not None else None,
        "images_per_s": round(rate, 2) if rate else None,
        "eta_s": round(eta, 1) if eta is not None else None,
        "retry_of": job.retry_of,
        # for people: "4 min 12 s", "137 images/s", "≈ 27 min (06:08 UTC)"
        "elapsed_text": human_duration(elapsed) if elapsed is not None else None,
        "rate_text": f"{rate:,.0f} images/s" if rate and rate >= 10 else (f"{rate:.1f} images/s" if rate else None),
        "eta_text": (f"≈ {human_duration(eta, rough=True)} ({(utcnow() + dt.timedelta(seconds=eta)):%H:%M} UTC)"
                     if eta is not None else None),
    }


def human_duration(seconds: float, *, rough: bool = False) -> str:
    """`42 s`, `4 min 12 s`, `2 h 05 min`; `rough`: to the minute past a minute (an estimate's precision)."""
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 and not rough else f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min" if rough or not secs else f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02} min"


def job_summaries(jobs: list[Job]) -> list[dict]:
    """`job_summary` of each job, their waiting results read in one query."""
    waiting = inbox.waiting([job.id for job in jobs])
    return [job_summary(job, waiting=waiting.get(job.id)) for job in jobs]


def with_project() -> peewee.ModelSelect[Job]:
    """Jobs read with their pipeline and project (what a summary shows), in one query."""
    return Job.select(Job, Pipeline, Project).join(Pipeline).switch(Job).join(Project, peewee.JOIN.LEFT_OUTER)


def list_jobs(*, statuses=(), pipeline: str | None = None, search: str | None = None,
              before_id: int | None = None, limit: int = 50, projects: Iterable[str] | None = None) -> list[Job]:
    """Newest jobs first, filtered; `before_id` pages by key (fast however many jobs there are). `projects`:
    only jobs of these (None: every project)."""
    query = with_project().order_by(Job.id.desc()).limit(limit)
    if projects is not None:
        query = query.where(Project.name.in_(list(projects)))
    if statuses:
        query = query.where(Job.status.in_([s.upper() for s in statuses]))
    if pipeline:
        query = query.where(Pipeline.slug == pipeline)
    if search:
        query = query.where(Job.name.contains(search))
    if before_id:
        query = query.where(Job.id < before_id)
    return list(query)


def status_counts(projects: Iterable[str] | None = None) -> dict[str, int]:
    """Jobs per status (every status, zeros included); `projects`: of these projects only."""
    query = Job.select(Job.status, peewee.fn.COUNT(Job.id)).group_by(Job.status)
    if projects is not None:
        query = query.join(Project).where(Project.name.in_(list(projects)))
    counts: dict[str, int] = dict(tuples(query))
    return {status: counts.get(status, 0) for status in JobStatus.ALL}


def get_job(job_id: int, projects: Iterable[str] | None = None) -> Job | None:
    """The job `job_id` with its pipeline and project; None if there is none, or it is not of `projects`."""
    job = with_project().where(Job.id == job_id).get_or_none()
    if job is None or (projects is not None and job.project_name not in set(projects)):
        return None
    return job


def existing_job(job_id: int, projects: Iterable[str] | None = None) -> Job:
    """The job `job_id` (with its pipeline and project); raises NotFound, also for a job outside `projects`
    (a token limited to some projects cannot tell another project's job from no job)."""
    job = get_job(job_id, projects)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def taxon_counts(job_id: int, *, limit: int | None = None) -> list[dict]:
    """The job's real detections by classified taxon (each classification counts once), most first, with the
    mean score: one GROUP BY in the database."""
    count = peewee.fn.COUNT(Classification.id)
    query = (Classification.select(Classification.taxon, count, peewee.fn.AVG(Classification.score))
             .join(Detection).join(JobImage, on=(Detection.image == JobImage.image))
             .where((JobImage.job == job_id) & (Detection.bbox_key != ""))
             .group_by(Classification.taxon).order_by(count.desc(), Classification.taxon))
    return [{"taxon": taxon, "detections": n, "mean_score": round(score or 0.0, 3)}
            for taxon, n, score in tuples(query.limit(limit) if limit else query)]


def gallery(job_id: int, *, after: int = 0, limit: int = 48, taxon: str | None = None,
            min_score: float | None = None, failed: bool = False) -> dict:
    """One page of the job's images by image id (paged by key: `after`, fast on a job of any size), each with
    its detections (box, score, best classification), its top taxon and its manifest metadata. Filters: images
    with a detection of `taxon` scoring at least `min_score`; only failed images."""
    query = (JobImage.select(JobImage.image, SourceImage.url, JobImage.status, JobImage.error, JobImage.meta)
             .join(SourceImage).where((JobImage.job == job_id) & (JobImage.image > after))
             .order_by(JobImage.image).limit(limit))
    if failed:
        query = query.where(JobImage.status == ImageStatus.FAILED)
    if taxon is not None or min_score is not None:
        found = (Detection.select(Detection.id).join(Classification)
                 .where((Detection.image == JobImage.image) & (Detection.bbox_key != "")))
        if taxon is not None:
            found = found.where(Classification.taxon == taxon)
        if min_score is not None:
            found = found.where(Classification.score >= min_score)
        query = query.where(peewee.fn.EXISTS(found))
    rows = list(tuples(query))
    boxes: dict[int, list[dict]] = {image: [] for image, *_ in rows}
    if rows:
        detections = (Detection.select(Detection.image, Detection.id, Detection.x1, Detection.y1, Detection.x2,
                                       Detection.y2, Detection.score, Classification.taxon, Classification.score)
                      .join(Classification, peewee.JOIN.LEFT_OUTER)
                      .where(Detection.image.in_(list(boxes)) & (Detection.bbox_key != ""))
                      .order_by(Detection.image, Detection.id, Classification.score.desc()))
        seen: set[int] = set()
        for image, detection, x1, y1, x2, y2, score, label, label_score in tuples(detections):
            if detection in seen:  # its best classification came first
                continue
            seen.add(detection)
            boxes[image].append({"x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": score, "taxon": label,
                                 "taxon_score": label_score})
    images = []
    for image, url, status, error, meta in rows:
        found_boxes = boxes[image]
        best = max((b for b in found_boxes if b["taxon"]), key=lambda b: b["taxon_score"] or 0.0, default=None)
        images.append({"image_id": str(image), "url": url, "status": status, "error": error,
                       "metadata": json.loads(meta) if meta else None,
                       "detections": found_boxes, "top_taxon": best["taxon"] if best else None,
                       "top_score": best["taxon_score"] if best else None})
    return {"images": images, "next_after": int(rows[-1][0]) if len(rows) == limit else None}


def pipeline_taxa(slug: str, *, limit: int | None = 10) -> list[dict]:
    """Detections by classified taxon across every job of a pipeline (its classifiers' saved classifications;
    an image run by several jobs counts once, as it is saved once), most first, with the mean score."""
    count = peewee.fn.COUNT(Classification.id)
    query = (Classification.select(Classification.taxon, count, peewee.fn.AVG(Classification.score))
             .join(Algorithm).join(Pipeline).where(Pipeline.slug == slug)
             .group_by(Classification.taxon).order_by(count.desc(), Classification.taxon))
    return [{"taxon": taxon, "detections": n, "mean_score": round(score or 0.0, 3)}
            for taxon, n, score in tuples(query.limit(limit) if limit else query)]


def retried_as(job_id: int) -> list[int]:
    """The jobs made to retry this job's failed images, oldest first."""
    return [job_id for (job_id,) in tuples(Job.select(Job.id).where(Job.retry_of == job_id).order_by(Job.id))]


def failed_images(job_id: int, limit: int = 20, *, after_image: int = 0) -> list[dict[str, str | None]]:
    """The job's failed images by image id (paged by key: `after_image`), with URL and reason."""
    rows = (JobImage.select(JobImage.image, SourceImage.url, JobImage.error).join(SourceImage)
            .where((JobImage.job == job_id) & (JobImage.status == ImageStatus.FAILED)
                   & (JobImage.image > after_image))
            .order_by(JobImage.image).limit(limit))
    return [{"image_id": str(image), "url": url, "error": error} for image, url, error in tuples(rows)]


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_ANY_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def plain(text: object, *, one_line: bool = False) -> str:
    """`text` with control characters (terminal escape sequences among them) spelled out, e.g. `\\x1b`:
    text from processing services and job names reaches people's terminals as it is written, inert. With
    `one_line`, newlines and tabs are spelled out too (a log line a service's text cannot split or forge)."""
    return (_ANY_CONTROL if one_line else _CONTROL).sub(lambda m: repr(m.group())[1:-1], str(text))


def literal(text: object) -> Text:
    """`plain(text)` for rich: shown as written, never read as markup (`[/x]` stays `[/x]`)."""
    return Text(plain(text))


def render_status(console: Console, summary: dict, failures: list[dict]) -> None:
    style = STATUS_STYLE.get(summary["status"], "white")
    console.print(f"[bold]Job {summary['id']}[/bold] {escape(plain(repr(summary['name'])))}  "
                  f"project={escape(summary['project'])}  pipeline={summary['pipeline']}  "
                  f"mode={summary['dispatch_mode']}  priority={summary['priority_name']}  "
                  f"status=[{style}]{summary['status']}[/{style}]" + ("  [yellow]PAUSED[/yellow]" if summary["paused"]
                                                                       else ""))
    if summary["paused"]:
        console.print(Text.assemble(("paused since ", "yellow"), summary["paused_at"] or "",
                                    *((": ", literal(summary["pause_reason"])) if summary["pause_reason"] else ())))
    table = Table("stage", "status", "progress", "counters")
    for name, stage in summary["stages"].items():
        counters = ", ".join(f"{k}={v}" for k, v in stage.items() if k not in ("status", "progress"))
        table.add_row(name, stage.get("status", ""), f"{stage.get('progress', 0) * 100:.1f}%", counters)
    console.print(table)
    if summary["reused"]:
        console.print(f"{summary['reused']} image(s) reuse the results an earlier job of the same pipeline version "
                      "saved (not processed again)")
    if summary["received"]:
        console.print(f"[yellow]{summary['received']} image(s) answered by the processing service and waiting to "
                      f"be saved[/yellow] (oldest {summary['received_oldest_s']:g} s ago)")
    timing = [f"elapsed {summary['elapsed_s']} s" if summary["elapsed_s"] is not None else "not started"]
    if summary["images_per_s"]:
        timing.append(f"{summary['images_per_s']} images/s")
    if summary["eta_s"] is not None:
        timing.append(f"ETA {summary['eta_s']} s")
    console.print("  ".join(timing))
    if summary["error"]:
        console.print(Text.assemble(("reason: ", "red"), literal(summary["error"])))
    for entry in summary["errors"][-5:]:
        console.print(Text.assemble(("error: ", "yellow"), literal(entry)))
    if failures:
        failed = Table("failed image", "reason", title=f"failed images (first {len(failures)})")
        for f in failures:
            failed.add_row(f["image_id"], literal(f["error"] or ""))
        console.print(failed)


def render_jobs(console: Console, jobs: list[dict]) -> None:
    table = Table("id", "name", "project", "pipeline", "priority", "status", "images", "processed", "failed",
                  "detections", "created")
    for j in jobs:
        style = STATUS_STYLE.get(j["status"], "white")
        status = f"[{style}]{j['status']}[/{style}]" + (" [yellow]paused[/yellow]" if j["paused"] else "")
        table.add_row(str(j["id"]), literal(j["name"]), literal(j["project"]), j["pipeline"], j["priority_name"],
                      status, str(j["total_images"]), str(j["processed"]), str(j["failed"]), str(j["detections"]),
                      j["created_at"] or "")
    console.print(table)


def job_logs(job_id: int, *, after_id: int = 0, limit: int | None = None) -> list[JobLog]:
    query = JobLog.select().where((JobLog.job == job_id) & (JobLog.id > after_id)).order_by(JobLog.id)
    return list(query.limit(limit) if limit else query)


def watch(console: Console, job_id: int, *, poll_s: float = 0.5, timeout_s: float | None = None) -> Job:
    """Live progress bars (one per stage) until the job is terminal or `timeout_s` passes; returns the job."""
    deadline = time.monotonic() + timeout_s if timeout_s else None
    job = existing_job(job_id)
    total = max(job.total_images, 1)
    columns = (TextColumn("[bold]{task.description:<8}[/bold]"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bars:
        stages = {name: bars.add_task(name, total=total, info="") for name in ("collect", "process", "results")}
        while True:
            job = existing_job(job_id)
            s = job_summary(job)
            collect = s["stages"].get("collect", {})
            bars.update(stages["collect"], completed=total if collect.get("status") == "SUCCESS" else 0,
                        info=f"job {job_id} {s['status']}")
            bars.update(stages["process"], completed=s["processed"], info=f"failed {s['failed']}")
            bars.update(stages["results"], completed=s["processed"],  # images whose outcome is saved
                        info=f"captures {s['captures']}  detections {s['detections']}  "
                             f"classifications {s['classifications']}")
            if job.status in JobStatus.TERMINAL or (deadline and time.monotonic() > deadline):
                return job
            time.sleep(poll_s)


def render_check(console: Console, report: dict) -> None:
    """One jobs_health_check report: per sub-check counts and per-job outcomes, then its notes."""
    table = Table("sub-check", "checked", "fixed", "unfixable", "jobs", title=f"jobs_health_check at {report['at']}")
    for name in ("lost_images", "state_rebuild", "stale_jobs", "zombies"):
        sub = report[name]
        jobs = ", ".join(f"{k}:{v}" for k, v in sub.get("jobs", {}).items()) or sub.get("error", "")
        table.add_row(name, str(sub["checked"]), str(sub["fixed"]), str(sub["unfixable"]), jobs)
    console.print(table)
    for name in ("lost_images", "state_rebuild", "stale_jobs", "zombies"):
        for note in report[name].get("notes", []):
            console.print(Text.assemble(("note: ", "yellow"), literal(note)))


def render_health(console: Console, report: dict) -> None:
    """`cli.py health`: status, dependencies, workers, pipelines, running jobs, last check, problems."""
    style = {"healthy": "green", "degraded": "yellow", "unreachable": "red"}[report["status"]]
    console.print(f"jetpipe is [{style}]{report['status']}[/{style}] ({report['at']})")
    deps = Table("dependency", "reachable", "version", "url / error")
    for name, dep in report["dependencies"].items():
        extra = " (JetStream on)" if dep.get("jetstream") else (" (JetStream OFF)" if "jetstream" in dep else "")
        deps.add_row(name, "yes" if dep["reachable"] else "[red]NO[/red]", str(dep.get("version") or "") + extra,
                     dep.get("error") or dep.get("url", ""))
    console.print(deps)
    workers = report["workers"] if report["workers"] is not None else "? (Redis unreachable)"
    console.print(f"live worker processes: {workers}")
    for stream, fact in report["dependencies"].get("nats", {}).get("bridge", {}).items():
        if fact.get("exists"):
            reader = "read by the workers" if fact["consumer_exists"] else "[red]NO CONSUMER[/red]"
            console.print(f"{stream}: {fact['messages']} message(s) waiting, {reader}")
    for service in report.get("http_services", []):
        console.print(literal(f"HTTP service {service['service']} (pipeline {service['pipeline']}): last request "
                              f"{service['last_request_s_ago']} s ago, job {service['job']}, holding "
                              f"{service['holding']} task(s)"))
    for slug, seen in report["pipelines"].items():
        console.print(f"pipeline {slug}: last task delivery {seen['last_delivery'] or 'never'}, "
                      f"{seen['tasks_waiting']} task(s) waiting")
    if report["jobs"]:
        jobs = Table("job", "pipeline", "status", "processed", "failed", "idle s", "consumer")
        for j in report["jobs"]:
            c = j["consumer"]
            counters = (f"pending={c['num_pending']} ack_pending={c['num_ack_pending']} "
                        f"redelivered={c['num_redelivered']}") if c else ""
            jobs.add_row(str(j["id"]), j["pipeline"], j["status"], f"{j['processed']}/{j['total']}", str(j["failed"]),
                         str(j["idle_s"]), counters)
        console.print(jobs)
    last = report["last_health_check"]
    if last:
        parts = [f"{k} {v.get('checked', 0)}/{v.get('fixed', 0)}/{v.get('unfixable', 0)}"
                 for k, v in last.items() if isinstance(v, dict)]
        console.print(f"last health check {last['at']} (checked/fixed/unfixable): " + ", ".join(parts))
    elif not report["dependencies"].get("redis", {}).get("reachable", True):
        console.print("last health check: unknown (its report is kept in Redis, which is unreachable)")
    else:
        console.print("no health check has run yet (workers run one every PIPELINE_HEALTH_CHECK_SECONDS)")
    for problem in report["problems"]:
        console.print(Text.assemble(("problem: ", "yellow"), literal(problem)))
