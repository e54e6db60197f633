"""A worker's broker and middleware: the per-process runtime (NATS connection, Redis, database), the
bridge, the scheduler.

`WorkerResources` is placed after Dramatiq's AsyncIO middleware, so `before_worker_boot` finds the event
loop running and resources exist before the first message is processed (Dramatiq runs
`before_worker_boot` hooks in middleware order, after the AsyncIO middleware has started its loop thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import faulthandler
import logging
import os
import signal
import sys
import time

import dramatiq
import peewee
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import (
    AgeLimit,
    AsyncIO,
    Callbacks,
    CurrentMessage,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

import models
from pipeline import names
from pipeline.core import inbox, unsaved, webhooks
from pipeline.core.deferred_failure import DeferredFailure
from pipeline.core.result_rows import FAILURE_KINDS
from pipeline.core.saving import request_drains
from pipeline.errors import TransientError
from pipeline.infra import backlog, dlq, metrics, tracing
from pipeline.infra.aio import LoopRunner, cancel_the_rest
from pipeline.infra.broker import make_broker
from pipeline.infra.outage import Outage
from pipeline.infra.presence import Presence
from pipeline.infra.runtime import Runtime, set_runtime
from pipeline.settings import Settings, get_settings, redact_text
from pipeline.worker.bridge import SWEEP_S, Bridge, bridge_routes
from pipeline.worker.poison import PoisonGuard
from pipeline.worker.scheduler import SlotScheduler

log = logging.getLogger(__name__)

#: Project-wide retry defaults; each actor sets its own explicitly as well.
DEFAULT_MAX_RETRIES = 5
DEFAULT_MIN_BACKOFF_MS = 1_000
DEFAULT_MAX_BACKOFF_MS = 60_000
#: Default time limit (ms) of an actor that sets none.
DEFAULT_TIME_LIMIT_MS = 10 * 60 * 1000


#: Two stop signals this close together are one request delivered twice: a supervisor (systemd, a
#: container runtime, a shell's `kill -TERM -<pgid>`) signals the whole process group, and the dramatiq
#: master forwards its own SIGTERM to each worker process.
DUPLICATE_SIGNAL_S = 0.5
#: Exit status of a worker process stopped at once by a second signal (Dramatiq's "killed").
RET_KILLED = 1


def one_stop_per_request() -> None:
    """Wrap the SIGTERM handler of a Dramatiq worker process so that it stops the way people expect.

    Dramatiq's own handler stops gracefully on the first signal and, on the second, raises SystemExit in
    the main thread. A group signal delivers two at once, so the process exited its main thread before
    stopping anything and hung on its worker threads. Here the copy that arrives within
    DUPLICATE_SIGNAL_S is dropped, and a real second signal ends the process at once (its in-flight
    messages are redelivered by Dramatiq, its task leases run out in NATS).
    """
    graceful = signal.getsignal(signal.SIGTERM)
    if not callable(graceful):
        return
    first: float | None = None

    def handler(signum, frame):
        nonlocal first
        now = time.monotonic()
        if first is None:
            first = now
            log.info("worker %s: stop requested; finishing in-flight messages", os.getpid())
            graceful(signum, frame)
        elif now - first >= DUPLICATE_SIGNAL_S:
            log.warning("worker %s: second stop signal; exiting now (in-flight messages will be redelivered)",
                        os.getpid())
            os._exit(RET_KILLED)

    signal.signal(signal.SIGTERM, handler)


def worker_middleware(settings: Settings) -> list[dramatiq.Middleware]:
    """jetpipe's middleware, in this order (before-hooks run top-down)."""
    middleware = [
        AsyncIO(),  # first: its event-loop thread exists before WorkerResources connects NATS on it
        PoisonGuard(),  # before anything runs the message: dead-letter one that keeps killing workers
        AgeLimit(),
        TimeLimit(time_limit=DEFAULT_TIME_LIMIT_MS),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        Retries(max_retries=DEFAULT_MAX_RETRIES, min_backoff=DEFAULT_MIN_BACKOFF_MS,
                max_backoff=DEFAULT_MAX_BACKOFF_MS),
        CurrentMessage(),
        DeferredFailure(),  # after_nack of run_job: the one place a job fails because run_job raised
        WorkerResources(),  # runtime + results bridge per worker process
    ]
    prometheus = metrics.make_middleware(settings)
    if prometheus is not None:
        middleware.insert(1, prometheus)  # early: times whole messages, counts rejects
    return middleware


_worker_broker: RedisBroker | None = None


def worker_broker(settings: Settings | None = None) -> RedisBroker:
    """The worker broker of this process, built on first call and made Dramatiq's global broker (an actor
    binds to the global broker when it is declared, so `actors/` calls this before declaring any)."""
    global _worker_broker
    if _worker_broker is None:
        settings = settings or get_settings()
        _worker_broker = make_broker(settings, worker_middleware(settings))
        dramatiq.set_broker(_worker_broker)
    return _worker_broker


#: Seconds between two exports of the pipelines' backlogs by one worker process (a listing of the job consumers
#: and a read per job with waiting tasks).
BACKLOG_EXPORT_S = 15.0
_exported: dict[str, float] = {"at": 0.0}
#: Seconds a queued deliver_webhooks holds the right to be the only one (it may wait behind other messages).
WEBHOOKS_LEASE_S = 120
_exported_pipelines: set[str] = set()


def sweep_inbox(runtime: Runtime) -> None:
    """Ask for the inbox rows of every job to be saved that have waited longer than a sweep interval (and
    are not waiting out a backoff), and export how long results have been waiting (and, every
    BACKLOG_EXPORT_S, each pipeline's backlog)."""
    with models.thread_connection():
        waiting = inbox.jobs_waiting(older_than_s=SWEEP_S)
        _export_waiting(inbox.waiting(), unsaved.parked_counts())
    metrics.metrics().dead_letters.set(dlq.count_dead(runtime.redis))
    with models.thread_connection():
        webhooks_due = bool(webhooks.due(limit=1))
    # one deliver_webhooks at a time for all workers (it clears the key when it ends; the key expires anyway)
    if webhooks_due and runtime.redis.set(names.WEBHOOKS_SENDING_KEY, 1, nx=True, ex=WEBHOOKS_LEASE_S):
        runtime.send(names.DELIVER_WEBHOOKS)
    if time.monotonic() - _exported["at"] >= BACKLOG_EXPORT_S:
        _exported["at"] = time.monotonic()
        _export_backlogs(runtime)
    if waiting:
        log.info("bridge: results of job(s) %s wait in the inbox; asking for them to be saved", waiting[:20])
        request_drains(runtime, waiting)


def _export_backlogs(runtime: Runtime) -> None:
    try:
        found = backlog.backlogs(runtime.tasks, runtime.redis)
    except TransientError as exc:
        log.debug("metrics: pipelines' backlogs not read (%s)", exc)
        return
    m = metrics.metrics()
    m.ack_wait.set(runtime.settings.nats_task_ttr)
    with models.thread_connection():
        registered = {slug for (slug,) in models.tuples(models.Pipeline.select(models.Pipeline.slug))}
    for slug in (_exported_pipelines | registered) - set(found):  # no job left, or none yet: nothing waits
        found[slug] = backlog.Backlog(slug)
    for slug in registered - _exported_pipelines:  # at zero from the start: an alert on increase() sees the first
        for outcome in ("processed", "failed"):
            m.images.labels(slug, outcome)
        for _, kind in (*FAILURE_KINDS, ("", "other")):
            m.image_failures.labels(slug, kind)
    for slug, b in found.items():
        m.pipeline_tasks_waiting.labels(slug).set(b.tasks_waiting)
        m.pipeline_tasks_in_flight.labels(slug).set(b.tasks_in_flight)
        m.pipeline_oldest_waiting.labels(slug).set(b.oldest_waiting_s)
        m.pipeline_pulls_waiting.labels(slug).set(b.pulls_waiting)
        m.pipeline_http_services.labels(slug).set(b.http_services)
    _exported_pipelines.update(found)


def _export_waiting(waiting: dict[int, inbox.Waiting], parked: dict[int, int]) -> None:
    m = metrics.metrics()
    now = models.utcnow()
    m.results_waiting.set(sum(w.messages for w in waiting.values()))
    m.results_waiting_oldest.set(max((w.age_s(now) for w in waiting.values()), default=0.0))
    m.results_parked.set(sum(parked.values()))


class WorkerResources(dramatiq.Middleware):
    """Starts the runtime, the bridge and the health-check scheduler in each worker process."""

    def __init__(self, *, bridge: bool = True, scheduler: bool = True):
        self.bridge_enabled = bridge
        self.scheduler_enabled = scheduler
        self.runtime: Runtime | None = None
        self.bridge: Bridge | None = None
        self.scheduler: SlotScheduler | None = None
        self.presence: Presence | None = None
        self._bridge_future: concurrent.futures.Future[None] | None = None
        self._previous: Runtime | None = None
        self._stopping = False
        self.nats_problem: str | None = None  # why the bridge could not connect, while it cannot

    def after_process_boot(self, broker):
        """In a `dramatiq` worker process (never in an in-process test worker): sane stop signals, and a
        Python traceback of every thread in the log if the process dies of a fatal signal (a crash in a C
        extension), before the master notices that it exited and stops the worker."""
        one_stop_per_request()
        if sys.__stderr__ is not None:  # the process's own stderr: Dramatiq's log pipe to the master is not
            faulthandler.enable(file=sys.__stderr__, all_threads=True)  # read once it sees this process die

    def before_worker_boot(self, broker, worker):
        loop_thread = get_event_loop_thread()
        if loop_thread is None:
            raise RuntimeError("WorkerResources needs the AsyncIO middleware before it in the middleware list")
        self._stopping = False  # one middleware instance may serve successive Worker instances
        self.bridge = self.scheduler = self.presence = self._bridge_future = None
        settings = get_settings()
        runtime = Runtime(settings, runner=LoopRunner(loop_thread.loop), broker=broker,
                          name=f"jetpipe-worker-{os.getpid()}", watch_nats=True)
        self.runtime = runtime
        self._previous = set_runtime(runtime)
        log.info("worker %s up: %s", os.getpid(), " ".join(f"{k}={v}" for k, v in settings.describe().items()))
        if self.bridge_enabled:
            self._bridge_future = runtime.runner.spawn(self._run_bridge(runtime))
        if self.scheduler_enabled:
            def send_check(slot: int) -> None:
                runtime.send(names.JOBS_HEALTH_CHECK, slot)

            self.scheduler = SlotScheduler(runtime.redis, names.JOBS_HEALTH_CHECK, settings.health_check_seconds,
                                           send_check)
            self.scheduler.start()
        self.presence = Presence(runtime.redis, self._reachable)
        self.presence.start()

    def _reachable(self) -> dict[str, str]:
        """For the presence announcement: "ok", or why this worker cannot reach NATS or the database."""
        nats_state = self.nats_problem or "ok"
        tasks = self.runtime.tasks_if_connected() if self.runtime is not None else None
        if nats_state == "ok" and tasks is not None and not tasks.queue.nc.is_connected:
            nats_state = "disconnected; reconnecting"
        try:
            with models.thread_connection():
                models.database.execute_sql("SELECT 1")
            database = "ok"
        except peewee.PeeweeException as exc:
            database = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return {"nats": nats_state, "database": redact_text(database)}

    async def _run_bridge(self, runtime: Runtime) -> None:
        """Connect (retrying quietly while NATS is down), then run the bridge until shutdown."""
        outage = Outage(f"worker {os.getpid()}: the results bridge cannot start", log,
                        on_change=metrics.outage_reporter("bridge_start"))
        while not self._stopping:
            try:
                queue = await runtime.connect_tasks()
                outage.ok()
                self.nats_problem = None
                break
            except TransientError as exc:
                self.nats_problem = str(exc)
                await asyncio.sleep(outage.failed(str(exc)))
            except Exception as exc:  # noqa: BLE001 - whatever it is, a worker without its bridge saves nothing
                self.nats_problem = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(outage.failed(self.nats_problem))
        else:
            return
        self.bridge = Bridge(queue.queue.js, bridge_routes(runtime), sweep=lambda: sweep_inbox(runtime),
                             task_ack_wait_s=runtime.settings.nats_task_ttr,
                             ensure_streams=lambda: queue.queue.ensure_streams(**runtime.settings.stream_options()))
        if self._stopping:
            return
        await self.bridge.run()

    def before_worker_shutdown(self, broker, worker):
        self._stopping = True
        if self.presence is not None:
            self.presence.stop()
        if self.scheduler is not None:
            self.scheduler.stop()
        if self._bridge_future is not None:
            if self.bridge is not None and self.runtime is not None:
                self.runtime.runner.loop.call_soon_threadsafe(self.bridge.stop)
            try:
                self._bridge_future.result(timeout=10)
            except Exception as exc:  # noqa: BLE001
                log.warning("results bridge did not stop cleanly: %s", exc)

    def after_worker_shutdown(self, broker, worker):
        """Close the runtime once the worker threads have finished their in-flight messages (they use its NATS
        connection to the end), and before the AsyncIO middleware closes the event loop the connection runs on
        (after-hooks run in reverse middleware order). Closed before the threads finished, the connection was
        opened again by the next message that needed it, and left open on a closed loop."""
        if self.runtime is not None:
            set_runtime(self._previous)
            runner = self.runtime.runner
            self.runtime.close()
            self.runtime = None
            try:  # whatever else still runs on the loop (a bridge still connecting) ends before the loop closes
                runner.run(cancel_the_rest(), timeout=5)
            except Exception as exc:  # noqa: BLE001 - shutting down: say it, go on
                log.warning("worker %s: tasks still running at shutdown: %s", os.getpid(), exc)
        tracing.shutdown()  # a forked worker process leaves without running atexit: export what is buffered

    def before_process_message(self, broker, message):
        models.database.connect(reuse_if_open=True)

    def after_process_message(self, broker, message, *, result=None, exception=None):
        """Give the thread's connection back to the pool; drop it instead if the database failed it.

        A SQLite connection (a local file, one per thread, not pooled) stays open between messages unless
        the database failed it: reopening it and setting its pragmas cost more than a small result's work.
        """
        db = models.database.obj
        if db is None or db.is_closed():
            return
        if isinstance(db, peewee.SqliteDatabase) and exception is None:
            return
        if isinstance(exception, peewee.OperationalError | peewee.InterfaceError) and hasattr(db, "manual_close"):
            db.manual_close()  # a broken pooled connection (database restarted): the retry gets a fresh one
        else:
            db.close()

    def after_skip_message(self, broker, message):
        self.after_process_message(broker, message)

    def before_worker_thread_shutdown(self, broker, thread):
        db = models.database.obj
        if db is not None and not db.is_closed():
            db.close()
