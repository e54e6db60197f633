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

Wake-ups: Dramatiq's Redis consumers poll, backing off to the worker timeout (1 s) while idle, so a
message sent to an idle worker waited up to a second, twice per small job (run_job, then the saving of its
result). Here every send also pushes a token on its queue's wake list, and an idle consumer waits on that
list (BLPOP) instead of sleeping: it fetches as soon as something is sent, and still at least once per
backoff (heartbeats and maintenance keep their pace).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import compute_backoff
from dramatiq.errors import ConnectionClosed

from pipeline import names
from pipeline.settings import Settings

log = logging.getLogger(__name__)

#: A worker silent this long (ms) is presumed dead and its unacked messages are requeued.
HEARTBEAT_TIMEOUT_MS = 15_000
#: Chance per broker call, out of 1,000,000, of running the requeue maintenance (5 %).
MAINTENANCE_CHANCE = 50_000
#: Dead-lettered messages are kept this long (ms) for `dlq` inspection and replay.
DEAD_MESSAGE_TTL_MS = 7 * 24 * 3600 * 1000


#: Wake tokens kept per queue at most (tokens nobody waited for are consumed by the next idle fetches), and
#: how long an unused wake list lives (seconds).
WAKE_TOKENS_KEPT = 64
WAKE_LIST_TTL_S = 60


class WakingRedisBroker(RedisBroker):
    """Dramatiq's RedisBroker whose idle consumers wake when a message is sent (see the module docstring)."""

    @property
    def consumer_class(self) -> type[_RedisConsumer]:
        return _WakingConsumer

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        sent: dramatiq.Message[Any] = super().enqueue(message, delay=delay)
        key = names.dramatiq_wake_key(sent.queue_name)
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.lpush(key, 1)
                pipe.ltrim(key, 0, WAKE_TOKENS_KEPT - 1)
                pipe.expire(key, WAKE_LIST_TTL_S)
                pipe.execute()
        except redis.RedisError as exc:  # the message is queued: it is fetched at the next poll all the same
            log.debug("no wake-up for queue %s (%s); its consumers find the message when they next look",
                      sent.queue_name, exc)
        return sent


class _WakingConsumer(_RedisConsumer):
    """A consumer that, finding its queue empty, waits on the queue's wake list rather than sleeping."""

    def __next__(self) -> dramatiq.MessageProxy | None:
        if not self.message_cache:
            room = self.prefetch - self.outstanding_message_count
            try:
                if room > 0:
                    self.message_cache = self.broker.do_fetch(self.queue_name, room)
                if not self.message_cache:
                    self.misses, backoff_ms = compute_backoff(self.misses, max_backoff=self.timeout)
                    if room > 0:  # woken by the next send, or after the backoff at the latest
                        self.broker.client.blpop([names.dramatiq_wake_key(self.queue_name)],
                                                 timeout=max(backoff_ms, 10) / 1000)
                    else:  # prefetch full: a wake-up could not be used; leave it to a consumer with room
                        time.sleep(backoff_ms / 1000)
                    return None
            except redis.ConnectionError as exc:
                raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
        proxy: dramatiq.MessageProxy | None = super().__next__()  # type: ignore[no-untyped-call]  # from the cache
        return proxy


def make_broker(settings: Settings, middleware: Sequence[dramatiq.Middleware] = ()) -> RedisBroker:
    """A RedisBroker on `settings.redis_url` with jetpipe's namespace and recovery timings.

    Without `middleware` it only sends messages (what the CLI needs); a worker passes its list.
    """
    return WakingRedisBroker(  # type: ignore[no-untyped-call]
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
