"""The Dramatiq broker: RedisBroker with an explicit middleware list. Importing this module sets it.

Crash recovery: Dramatiq re-runs a SIGKILLed worker's in-flight messages only when some broker call
runs "maintenance" after that worker's heartbeat expired. With Dramatiq's defaults (60 s heartbeat,
0.1 % maintenance chance) that takes ~17 minutes (measured on these machines). We use a 15 s heartbeat
timeout and a 5 % chance: each idle worker makes a few broker calls a second, so a dead worker's
messages are re-run a few seconds after the heartbeat expires, well within a minute.
"""

from __future__ import annotations

import dramatiq
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

from pipeline import metrics, names
from pipeline.deferred_failure import DeferredFailure
from pipeline.middleware import WorkerResources
from pipeline.poison import PoisonGuard
from pipeline.settings import Settings, get_settings

#: A worker silent this long (ms) is presumed dead and its unacked messages are requeued.
HEARTBEAT_TIMEOUT_MS = 15_000
#: Chance per broker call, out of 1,000,000, of running the requeue maintenance (5 %).
MAINTENANCE_CHANCE = 50_000
#: Dead-lettered messages are kept this long (ms) for `dlq` inspection and replay.
DEAD_MESSAGE_TTL_MS = 7 * 24 * 3600 * 1000
#: Project-wide retry defaults; each actor sets its own explicitly as well.
DEFAULT_MAX_RETRIES = 5
DEFAULT_MIN_BACKOFF_MS = 1_000
DEFAULT_MAX_BACKOFF_MS = 60_000
#: Default time limit (ms) of an actor that sets none.
DEFAULT_TIME_LIMIT_MS = 10 * 60 * 1000


def make_broker(settings: Settings, *, worker_resources: bool = True) -> RedisBroker:
    """A RedisBroker for `settings` with jetpipe's middleware, in this order (before-hooks run top-down):"""
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
    ]
    if worker_resources:
        middleware.append(WorkerResources())  # runtime + results bridge per worker process
    if metrics.configure_exposition(settings):
        middleware.insert(1, metrics.make_middleware())  # early: times whole messages, counts rejects
    return RedisBroker(url=settings.redis_url, namespace=names.DRAMATIQ_NAMESPACE, middleware=middleware,
                       heartbeat_timeout=HEARTBEAT_TIMEOUT_MS, maintenance_chance=MAINTENANCE_CHANCE,
                       dead_message_ttl=DEAD_MESSAGE_TTL_MS)


broker = make_broker(get_settings())
dramatiq.set_broker(broker)
