"""`jobs_health_check`: keep every job moving toward its terminal state.

Sub-checks run in this order, each isolated (one raising does not stop the others), each reporting
`{checked, fixed, unfixable}`:

0. deadlines     a job no processing service has pulled a task of within its pickup timeout (24 h by
                 default) ends FAILURE saying so; a job past its own deadline (`--deadline`) has its
                 pending images failed, and the threshold decides. Results in hand are saved first;
                 those that still cannot be saved fail their images saying so (a deadline binds).
1. lost_images   running async jobs idle past PIPELINE_STALLED_JOBS_MAX_MINUTES whose remaining tasks
                 JetStream gave up on: those images become failed (invariant 8). Tasks never delivered
                 (no processing service) are not lost: the job waits and the check says why.
2. state_rebuild a running job whose Redis state is missing gets it rebuilt from its JobImage rows; one
                 whose NATS consumer is missing (NATS lost its store) gets its pending tasks re-dispatched;
                 a job whose run_job message was lost is started again.
3. stale_jobs    the reaper: REVOKEs jobs no check can move (internal jobs whose worker is gone, jobs
                 stuck undispatched, cancels that did not finish) — never an async job whose NATS or Redis
                 check failed this tick (an outage is not a stuck job, invariant 9).
4. zombies       consumers and Redis keys of ended or deleted jobs, after a grace period.

A paused job is judged by none of 0, 1 and 3: it waits by intent, and its clocks move on by the paused time
when it is resumed (pipeline/core/scheduling.py).

Cost grows with the number of candidate jobs, never with the number of images.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import peewee
import redis

from models import DispatchMode, Job, JobStatus, Pipeline, for_update, tuples, utcnow, write_transaction
from pipeline import names
from pipeline.core import inbox, jobs, progress, saving
from pipeline.core.joblog import job_log, job_log_ids
from pipeline.core.lost import fail_lost
from pipeline.core.outcomes import finish
from pipeline.core.progress import append_error
from pipeline.core.retry import is_outage
from pipeline.errors import TransientError
from pipeline.infra.jobstate import Snapshot
from pipeline.infra.metrics import metrics
from pipeline.infra.runtime import Runtime

log = logging.getLogger(__name__)

#: An ended job's consumer and Redis keys are removed this long after it ended (seconds).
ZOMBIE_GRACE_S = 5 * 60
#: A PENDING job whose run_job has not started after this long is sent again (seconds).
RESTART_PENDING_AFTER_S = 2 * 60
#: A CANCELING job idle this long has its cancel finished by the reaper (seconds).
FINISH_CANCEL_AFTER_S = 60
#: Seconds a deadline spends saving the job's waiting results before it fails what is still pending.
DEADLINE_DRAIN_S = 10.0


class Check(StrEnum):
    """What a sub-check did with one job (reported per job by `cli.py health --json`)."""

    OK = "ok"
    ERROR = "error"  # NATS or Redis could not be read: unfixable this tick, never reaped
    WAITING = "waiting"  # tasks never delivered: no processing service has pulled them yet
    BUSY = "busy"  # tasks are being delivered: nothing is lost
    RESULTS_QUEUED = "results_queued"  # results wait to be saved: nothing is lost
    RACED = "raced"  # another process moved the job meanwhile
    MARKED_FAILED = "marked_failed"
    RESYNCED = "resynced"
    FINALIZED = "finalized"
    STATE_DISAPPEARED = "state_disappeared"
    NO_CONSUMER = "no_consumer"
    RESTARTED = "restarted"
    ENDED = "ended"
    REDIS_REBUILT = "redis_rebuilt"
    REDISPATCHED = "redispatched"
    CANCEL_FINISHED = "cancel_finished"
    SKIPPED_UNREACHABLE = "skipped_unreachable"
    LEFT_TO_RECONCILIATION = "left_to_reconciliation"
    REVOKED = "revoked"
    CONSUMER_REMOVED = "consumer_removed"
    REDIS_REMOVED = "redis_removed"
    NOT_PICKED_UP = "not_picked_up"  # no service pulled a task within the pickup timeout: FAILURE
    DEADLINE_PASSED = "deadline_passed"  # the job's own deadline: its pending images failed


@dataclasses.dataclass
class CheckResult:
    checked: int = 0
    fixed: int = 0
    unfixable: int = 0
    jobs: dict[int, str] = dataclasses.field(default_factory=dict)  # per-job outcome(s), Check values
    notes: list[str] = dataclasses.field(default_factory=list)  # what an operator should know

    def tally(self, job_id: int, outcome: Check, *, fixed: tuple[Check, ...],
              unfixable: tuple[Check, ...] = (Check.ERROR,)) -> bool:
        """Record a job's outcome and count it as fixed or unfixable; True if unfixable (the job's NATS or
        Redis could not be read: the reaper must leave it alone this tick)."""
        self.jobs[job_id] = outcome
        if outcome in fixed:
            self.fixed += 1
        elif outcome in unfixable:
            self.unfixable += 1
            return True
        return False

    def add_outcome(self, job_id: int, outcome: Check) -> None:
        """Record one more thing done for a job (a job may have both its consumer and its keys removed)."""
        self.jobs[job_id] = f"{self.jobs[job_id]},{outcome}" if job_id in self.jobs else outcome

    def as_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "fixed": self.fixed, "unfixable": self.unfixable,
                "jobs": {str(k): v for k, v in self.jobs.items()}, "notes": self.notes}


def _activity(job: Job) -> dt.datetime:
    """When the job last showed life: its last progress, else its dispatch, else its last update."""
    return job.last_progress_at or job.dispatched_at or job.updated_at or job.created_at


class HealthCheck:
    """One tick of the health check over `runtime`'s database, Redis and NATS."""

    def __init__(self, runtime: Runtime, *, now: dt.datetime | None = None):
        self.runtime = runtime
        self.settings = runtime.settings
        self.now = now or utcnow()
        self.cutoff = self.now - dt.timedelta(minutes=self.settings.stalled_jobs_max_minutes)
        self.unreachable_jobs: set[int] = set()  # NATS or Redis check failed this tick: never reaped

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        report: dict[str, Any] = {"at": self.now.isoformat(timespec="seconds") + "Z"}
        for name in ("deadlines", "lost_images", "state_rebuild", "stale_jobs", "zombies"):
            try:
                report[name] = getattr(self, name)().as_dict()
            except Exception as exc:  # noqa: BLE001 - isolation: one sub-check failing stops no other
                log.exception("jobs_health_check: sub-check %s raised", name)
                report[name] = {"checked": 0, "fixed": 0, "unfixable": 1, "error": f"{type(exc).__name__}: {exc}"}
        report["duration_s"] = round(time.monotonic() - started, 3)
        return report

    def _running_async(self) -> peewee.ModelSelect[Job]:
        return (Job.select(Job, Pipeline).join(Pipeline)
                .where((Job.status == JobStatus.STARTED) & (Job.dispatch_mode == DispatchMode.ASYNC_API)
                       & Job.dispatched_at.is_null(False)))

    def _running_unpaused(self) -> peewee.ModelSelect[Job]:
        """The running async jobs an idle-time verdict may judge: a paused job waits by intent (its clocks
        move on by the paused time when it is resumed, `scheduling.resume`)."""
        return self._running_async().where(Job.paused_at.is_null())

    # ---- 0. deadlines -----------------------------------------------------------------------------------
    def deadlines(self) -> CheckResult:
        result = CheckResult()
        for job in self._running_unpaused().order_by(Job.id):
            if job.dispatched_at is None:  # (never: the query selects dispatched jobs)
                continue
            pickup_by = job.dispatched_at + dt.timedelta(seconds=self._pickup_timeout(job) + (job.paused_s or 0))
            due_pickup = self.now >= pickup_by
            due_deadline = job.deadline_at is not None and self.now >= job.deadline_at
            if not (due_pickup or due_deadline):
                continue
            result.checked += 1
            outcome = self._isolated("deadlines", job, result, self._deadline, job, result, due_deadline)
            if outcome is not None and result.tally(job.id, outcome,
                                                    fixed=(Check.NOT_PICKED_UP, Check.DEADLINE_PASSED)):
                self.unreachable_jobs.add(job.id)
        return result

    def _isolated(self, check: str, job: Job, result: CheckResult, run: Callable[..., Check | None],
                  *args: object) -> Check | None:
        """`run(*args)` for one job; an exception is logged and reported, the job is left alone this tick (never
        reaped), and the check goes on with its other jobs."""
        try:
            return run(*args)
        except Exception as exc:  # noqa: BLE001 - one job's trouble must not skip the others
            if is_outage(exc):
                log.warning("job=%s jobs_health_check %s: dependency unreachable (%s: %s); unfixable this tick",
                            job.id, check, type(exc).__name__, exc)
            else:
                log.exception("job=%s jobs_health_check %s raised; the job is left as it is this tick", job.id, check)
            result.notes.append(f"job {job.id}: {check} raised {type(exc).__name__}: {exc}")
            result.tally(job.id, Check.ERROR, fixed=())
            self.unreachable_jobs.add(job.id)
            return None

    def _deadline(self, job: Job, result: CheckResult, due_deadline: bool) -> Check | None:
        consumer = self.runtime.tasks.consumer_state(job.id, job.pipeline.slug)
        if not consumer.reachable:
            return Check.ERROR
        if due_deadline and job.deadline_at is not None:
            reason = (f"deadline passed: the job was to end by {job.deadline_at.isoformat(timespec='seconds')}Z "
                      "and this image had no result by then")
            return self._end_pending(job, reason, Check.DEADLINE_PASSED, result)
        if consumer.exists and consumer.num_delivered == 0:
            reason = (f"no processing service picked up a task of pipeline {job.pipeline.slug} within "
                      f"{_duration(self._pickup_timeout(job))} of dispatch")
            return self._end_pending(job, reason, Check.NOT_PICKED_UP, result, job_error=reason)
        return None  # picked up: the lost-image rules take it from here

    def _pickup_timeout(self, job: Job) -> float:
        return job.pickup_timeout_s or self.settings.job_pickup_timeout

    def _end_pending(self, job: Job, reason: str, outcome: Check, result: CheckResult, *,
                     job_error: str | None = None) -> Check:
        """Fail the job's pending images with `reason`, and give the job `job_error` as its reason if it
        ends FAILURE. Results of the job in the inbox are saved first; those that still cannot be saved
        (a message waiting out its backoff, a drainer busy elsewhere) fail their images saying so: a
        deadline binds even with results waiting (invariant 13). An outage leaves the job as it is."""
        try:
            saving.drain(self.runtime, job.id, budget_s=DEADLINE_DRAIN_S)
            pending = sorted(self.runtime.state.pending_ids(job.id))
            unsaved = inbox.images_waiting(job.id) & set(pending)
        except Exception as exc:  # noqa: BLE001 - an outage: unfixable this tick, never a verdict
            if not is_outage(exc):
                raise
            log.warning("job=%s %s: dependency unreachable (%s); unfixable this tick", job.id, outcome, exc)
            return Check.ERROR
        if not pending:
            return Check.OK
        failed, status = 0, job.status
        unsaved_reason = f"{reason}; its result was received but could not be saved by then"
        groups = (([i for i in pending if i not in unsaved], reason), (sorted(unsaved, key=int), unsaved_reason))
        for ids, why in groups:
            if ids:
                outcomes, status = fail_lost(self.runtime, job, ids, why)
                failed += sum(o.failed for o in outcomes)
        if job_error and status == JobStatus.FAILURE:
            Job.update(error=job_error).where((Job.id == job.id) & (Job.status == JobStatus.FAILURE)).execute()
        waited = f" ({len(unsaved)} of them with a result that could not be saved)" if unsaved else ""
        job_log(job.id, logging.WARNING, f"jobs_health_check: {reason}: {failed} pending image(s) failed{waited}, "
                                         f"job now {status}")
        return outcome

    # ---- 1. lost images -------------------------------------------------------------------------------
    def lost_images(self) -> CheckResult:
        result = CheckResult()
        idle_since = peewee.fn.COALESCE(Job.last_progress_at, Job.dispatched_at)
        for job in self._running_unpaused().where(idle_since < self.cutoff).order_by(Job.id):
            result.checked += 1
            outcome = self._isolated("lost_images", job, result, self._reconcile, job, result)
            if outcome is not None and result.tally(
                    job.id, outcome, fixed=(Check.MARKED_FAILED, Check.FINALIZED, Check.RESYNCED),
                    unfixable=(Check.ERROR, Check.STATE_DISAPPEARED, Check.NO_CONSUMER)):
                self.unreachable_jobs.add(job.id)
        return result

    def _reconcile(self, job: Job, result: CheckResult) -> Check:
        consumer = self.runtime.tasks.consumer_state(job.id, job.pipeline.slug)
        if not consumer.reachable:
            log.warning("job=%s lost_images: NATS unreachable (%s); unfixable this tick", job.id, consumer.error)
            return Check.ERROR
        try:
            snapshot = self.runtime.state.snapshot(job.id)
            pending = sorted(self.runtime.state.pending_ids(job.id)) if snapshot else []
        except TransientError as exc:
            log.warning("job=%s lost_images: Redis unreachable (%s); unfixable this tick", job.id, exc)
            return Check.ERROR
        if snapshot is None:
            return Check.STATE_DISAPPEARED  # state_rebuild restores it; the next tick decides
        if not pending:  # every image counted, but the job never ended (its last progress write was lost)
            return self._finalize(job, snapshot)
        if not consumer.exists:
            return Check.NO_CONSUMER  # state_rebuild re-dispatches its tasks
        if consumer.num_pending > 0:
            waited = int((self.now - _activity(job)).total_seconds() // 60)
            result.notes.append(f"job {job.id}: no processing service has pulled tasks for pipeline "
                                f"{job.pipeline.slug} for {waited} min ({consumer.num_pending} task(s) waiting)")
            return Check.WAITING
        # Exhausted tasks can sit in num_ack_pending until someone pulls (JetStream decides on a pull), so
        # "lost" means: nothing left to deliver, and no delivery (or give-up) for two ack_waits, whereas
        # an un-acked task with deliveries left would have been redelivered within one.
        window = dt.timedelta(seconds=2 * self.settings.nats_task_ttr)
        last_active = consumer.last_active.replace(tzinfo=None) if consumer.last_active else None
        if last_active is not None and self.now - last_active < window:
            return Check.BUSY
        if inbox.outstanding(self.runtime, job.id):  # a result in hand decides its image: not lost
            result.notes.append(f"job {job.id}: results are waiting to be saved (workers are behind); its "
                                f"{len(pending)} pending image(s) are not lost")
            return Check.RESULTS_QUEUED
        with write_transaction():  # re-validate under the row lock: a result may have just arrived
            fresh = for_update(Job.select(Job.status, Job.last_progress_at, Job.dispatched_at, Job.paused_at)
                               .where(Job.id == job.id)).get()
        if fresh.status != JobStatus.STARTED or _activity(fresh) >= self.cutoff or fresh.paused_at is not None:
            return Check.RACED
        reason = (f"lost: no result after JetStream gave up delivering its task (job idle past "
                  f"{self.settings.stalled_jobs_max_minutes:g} min)")
        append_error(job.id, f"jobs_health_check: marked {len(pending)} image(s) as failed (job idle past cutoff; "
                             f"NATS consumer {consumer.describe()}). IDs: {progress.format_ids(pending)}")
        outcomes, status = fail_lost(self.runtime, job, pending, reason)
        failed = [o.image_id for o in outcomes if o.failed]
        metrics().lost_images.labels("periodic").inc(len(failed))
        job_log_ids(job.id, logging.WARNING, f"jobs_health_check: marked {len(failed)} image(s) as failed, job now "
                                             f"{status}; NATS consumer {consumer.describe()}", failed)
        return Check.MARKED_FAILED

    def _finalize(self, job: Job, snapshot: Snapshot) -> Check:
        """End a job whose images are all counted in Redis; if the database still holds some as pending (a
        result counted but never committed), reload Redis from the database instead, so they are handled
        like any pending image (redelivered, or reconciled as lost)."""
        written = progress.write_progress(job.id, snapshot, threshold=self.settings.failure_threshold)
        if written.unsaved:
            jobs.rebuild_state(self.runtime.state, job.id, even_if_present=True)
            job_log(job.id, logging.WARNING, f"jobs_health_check: {written.unsaved} image(s) counted in Redis were "
                                             "never saved; Redis state reloaded from the database")
            return Check.RESYNCED
        finish(self.runtime, job, written)
        return Check.FINALIZED

    # ---- 2. state rebuild ----------------------------------------------------------------------------
    def state_rebuild(self) -> CheckResult:
        result = CheckResult()
        restart_before = self.now - dt.timedelta(seconds=RESTART_PENDING_AFTER_S)
        for job in Job.select().where((Job.status == JobStatus.PENDING) & (Job.updated_at < restart_before)):
            result.checked += 1
            self.runtime.send(names.RUN_JOB, job.id)  # its message was lost (e.g. Redis flushed); run_job is idempotent
            Job.update(updated_at=self.now).where(Job.id == job.id).execute()
            job_log(job.id, logging.WARNING, "jobs_health_check: run_job never started; sent it again")
            result.fixed += 1
            result.jobs[job.id] = Check.RESTARTED
        running = list(self._running_async().order_by(Job.id))
        healthy = self._healthy(running)
        for job in running:
            result.checked += 1
            if job.id in healthy:
                result.jobs[job.id] = Check.OK
                continue
            outcome = self._isolated("state_rebuild", job, result, self._rebuild_or_wait, job)
            if outcome is not None and result.tally(job.id, outcome, fixed=(Check.REDIS_REBUILT, Check.REDISPATCHED)):
                self.unreachable_jobs.add(job.id)
        return result

    def _healthy(self, running: list[Job]) -> set[int]:
        """The running jobs that have both their Redis state and their NATS consumer, read for all of them
        in two round trips (one consumer listing, one Redis pipeline): only the others need a closer look.
        Empty when either cannot be read (each job is then checked, and reported, on its own)."""
        if not running:
            return set()
        try:
            consumers = {c.job_id for c in self.runtime.tasks.job_consumers()}
            return self.runtime.state.ready_jobs([job.id for job in running]) & consumers
        except TransientError:
            return set()

    def _rebuild_or_wait(self, job: Job) -> Check:
        try:
            return self._rebuild(job)
        except TransientError as exc:
            log.warning("job=%s state_rebuild: %s; unfixable this tick", job.id, exc)
            return Check.ERROR

    def _rebuild(self, job: Job) -> Check:
        state = self.runtime.state
        if state.snapshot(job.id) is None:
            if not jobs.rebuild_state(state, job.id):
                return Check.ENDED if Job.select(Job.status).where(Job.id == job.id).scalar() != JobStatus.STARTED \
                    else Check.OK
            job_log(job.id, logging.WARNING, "jobs_health_check: Redis state was missing; rebuilt from the database")
            return Check.REDIS_REBUILT
        consumer = self.runtime.tasks.consumer_state(job.id, job.pipeline.slug)
        if not consumer.reachable:
            raise TransientError(f"NATS unreachable: {consumer.error}")
        if consumer.exists or not state.pending_ids(job.id):
            return Check.OK
        if Job.select(Job.status).where(Job.id == job.id).scalar() != JobStatus.STARTED:
            return Check.ENDED
        # NATS lost the consumer and its tasks (flushed, or restarted without its store): publish again.
        Job.update(dispatch_cursor=0).where(Job.id == job.id).execute()
        job.dispatch_cursor = 0
        sent = jobs.dispatch(self.runtime, job)
        job_log(job.id, logging.WARNING, f"jobs_health_check: NATS consumer was missing; re-dispatched {sent} "
                                         "pending task(s)")
        return Check.REDISPATCHED

    # ---- 3. stale jobs (the reaper) -------------------------------------------------------------------
    def stale_jobs(self) -> CheckResult:
        result = CheckResult()
        cancel_before = self.now - dt.timedelta(seconds=FINISH_CANCEL_AFTER_S)
        last_seen = peewee.fn.COALESCE(Job.last_progress_at, Job.dispatched_at, Job.updated_at, Job.created_at)
        query = (Job.select(Job, Pipeline).join(Pipeline)
                 .where((Job.status == JobStatus.CANCELING)
                        | ((Job.status == JobStatus.STARTED) & (last_seen < self.cutoff)
                           & Job.paused_at.is_null())).order_by(Job.id))
        for job in query:
            if job.status == JobStatus.CANCELING:
                if job.updated_at >= cancel_before:
                    continue
                result.checked += 1
                jobs.cancel(self.runtime, job.id, by="jobs_health_check, finishing a cancel that stopped half-way")
                result.fixed += 1
                result.jobs[job.id] = Check.CANCEL_FINISHED
                continue
            if _activity(job) >= self.cutoff:
                continue
            result.checked += 1
            if job.id in self.unreachable_jobs:
                result.unfixable += 1
                result.jobs[job.id] = Check.SKIPPED_UNREACHABLE
                continue
            outcome = self._isolated("stale_jobs", job, result, self._reap, job)
            if outcome is not None:
                result.tally(job.id, outcome, fixed=(Check.REVOKED, Check.FINALIZED, Check.RESYNCED))
        return result

    def _reap(self, job: Job) -> Check:
        idle = int((self.now - _activity(job)).total_seconds() // 60)
        if job.dispatch_mode == DispatchMode.ASYNC_API and job.dispatched_at is not None:
            try:
                snapshot = self.runtime.state.snapshot(job.id)
            except TransientError:
                return Check.ERROR
            if snapshot is not None and snapshot.complete:
                return self._finalize(job, snapshot)
            return Check.LEFT_TO_RECONCILIATION  # waiting for a service, or lost images: never revoked
        why = ("its worker is gone" if job.dispatch_mode == DispatchMode.INTERNAL
               else "run_job stopped before dispatching its tasks")
        if progress.transition(job.id, JobStatus.REVOKED, allowed_from=(JobStatus.STARTED,),
                               error=f"jobs_health_check: no progress for {idle} min; {why}"):
            job_log(job.id, logging.ERROR, f"jobs_health_check: REVOKED after {idle} min without progress; {why}")
            if job.dispatch_mode == DispatchMode.ASYNC_API:
                jobs.cleanup(self.runtime, job.id, job.pipeline.slug)
            return Check.REVOKED
        return Check.RACED

    # ---- 4. zombies -------------------------------------------------------------------------------------
    def zombies(self) -> CheckResult:
        result = CheckResult()
        ended_before = self.now - dt.timedelta(seconds=ZOMBIE_GRACE_S)
        try:
            consumers = self.runtime.tasks.job_consumers()
        except TransientError as exc:
            result.unfixable += 1
            result.notes.append(f"NATS unreachable: {exc}")
            consumers = []
        try:
            keyed = [names.job_id_from_counts_key(key) for key in
                     self.runtime.redis.scan_iter(match=names.JOB_COUNTS_PATTERN, count=500)]
        except (TransientError, redis.RedisError) as exc:
            result.unfixable += 1
            result.notes.append(f"Redis unreachable: {exc}")
            keyed = []
        ended = _ended_jobs({c.job_id for c in consumers} | set(keyed))

        def is_zombie(job_id: int) -> bool:
            if job_id not in ended:
                return True
            when = ended[job_id]
            return when is not None and when < ended_before

        for consumer in consumers:
            result.checked += 1
            if is_zombie(consumer.job_id):
                self.runtime.tasks.delete_job_consumer(consumer.job_id, consumer.pipeline)
                log.info("job=%s zombies: removed consumer %s of an ended or deleted job", consumer.job_id,
                         consumer.consumer)
                result.fixed += 1
                result.add_outcome(consumer.job_id, Check.CONSUMER_REMOVED)
        for job_id in keyed:
            result.checked += 1
            if is_zombie(job_id):
                try:
                    self.runtime.state.delete(job_id)
                except TransientError as exc:
                    result.unfixable += 1
                    result.notes.append(f"Redis unreachable: {exc}")
                    break
                log.info("job=%s zombies: removed Redis state of an ended or deleted job", job_id)
                result.fixed += 1
                result.add_outcome(job_id, Check.REDIS_REMOVED)
        return result


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def _ended_jobs(job_ids: set[int]) -> dict[int, dt.datetime | None]:
    """For each of `job_ids` that exists: when it ended, or None while it runs (one query per 500 ids)."""
    found: dict[int, dt.datetime | None] = {}
    for chunk in peewee.chunked(sorted(job_ids), 500):
        for job_id, status, finished_at, updated_at in tuples(Job.select(Job.id, Job.status, Job.finished_at,
                                                                       Job.updated_at).where(Job.id.in_(chunk))):
            found[job_id] = (finished_at or updated_at) if status in JobStatus.TERMINAL else None
    return found


def _export(report: dict[str, Any]) -> None:
    m = metrics()
    for check, sub in report.items():
        if isinstance(sub, dict):
            for result in ("checked", "fixed", "unfixable"):
                m.health_jobs.labels(check, result).inc(sub.get(result, 0))
    counts: dict[str, int] = dict(tuples(Job.select(Job.status, peewee.fn.COUNT(Job.id)).group_by(Job.status)))
    for status in JobStatus.ALL:
        m.jobs.labels(status).set(counts.get(status, 0))
    last_seen = peewee.fn.COALESCE(Job.last_progress_at, Job.dispatched_at, Job.updated_at, Job.created_at)
    idlest = (Job.select(Job.last_progress_at, Job.dispatched_at, Job.updated_at, Job.created_at)
              .where((Job.status == JobStatus.STARTED) & Job.paused_at.is_null()).order_by(last_seen).first())
    m.longest_idle.set(max(0.0, (utcnow() - _activity(idlest)).total_seconds()) if idlest else 0)


def run_health_check(runtime: Runtime, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """Run one health check and store its report for `cli.py health`; returns the report."""
    report = HealthCheck(runtime, now=now).run()
    _export(report)
    metrics().health_check_last_run.set_to_current_time()
    try:
        runtime.redis.set(names.HEALTH_LAST_KEY, json.dumps(report), ex=7 * 24 * 3600)
    except Exception as exc:  # noqa: BLE001 - the report is informative; the fixes already happened
        log.warning("jobs_health_check: could not store its report: %s", exc)
    summary = " ".join(f"{k}={v.get('checked', 0)}/{v.get('fixed', 0)}/{v.get('unfixable', 0)}"
                       for k, v in report.items() if isinstance(v, dict))
    log.info("jobs_health_check done in %ss (checked/fixed/unfixable): %s", report["duration_s"], summary)
    return report
