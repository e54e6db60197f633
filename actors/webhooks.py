"""`deliver_webhooks`: send the webhook deliveries that are due (sent by the workers' sweep, one at a time)."""

from __future__ import annotations

import time

import dramatiq

import models
from pipeline import names
from pipeline.core import webhooks
from pipeline.infra.runtime import get_runtime

#: A run stops starting new deliveries after this long (the next sweep sends another).
RUN_S = 50.0
#: Seconds the run's hold on "one deliver_webhooks at a time" outlives its next step: renewed before each
#: delivery and each wait, so that a worker killed mid-run frees it within this long (a new run is sent by the
#: next sweep, and sends the killed run's delivery once that delivery's own lease is over).
HOLD_S = webhooks.SEND_TIMEOUT_S + 15


@dramatiq.actor(actor_name=names.DELIVER_WEBHOOKS, queue_name=names.ACTOR_QUEUES[names.DELIVER_WEBHOOKS],
                max_retries=0, time_limit=int((RUN_S + 2 * webhooks.SEND_TIMEOUT_S) * 1000))
def deliver_webhooks() -> None:
    """Deliver what is due, and what comes due (retries) within RUN_S; the workers' sweep sends it again later."""
    runtime = get_runtime()
    started = time.monotonic()

    def hold(seconds: float) -> None:
        runtime.redis.set(names.WEBHOOKS_SENDING_KEY, 1, ex=max(int(seconds + HOLD_S), 1))

    try:
        with models.thread_connection():
            while (wait := webhooks.next_due_in(RUN_S - (time.monotonic() - started))) is not None:
                hold(wait)
                time.sleep(wait)
                for delivery_id in webhooks.due(limit=20):
                    hold(0)
                    webhooks.deliver(delivery_id, runtime.settings)
    finally:
        runtime.redis.delete(names.WEBHOOKS_SENDING_KEY)
