"""The per-process runtime: settings, database binding, Redis job state, the one NATS connection, and
the Dramatiq broker through which the core sends work by actor name.

Inside a Dramatiq worker the `WorkerResources` middleware starts it on the AsyncIO middleware's event
loop in `before_worker_boot`, handing it the worker's broker. Elsewhere (CLI, tests) `get_runtime()`
starts one on a loop thread of its own; it builds a broker only when something is sent (read-only
commands never build one).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import dramatiq

import models
from pipeline.errors import TransientError
from pipeline.infra import broker as brokers
from pipeline.infra.aio import LoopRunner, LoopThread
from pipeline.infra.jobstate import JobState, connect_redis
from pipeline.infra.taskqueue import NATS_FAILURES, SyncTaskQueue, TaskQueue
from pipeline.settings import Settings, get_settings

log = logging.getLogger(__name__)


class Runtime:
    """Connections one process needs; NATS is connected on first use (many commands never need it)."""

    def __init__(self, settings: Settings, *, runner: LoopRunner | None = None,
                 broker: dramatiq.Broker | None = None, name: str = "jetpipe", watch_nats: bool = False):
        self.settings = settings
        self.name = name
        self.watch_nats = watch_nats  # a long-lived process: its NATS connection is watched (natswatch.py)
        self._own_loop = runner is None
        self.runner = runner or LoopThread(name=f"{name}-loop")
        models.bind(settings.database_url, session=settings.db_session())
        self.redis = connect_redis(settings.redis_url)
        self.state = JobState(self.redis)
        self._tasks: SyncTaskQueue | None = None
        self._broker = broker
        self._own_broker = broker is None
        self._lock = threading.Lock()

    @property
    def broker(self) -> dramatiq.Broker:
        """The Dramatiq broker messages are sent through (the worker's own, or one built on first use)."""
        with self._lock:
            if self._broker is None:
                self._broker = brokers.make_broker(self.settings)
            return self._broker

    def send(self, actor_name: str, *args: Any, delay_ms: int | None = None) -> dramatiq.Message[Any]:
        """Queue a message for the actor called `actor_name` (see `names.ACTOR_QUEUES`)."""
        return brokers.send(self.broker, actor_name, *args, delay_ms=delay_ms)

    @property
    def tasks(self) -> SyncTaskQueue:
        """The NATS task queue of this process (connected, streams ensured, on first use)."""
        with self._lock:
            if self._tasks is None:
                tasks = SyncTaskQueue.connect(self.settings.nats_url, self.runner, name=self.name,
                                              watch=self.watch_nats, **self.settings.nats_options())
                try:
                    tasks.ensure_streams(**self.settings.stream_options())
                except BaseException:
                    with contextlib.suppress(Exception):  # the reason to give is the one above
                        tasks.close()
                    raise
                self._tasks = tasks
            return self._tasks

    async def connect_tasks(self) -> SyncTaskQueue:
        """The task queue, connected from a coroutine already running on this runtime's loop.

        (The `tasks` property would deadlock there: it waits for the loop it is running on.)
        """
        if self._tasks is None:
            queue = await TaskQueue.connect(self.settings.nats_url, name=self.name, watch=self.watch_nats,
                                            **self.settings.nats_options())
            try:
                await queue.ensure_streams(**self.settings.stream_options())
                await queue.ensure_result_buckets(replicas=self.settings.nats_replicas)
            except NATS_FAILURES as exc:  # JetStream not ready (a cluster electing, a stream being made)
                await queue.close()
                raise TransientError(f"JetStream not ready: {str(exc) or type(exc).__name__}") from exc
            if self._tasks is None:
                self._tasks = SyncTaskQueue(queue, self.runner)
            else:
                await queue.close()
        return self._tasks

    @property
    def nats_connected(self) -> bool:
        return self._tasks is not None

    def tasks_if_connected(self) -> SyncTaskQueue | None:
        """The task queue if this process has connected it, without connecting."""
        return self._tasks

    def close(self) -> None:
        if self._tasks is not None:
            try:
                self._tasks.close()
            except Exception as exc:  # noqa: BLE001 - closing must not mask the reason we are closing
                log.warning("closing NATS connection failed: %s", exc)
            self._tasks = None
        if self._own_broker and self._broker is not None:
            self._broker.close()
            self._broker = None
        self.redis.close()
        if self._own_loop and isinstance(self.runner, LoopThread):
            self.runner.stop()
        db = models.database.obj
        if db is not None and not db.is_closed():
            db.close()


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    """This process's runtime, started from the environment's settings on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime(get_settings())
        return _runtime


def set_runtime(runtime: Runtime | None) -> Runtime | None:
    """Install `runtime` as this process's runtime; returns the previous one (the caller closes it)."""
    global _runtime
    with _runtime_lock:
        previous, _runtime = _runtime, runtime
        return previous
