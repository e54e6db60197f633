"""Poison-message guard: a Dramatiq message that kills its worker every time must not loop forever.

Dramatiq redelivers a dead worker's in-flight message without counting it as a retry
(its Retries middleware never sees the crash), so a message that OOM-kills or segfaults its worker
would cycle forever.
We count deliveries per message id in Redis; deliveries beyond the attempts Retries made are crashes,
and past `max_crashes` the message is dead-lettered with the reason in the job's log.
"""

from __future__ import annotations

import logging

import dramatiq
from dramatiq.middleware import SkipMessage

from pipeline import names
from pipeline.core.joblog import job_log

log = logging.getLogger(__name__)

#: Worker deaths one message may cause before it is dead-lettered.
MAX_CRASHES = 3
#: How long a message's delivery count is kept if it is never finished: a message that kills its worker
#: is redelivered within a minute (Dramatiq's 15 s heartbeat), so an hour bounds Redis without missing one.
COUNTER_TTL_S = 3600


class PoisonGuard(dramatiq.Middleware):
    def __init__(self, *, max_crashes: int = MAX_CRASHES):
        self.max_crashes = max_crashes

    def before_process_message(self, broker, message):
        key = names.crash_delivery_key(message.message_id)
        with broker.client.pipeline() as pipe:
            deliveries, _ = pipe.incr(key).expire(key, COUNTER_TTL_S).execute()
        attempts = message.options.get("retries", 0) + 1
        crashes = deliveries - attempts
        if crashes < self.max_crashes:
            return
        reason = (f"poison message: {message.actor_name} message {message.message_id} killed its worker "
                  f"{crashes} time(s); dead-lettered")
        job_id = message.args[0] if message.args and isinstance(message.args[0], int) else None
        if job_id is not None:
            job_log(job_id, logging.ERROR, reason, logger=log)
        else:
            log.error("%s", reason)
        message.fail()
        raise SkipMessage(reason)
