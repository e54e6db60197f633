"""Dramatiq's dead-letter queues: list what failed for good, and replay it.

Dramatiq keeps dead messages per queue in `<namespace>:<queue>.XQ` (a ZSET of redis message ids scored
by time of death) and `<namespace>:<queue>.XQ.msgs` (their payloads), for `dead_message_ttl`
(Dramatiq keeps them in a sorted set per queue). There is no built-in tool; this is it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import dramatiq
import redis

from pipeline import names

QUEUES = (names.JOBS_QUEUE, names.RESULTS_QUEUE)
#: Options a replayed message starts without: its retry history and its previous Redis identity.
RESET_OPTIONS = ("retries", "traceback", "redis_message_id", "requeue_timestamp", "eta")


#: The actors whose first argument is a job id: a dead letter of theirs links to its job.
JOB_ACTORS = (names.RUN_JOB, names.PROCESS_PIPELINE_RESULT)

@dataclasses.dataclass(frozen=True)
class DeadMessage:
    queue: str
    redis_id: str
    died_at: dt.datetime
    message: dramatiq.Message[Any]

    def as_dict(self) -> dict[str, Any]:
        traceback = (self.message.options.get("traceback") or "").strip().splitlines()
        args = list(self.message.args)
        job_id = args[0] if self.message.actor_name in JOB_ACTORS and args and isinstance(args[0], int) else None
        return {"queue": self.queue, "id": self.redis_id, "message_id": self.message.message_id,
                "actor": self.message.actor_name, "args": args, "job_id": job_id,
                "died_at": self.died_at.isoformat(timespec="seconds") + "Z",
                "retries": self.message.options.get("retries", 0),
                "last_error": traceback[-1] if traceback else None}


def count_dead(client: redis.Redis) -> int:
    """How many dead messages jetpipe's queues hold."""
    return sum(client.zcard(names.dead_letter_keys(queue)[0]) for queue in QUEUES)


def list_dead(client: redis.Redis) -> list[DeadMessage]:
    """Every dead message of jetpipe's queues, oldest first."""
    found = []
    for queue in QUEUES:
        zset, payloads = names.dead_letter_keys(queue)
        entries: list[tuple[bytes | str, float]] = client.zrange(zset, 0, -1, withscores=True)  # type: ignore[assignment]
        for member, score in entries:
            redis_id = member.decode() if isinstance(member, bytes) else member
            raw = client.hget(payloads, redis_id)
            if raw is None:
                continue
            died = dt.datetime.fromtimestamp(score / 1000, dt.UTC).replace(tzinfo=None)
            found.append(DeadMessage(queue, redis_id, died, dramatiq.Message.decode(
                raw.encode() if isinstance(raw, str) else raw)))
    return sorted(found, key=lambda d: d.died_at)


def replay(broker: dramatiq.Broker, client: redis.Redis, ids: set[str] | None = None) -> list[DeadMessage]:
    """Enqueue dead messages again (all, or those whose redis id or message id is in `ids`), with a fresh
    retry budget and poison counter, and remove them from the dead-letter queue."""
    replayed = []
    for dead in list_dead(client):
        if ids is not None and dead.redis_id not in ids and dead.message.message_id not in ids:
            continue
        options = {k: v for k, v in dead.message.options.items() if k not in RESET_OPTIONS}
        broker.enqueue(dataclasses.replace(dead.message, options=options))  # copy() would merge options
        zset, payloads = names.dead_letter_keys(dead.queue)
        client.zrem(zset, dead.redis_id)
        client.hdel(payloads, dead.redis_id)
        client.delete(names.crash_delivery_key(dead.message.message_id))
        replayed.append(dead)
    return replayed
