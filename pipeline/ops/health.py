"""`cli.py health`: is jetpipe healthy right now, and if not, why. Read-only.

Exit status: 0 healthy, 1 degraded (something needs attention), 3 a dependency is unreachable (the CLI's
code for that everywhere).
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
from typing import Any

import nats.js.errors
import peewee
import redis

import models
from models import DispatchMode, Job, JobStatus, Pipeline, SchemaMissing, utcnow
from pipeline import names
from pipeline.core import inbox, unsaved, webhooks
from pipeline.infra import dlq
from pipeline.infra.jobstate import connect_redis
from pipeline.infra.natswatch import round_trip
from pipeline.infra.presence import http_services, live_workers, vanished_workers
from pipeline.infra.taskqueue import NATS_FAILURES, TaskQueue, connect_nats
from pipeline.settings import Settings, redact

HEALTHY, DEGRADED, UNREACHABLE = 0, 1, 3
_NAMES = {"nats": "NATS", "database": "the database"}


async def _nodes_facts(settings: Settings) -> list[dict]:
    """With a cluster's list of servers: whether each node answers (probed at once); [] for one server."""
    servers = [u.strip() for u in settings.nats_url.split(",") if u.strip()]
    return list(await asyncio.gather(*(_node_facts(u, settings) for u in servers))) if len(servers) > 1 else []


async def _nats_facts(settings: Settings, nodes: list[dict]) -> tuple[dict, dict[int, dict]]:
    """Server facts and the consumer counters of every job consumer (one connection, fails fast), read
    through a node that answered its probe (`nodes`), so one node lost makes the report degraded (naming
    it), not unreachable."""
    servers = [u.strip() for u in settings.nats_url.split(",") if u.strip()]
    usable = [u for u, node in zip(servers, nodes, strict=False) if node["ok"]] or servers
    nc = await connect_nats(",".join(usable), name="jetpipe-health", connect_timeout_s=3, reconnect=False,
                            **settings.nats_options())
    try:
        queue = TaskQueue(nc)
        js_ok, js_error = True, None
        try:
            await queue.js.account_info()
        except NATS_FAILURES as exc:
            js_ok, js_error = False, str(exc)
        facts = {"reachable": True, "url": redact(settings.nats_url), "version": nc._server_info.get("version"),
                 "jetstream": js_ok, **({"error": f"JetStream: {js_error}"} if js_error else {})}
        if nodes:
            facts["nodes"] = nodes
        if js_ok:
            facts["bridge"] = await _bridge_facts(queue)
        job_consumers = (await queue.job_consumers()) if js_ok else []
        if js_ok:
            facts["job_slots"] = await _job_slots(queue, job_consumers)
        consumers = {}
        for consumer in job_consumers:
            state = await queue.consumer_state(consumer.job_id, consumer.pipeline)
            consumers[consumer.job_id] = {"num_pending": state.num_pending, "num_ack_pending": state.num_ack_pending,
                                          "num_redelivered": state.num_redelivered,
                                          "last_delivery": state.last_active.replace(tzinfo=None)
                                          if state.last_active else None}
        return facts, consumers
    finally:
        await nc.close()


async def _node_facts(url: str, settings: Settings) -> dict:
    """One NATS node of a cluster's URL list: does it answer a JetStream request (None: why not)."""
    try:
        nc = await connect_nats(url, name="jetpipe-health-node", connect_timeout_s=3, reconnect=False,
                                **settings.nats_options())
    except Exception as exc:  # noqa: BLE001 - unreachable, whatever the way
        return {"url": redact(url), "ok": False, "error": str(exc) or type(exc).__name__}
    try:
        why = await round_trip(nc, 2)
        return {"url": redact(url), "ok": why is None, **({"error": why} if why else {})}
    finally:
        await nc.close()


def _node_problems(nodes: list[dict]) -> list[str]:
    return [f"NATS node {node['url']} does not answer as it should ({node['error']}): its clients move to another "
            "node within seconds; if it lasts, look at that node and its links" for node in nodes if not node["ok"]]


async def _job_slots(queue: TaskQueue, job_consumers) -> dict:
    """Job consumers in use, the most a pipeline's tasks stream allows (None: no stream yet, or no limit),
    and the pipelines whose stream holds that many."""
    used = collections.Counter(c.pipeline for c in job_consumers)
    limits = {}
    for slug in await queue.task_stream_pipelines():
        try:
            limit = (await queue.js.stream_info(names.tasks_stream(slug))).config.max_consumers
        except nats.js.errors.NotFoundError:
            continue
        limits[slug] = limit if limit and limit > 0 else None
    full = sorted(slug for slug, limit in limits.items() if limit is not None and used[slug] >= limit)
    return {"used": len(job_consumers), "max": max((v for v in limits.values() if v), default=None), "full": full}


async def _bridge_facts(queue: TaskQueue) -> dict[str, dict[str, Any]]:
    """Per stream the workers' bridge reads: messages waiting, and whether its durable consumer exists."""
    facts: dict[str, dict[str, Any]] = {}
    for stream, consumer in ((names.RESULTS_STREAM, names.RESULTS_BRIDGE_CONSUMER),
                             (names.ADVISORIES_STREAM, names.ADVISORIES_CONSUMER)):
        try:
            info = await queue.js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            facts[stream] = {"exists": False}
            continue
        messages = info.state.messages
        try:
            await queue.js.consumer_info(stream, consumer)
            present = True
        except nats.js.errors.NotFoundError:
            present = False
        facts[stream] = {"exists": True, "messages": messages, "consumer": consumer, "consumer_exists": present,
                         "bytes": info.state.bytes, "max_bytes": info.config.max_bytes}
    return facts


#: How full the results stream may be before `health` says so (new results are refused when it is full).
RESULTS_FULL_WARNING = 0.8


def _bridge_problems(bridge: dict[str, dict]) -> list[str]:
    problems = []
    results = bridge.get(names.RESULTS_STREAM) or {}
    if results.get("exists") and (results.get("max_bytes") or 0) > 0 \
            and results["bytes"] >= RESULTS_FULL_WARNING * results["max_bytes"]:
        problems.append(f"{names.RESULTS_STREAM} holds {results['bytes'] / 2**20:,.0f} MiB of results not yet taken, "
                        f"{results['bytes'] / results['max_bytes']:.0%} of its {results['max_bytes'] / 2**30:g} GiB "
                        "(PIPELINE_NATS_RESULTS_MAX_GB): when full, services' results are refused and retried; "
                        "start more workers, or look at why the bridge does not take them")
    for stream, fact in bridge.items():
        if fact.get("exists") and not fact["consumer_exists"] and fact["messages"]:
            problems.append(f"{stream} has {fact['messages']} unprocessed message(s) and no consumer "
                            f"{fact['consumer']}: no worker is reading it (NATS lost it, or it was deleted); "
                            "a running worker re-creates it within seconds, else start `dramatiq pipeline.actors`")
    return problems


def build_report(settings: Settings, runner) -> tuple[int, dict]:
    now = utcnow()
    deps: dict[str, dict] = {}
    problems: list[str] = []

    try:
        # never rebinds a live process's handle
        db = models.database.obj or models.bind(settings.database_url, session=settings.db_session())
        db.connect(reuse_if_open=True)
        version = db.execute_sql("select version()" if models.is_postgres() else "select sqlite_version()").fetchone()
        deps["database"] = {"reachable": True, "url": redact(settings.database_url), "version": version[0]}
    except peewee.PeeweeException as exc:
        deps["database"] = {"reachable": False, "url": redact(settings.database_url), "error": str(exc).strip()}

    client = connect_redis(settings.redis_url)
    workers = None
    vanished: list[dict] = []
    services: list[dict] = []
    last_check = None
    try:
        deps["redis"] = {"reachable": True, "url": redact(settings.redis_url),
                         "version": client.info("server")["redis_version"]}
        services = http_services(client)
        live = live_workers(client)
        workers = len(live)
        vanished = vanished_workers(client, live)
        for worker in vanished[:10]:
            problems.append(f"worker {worker['worker']} stopped announcing itself {_duration(worker['silent_s'])} "
                            "ago without a clean shutdown (its host lost, or the process killed): the messages it "
                            "held return to other workers after their timeouts")
        for worker in live:
            for dependency in ("nats", "database"):
                if worker.get(dependency, "ok") != "ok":
                    problems.append(f"worker {worker['worker']} cannot reach {_NAMES[dependency]}: "
                                    f"{worker[dependency]}")
        problems += _dead_letter_problems(client)
        raw = client.get(names.HEALTH_LAST_KEY)
        last_check = json.loads(raw) if raw else None
    except redis.RedisError as exc:
        deps["redis"] = {"reachable": False, "url": redact(settings.redis_url), "error": str(exc)}
    finally:
        client.close()

    consumers: dict[int, dict] = {}
    nodes: list[dict] = []
    try:
        nodes = runner.run(_nodes_facts(settings), timeout=15)
        problems += _node_problems(nodes)
        deps["nats"], consumers = runner.run(_nats_facts(settings, nodes), timeout=30)
        if not deps["nats"]["jetstream"]:
            problems.append("NATS is up but JetStream is not enabled")
        problems += _bridge_problems(deps["nats"].get("bridge", {}))
    except Exception as exc:  # noqa: BLE001 - unreachable, whatever the way
        deps["nats"] = {"reachable": False, "url": redact(settings.nats_url), "error": str(exc) or type(exc).__name__,
                        **({"nodes": nodes} if nodes else {})}

    jobs_out: list[dict[str, Any]] = []
    pipelines: dict[str, Any] = {}
    if deps["database"]["reachable"]:
        try:
            running = (Job.select(Job, Pipeline).join(Pipeline).where(Job.status.in_(JobStatus.RUNNING))
                       .order_by(Job.id))
            for job in running:
                jobs_out.append(_job_line(job, consumers.get(job.id), now, settings, problems, pipelines))
        except SchemaMissing as exc:
            problems.append(str(exc))
        except peewee.PeeweeException as exc:
            deps["database"] = {**deps["database"], "reachable": False, "error": str(exc).strip()}
    if deps["database"]["reachable"] and not any("init-db" in p for p in problems):
        problems += _saving_problems(jobs_out, now, settings, last_check, problems)
        given_up = webhooks.failing()
        if given_up:
            problems.append(f"{given_up} webhook delivery(ies) given up after {webhooks.MAX_ATTEMPTS} attempts: "
                            "their endpoints refused or did not answer; see the job's page or `cli.py status JOB`")
    slots = deps.get("nats", {}).get("job_slots") or {}
    full = set(slots.get("full") or ())
    unstarted = [j for j in jobs_out if j["status"] in (JobStatus.CREATED, JobStatus.PENDING)
                 and j["mode"] == DispatchMode.ASYNC_API and j["pipeline"] in full]
    if unstarted:
        problems.append(f"{len(unstarted)} job(s) wait for a free job slot: the tasks stream of pipeline(s) "
                        f"{', '.join(sorted({j['pipeline'] for j in unstarted}))} holds its maximum of "
                        f"{slots['max']} job consumers (PIPELINE_NATS_MAX_JOBS); they start as running jobs end")
    if workers == 0 and jobs_out:
        problems.append(f"{len(jobs_out)} job(s) running but no live Dramatiq worker "
                        "(start `dramatiq pipeline.actors`)")
    if last_check:
        for name, sub in last_check.items():
            if isinstance(sub, dict) and sub.get("error"):
                problems.append(f"last health check: {name} raised {sub['error']}")

    report = {"at": now.isoformat(timespec="seconds") + "Z", "dependencies": deps, "workers": workers,
              "vanished_workers": vanished,
              "http_services": services,
              "pipelines": pipelines, "jobs": jobs_out, "last_health_check": last_check, "problems": problems}
    if not all(d["reachable"] for d in deps.values()):
        status = UNREACHABLE
    elif problems:
        status = DEGRADED
    else:
        status = HEALTHY
    report["status"] = {HEALTHY: "healthy", DEGRADED: "degraded", UNREACHABLE: "unreachable"}[status]
    return status, report


def _saving_problems(jobs_out: list[dict], now: dt.datetime, settings: Settings, last_check: dict | None,
                     reported: list[str]) -> list[str]:
    """Jobs whose results wait too long to be saved, parked results, jobs that should have moved (unless
    `reported` already says they wait for a processing service), and an overdue periodic check; each job
    line gets its `results_waiting`."""
    problems = []
    cutoff_s = settings.stalled_jobs_max_minutes * 60
    waiting = inbox.waiting()
    for line in jobs_out:
        if line["id"] in waiting:
            line["results_waiting"] = waiting[line["id"]].as_dict(now)
    for job_id, w in sorted(waiting.items()):
        if w.age_s(now) > cutoff_s:
            retrying = f", {w.retrying} of them failing and retried" if w.retrying else ""
            problems.append(f"job {job_id}: results received {_duration(w.age_s(now))} ago are still not saved "
                            f"({w.messages} message(s), {w.images} image(s){retrying}): saving fails or is far behind; "
                            f"see `cli.py logs {job_id}` and the workers' logs")
    parked = unsaved.parked_counts()
    if parked:
        jobs_text = ", ".join(map(str, sorted(parked)[:20])) + (" ..." if len(parked) > 20 else "")
        problems.append(f"{sum(parked.values())} result message(s) could not be saved and are parked (job(s) "
                        f"{jobs_text}): `cli.py parked list`, then `cli.py parked replay` or `cli.py parked drop`")
    overdue_s = cutoff_s + 2 * settings.health_check_seconds
    waiting_for_service = {int(p.split()[1]) for p in reported if p.startswith("job ") and " waits: " in p}
    for line in jobs_out:
        if (line["status"] == JobStatus.STARTED and line["mode"] == DispatchMode.ASYNC_API
                and (line["idle_s"] or 0) > overdue_s and line["id"] not in waiting_for_service
                and "paused_since" not in line):
            problems.append(f"job {line['id']} has made no progress for {_duration(line['idle_s'])} "
                            f"({line['processed']} of {line['total']} image(s) settled) although the health check "
                            "should have moved it by now: its results are not being saved, or no worker runs the "
                            f"check; see `cli.py status {line['id']}` and the workers' logs")
    if last_check and jobs_out:
        at = dt.datetime.fromisoformat(last_check["at"].rstrip("Z"))
        age = (now - at).total_seconds()
        if age > 3 * settings.health_check_seconds + 30:
            problems.append(f"the periodic health check last ran {_duration(age)} ago (it runs every "
                            f"{settings.health_check_seconds:g} s): no worker is running it, or it hangs")
    return problems


def _dead_letter_problems(client: redis.Redis) -> list[str]:
    dead = dlq.list_dead(client)
    if not dead:
        return []
    actors = sorted({d.message.actor_name for d in dead})
    return [f"{len(dead)} Dramatiq dead letter(s) ({', '.join(actors)}): a stage failed for good; "
            "`cli.py dlq list`, then `cli.py dlq replay`"]


def _job_line(job: Job, consumer: dict | None, now: dt.datetime, settings: Settings, problems: list[str],
              pipelines: dict) -> dict:
    stages = (job.progress or {}).get("stages", {})
    activity = job.last_progress_at or job.dispatched_at or job.updated_at
    line = {"id": job.id, "pipeline": job.pipeline.slug, "status": job.status, "mode": job.dispatch_mode,
            "total": job.total_images, "processed": stages.get("process", {}).get("processed", 0),
            "failed": stages.get("process", {}).get("failed", 0),
            "idle_s": round((now - activity).total_seconds()) if activity else None, "consumer": None}
    if job.deadline_at is not None:
        line["deadline_in_s"] = round((job.deadline_at - now).total_seconds())
    if job.paused_at is not None:  # waits by intent: no verdict runs, nothing to warn about
        line["paused_since"] = job.paused_at.isoformat(timespec="seconds") + "Z"
        line["pause_reason"] = job.pause_reason
        return line
    if job.dispatch_mode != DispatchMode.ASYNC_API or job.dispatched_at is None:
        return line
    if consumer is None:
        return line
    last = consumer["last_delivery"]
    line["consumer"] = {k: (v.isoformat(timespec="seconds") + "Z" if isinstance(v, dt.datetime) else v)
                        for k, v in consumer.items()}
    seen = pipelines.setdefault(job.pipeline.slug, {"last_delivery": None, "tasks_waiting": 0})
    seen["tasks_waiting"] += consumer["num_pending"]
    if last and (seen["last_delivery"] is None or last.isoformat() > seen["last_delivery"]):
        seen["last_delivery"] = last.isoformat(timespec="seconds") + "Z"
    waiting_since = max(filter(None, [last, job.dispatched_at]))
    waited = (now - waiting_since).total_seconds()
    if consumer["num_pending"] > 0 and waited > settings.nats_task_ttr:
        left = ""
        if last is None:  # never picked up: the pickup deadline runs
            pickup_by = job.dispatched_at + dt.timedelta(
                seconds=(job.pickup_timeout_s or settings.job_pickup_timeout) + (job.paused_s or 0))
            left = f"; it ends FAILURE in {_duration(max((pickup_by - now).total_seconds(), 0))} unless one does"
        problems.append(f"job {job.id} waits: no processing service has pulled tasks for pipeline "
                        f"{job.pipeline.slug} for {_duration(waited)} ({consumer['num_pending']} task(s) "
                        f"waiting){left}")
    return line


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
