"""Worker middleware: the per-process runtime (NATS connection, Redis, database) and the results bridge.

Placed after Dramatiq's AsyncIO middleware, so `before_worker_boot` finds the event loop running and
resources exist before the first message is processed (reference/dramatiq.md §1.1, §1.7).
"""

from __future__ import annotations

import logging
import os

import dramatiq
from dramatiq.asyncio import get_event_loop_thread

import models
from pipeline import names
from pipeline.aio import LoopRunner
from pipeline.bridge import ResultsBridge
from pipeline.errors import TransientError
from pipeline.runtime import Runtime, set_runtime
from pipeline.settings import get_settings

log = logging.getLogger(__name__)


class WorkerResources(dramatiq.Middleware):
    """Starts the runtime and the results bridge in each worker process; stops them on shutdown."""

    def __init__(self, *, bridge: bool = True):
        self.bridge_enabled = bridge
        self.runtime: Runtime | None = None
        self.bridge: ResultsBridge | None = None
        self._bridge_future = None
        self._previous: Runtime | None = None

    def before_worker_boot(self, broker, worker):
        loop_thread = get_event_loop_thread()
        if loop_thread is None:
            raise RuntimeError("WorkerResources needs the AsyncIO middleware before it in the middleware list")
        settings = get_settings()
        runtime = Runtime(settings, runner=LoopRunner(loop_thread.loop), name=f"jetpipe-worker-{os.getpid()}")
        self.runtime = runtime
        self._previous = set_runtime(runtime)
        log.info("worker %s up: %s", os.getpid(), " ".join(f"{k}={v}" for k, v in settings.describe().items()))
        try:
            runtime.tasks  # connect now: a worker that cannot reach NATS says so at boot  # noqa: B018
        except TransientError as exc:
            log.error("worker %s: %s; actors will retry until NATS is reachable", os.getpid(), exc)
            return
        if self.bridge_enabled:
            from actors.results import send_results  # late: actors import the broker, which imports us

            queue_key = f"{names.DRAMATIQ_NAMESPACE}:{names.RESULTS_QUEUE}"
            self.bridge = ResultsBridge(runtime.tasks.queue.js, send_batch=send_results,
                                        queue_depth=lambda: broker.client.llen(queue_key))
            self._bridge_future = runtime.runner.spawn(self.bridge.run())

    def before_worker_shutdown(self, broker, worker):
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

    def before_worker_thread_shutdown(self, broker, thread):
        db = models.database.obj
        if db is not None and not db.is_closed():
            db.close()
