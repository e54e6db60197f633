"""Worker middleware: the per-process runtime (NATS connection, Redis, database), the bridge, the scheduler.

Placed after Dramatiq's AsyncIO middleware, so `before_worker_boot` finds the event loop running and
resources exist before the first message is processed (Dramatiq runs `before_worker_boot` hooks in
middleware order, after the AsyncIO middleware has started its loop thread).
"""

from __future__ import annotations

import asyncio
import logging
import os

import dramatiq
import peewee
from dramatiq.asyncio import get_event_loop_thread

import models
from pipeline import inbox, names
from pipeline.aio import LoopRunner
from pipeline.bridge import SWEEP_S, Bridge, Route, is_result
from pipeline.errors import TransientError
from pipeline.runtime import Runtime, set_runtime
from pipeline.scheduler import SlotScheduler
from pipeline.settings import get_settings

log = logging.getLogger(__name__)

#: Advisories queued in Dramatiq (not yet handled) above which the bridge stops pulling them.
MAX_ADVISORIES_QUEUED = 2000


def bridge_routes(runtime: Runtime, broker) -> list[Route]:
    """The bridge's two routes: results into the inbox, advisories into `process_task_advisory`."""
    # late imports: the actors import the broker, which imports this module
    from actors.advisories import send_advisories
    from actors.results import request_drains

    def take_results(msgs) -> None:
        with models.thread_connection():
            jobs = inbox.take(runtime, [inbox.Incoming.from_msg(names.job_id_from_result_subject(m.subject), m)
                                        for m in msgs])
        try:
            request_drains(jobs)
        except Exception as exc:  # noqa: BLE001 - the results are safe in the inbox; the sweep asks again
            log.warning("bridge: could not ask for jobs %s to be saved (%s); the inbox sweep will", jobs, exc)

    def inbox_full() -> bool:
        with models.thread_connection():
            return inbox.size() > inbox.MAX_ROWS

    advisories_key = f"{names.DRAMATIQ_NAMESPACE}:{names.RESULTS_QUEUE}"
    return [
        Route(names.RESULTS_STREAM, names.RESULTS_BRIDGE_CONSUMER, names.RESULTS_SUBJECTS, is_result, take_results,
              inbox_full),
        Route(names.ADVISORIES_STREAM, names.ADVISORIES_CONSUMER, None, lambda msg: True,
              lambda msgs: send_advisories([(m.data.decode("utf-8", errors="replace"),) for m in msgs]),
              lambda: broker.client.llen(advisories_key) > MAX_ADVISORIES_QUEUED),
    ]


def sweep_inbox(runtime: Runtime) -> None:
    """Ask for the inbox rows of every job to be saved that have waited longer than a sweep interval."""
    from actors.results import request_drains

    with models.thread_connection():
        waiting = inbox.jobs_waiting(older_than_s=SWEEP_S)
    if waiting:
        log.info("bridge: results of job(s) %s wait in the inbox; asking for them to be saved", waiting[:20])
        request_drains(waiting)


class WorkerResources(dramatiq.Middleware):
    """Starts the runtime, the bridge and the health-check scheduler in each worker process."""

    def __init__(self, *, bridge: bool = True, scheduler: bool = True):
        self.bridge_enabled = bridge
        self.scheduler_enabled = scheduler
        self.runtime: Runtime | None = None
        self.bridge: Bridge | None = None
        self.scheduler: SlotScheduler | None = None
        self._bridge_future = None
        self._previous: Runtime | None = None
        self._stopping = False

    def before_worker_boot(self, broker, worker):
        loop_thread = get_event_loop_thread()
        if loop_thread is None:
            raise RuntimeError("WorkerResources needs the AsyncIO middleware before it in the middleware list")
        self._stopping = False  # one middleware instance may serve successive Worker instances
        self.bridge = self.scheduler = self._bridge_future = None
        settings = get_settings()
        runtime = Runtime(settings, runner=LoopRunner(loop_thread.loop), name=f"jetpipe-worker-{os.getpid()}")
        self.runtime = runtime
        self._previous = set_runtime(runtime)
        log.info("worker %s up: %s", os.getpid(), " ".join(f"{k}={v}" for k, v in settings.describe().items()))
        if self.bridge_enabled:
            self._bridge_future = runtime.runner.spawn(self._run_bridge(runtime, broker))
        if self.scheduler_enabled:
            from actors.health import jobs_health_check  # late: actors import the broker, which imports us

            self.scheduler = SlotScheduler(
                runtime.redis, "jobs_health_check", settings.health_check_seconds,
                lambda slot: jobs_health_check.send_with_options(
                    args=(slot,)))
            self.scheduler.start()

    async def _run_bridge(self, runtime: Runtime, broker) -> None:
        """Connect (retrying while NATS is down), then run the bridge until shutdown."""
        while not self._stopping:
            try:
                queue = await runtime.connect_tasks()
                break
            except TransientError as exc:
                log.error("worker %s: %s; the bridge retries in 2 s", os.getpid(), exc)
                await asyncio.sleep(2)
        else:
            return
        self.bridge = Bridge(queue.queue.js, bridge_routes(runtime, broker), sweep=lambda: sweep_inbox(runtime),
                             task_ack_wait_s=runtime.settings.nats_task_ttr,
                             ensure_streams=lambda: queue.queue.ensure_streams(max_jobs=runtime.settings.nats_max_jobs))
        if self._stopping:
            return
        await self.bridge.run()

    def before_worker_shutdown(self, broker, worker):
        self._stopping = True
        if self.scheduler is not None:
            self.scheduler.stop()
        if self._bridge_future is not None:
            if self.bridge is not None:
                self.runtime.runner.loop.call_soon_threadsafe(self.bridge.stop)
            try:
                self._bridge_future.result(timeout=10)
            except Exception as exc:  # noqa: BLE001
                log.warning("results bridge did not stop cleanly: %s", exc)
        if self.runtime is not None:
            set_runtime(self._previous)
            self.runtime.close()

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
