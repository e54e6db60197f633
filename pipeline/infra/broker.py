"""The Dramatiq broker factory and the one way the core sends work: by actor name.

Nothing here runs at import. A worker builds its broker with `pipeline.worker.middleware.worker_broker` (the
module Dramatiq runs, `pipeline.actors`, does so before declaring the actors); any other process that
sends messages (the CLI, tests) gets a plain broker from `make_broker` through its runtime. The core
never imports `actors/`: it sends `Message(actor_name="run_job", ...)` on the actor's queue, the way
Dramatiq's own middleware looks actors up by name.

Crash recovery: Dramatiq re-runs a SIGKILLed worker's in-flight messages only when some broker call
runs "maintenance" after that worker's heartbeat expired. With Dramatiq's defaults (60 s heartbeat,
0.1 % maintenance chance) that takes ~17 minutes (measured on these machines). We use a 15 s heartbeat
timeout and a 5 % chance: each idle worker makes a few broker calls a second, so a dead worker's
messages are re-run a few seconds after the heartbeat expires, well within a minute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from pipeline import names
from pipeline.settings import Settings

#: A worker silent this long (ms) is presumed dead and its unacked messages are requeued.
HEARTBEAT_TIMEOUT_MS = 15_000
#: Chance per broker call, out of 1,000,000, of running the requeue maintenance (5 %).
MAINTENANCE_CHANCE = 50_000
#: Dead-lettered messages are kept this long (ms) for `dlq` inspection and replay.
DEAD_MESSAGE_TTL_MS = 7 * 24 * 3600 * 1000


def make_broker(settings: Settings, middleware: Sequence[dramatiq.Middleware] = ()) -> RedisBroker:
    """A RedisBroker on `settings.redis_url` with jetpipe's namespace and recovery timings.

    Without `middleware` it only sends messages (what the CLI needs); a worker passes its list.
    """
    return RedisBroker(  # type: ignore[no-untyped-call]
        url=settings.redis_url, namespace=names.DRAMATIQ_NAMESPACE, middleware=list(middleware),
        heartbeat_timeout=HEARTBEAT_TIMEOUT_MS, maintenance_chance=MAINTENANCE_CHANCE,
        dead_message_ttl=DEAD_MESSAGE_TTL_MS)


def send(broker: dramatiq.Broker, actor_name: str, *args: Any, delay_ms: int | None = None) -> dramatiq.Message[Any]:
    """Queue a message for the actor called `actor_name` (one of `names.ACTOR_QUEUES`) on its queue."""
    message: dramatiq.Message[Any] = dramatiq.Message(queue_name=names.ACTOR_QUEUES[actor_name],
                                                      actor_name=actor_name, args=args, kwargs={}, options={})
    return broker.enqueue(message, delay=delay_ms)


def redis_of(broker: dramatiq.Broker) -> redis.Redis:
    """The Redis client of jetpipe's broker (always a RedisBroker)."""
    if not isinstance(broker, RedisBroker):
        raise TypeError(f"jetpipe's broker is a RedisBroker, not {type(broker).__name__}")
    client: redis.Redis = broker.client
    return client
