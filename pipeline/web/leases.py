"""What the HTTP gateway handed to whom: a task's reply subject is leased to the service that reserved it.

An HTTP client names its tasks by reply subject only (the reference system's protocol), and reply subjects
can be guessed. So the gateway remembers, per job in Redis, which caller each reply subject was handed to
and the task's token; a result or a `+WPI` is accepted only for reply subjects handed to its caller, and the
gateway publishes each result with its task's token (invariant 12), which the caller never sees, and with
the trace context of the span that handed the task out. A lease lives as long as a task can be answered:
`ack_wait × max_deliver` plus a margin, from its reservation.
"""

from __future__ import annotations

from typing import NamedTuple

from pipeline import names
from pipeline.errors import Conflict, TransientError
from pipeline.web.gateway_tasks import Reserved

#: Seconds a lease outlives the last delivery a task can have.
MARGIN_S = 300


def lifetime_s(settings) -> int:
    return int(settings.nats_task_ttr * settings.nats_max_deliver + MARGIN_S)


def record(redis, settings, job_id: int, holder: str, reserved: list[Reserved]) -> None:
    """Lease the reserved tasks to `holder` (TransientError if Redis cannot be reached)."""
    if not reserved:
        return
    key = names.gateway_leases_key(job_id)
    try:
        with redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping={r.reply_subject: f"{holder}\n{r.task_token}\n{r.trace or ''}" for r in reserved})
            pipe.expire(key, lifetime_s(settings))
            pipe.execute()
    except Exception as exc:  # noqa: BLE001 - redis errors: the tasks come back after ack_wait
        raise TransientError(f"redis unavailable: could not lease the tasks ({exc})") from exc


class Lease(NamedTuple):
    token: str  # the task's token
    trace: str | None  # the `traceparent` of the span that handed it out


def leases_of(redis, job_id: int, holder: str, replies: list[str]) -> list[Lease]:
    """The lease of each reply subject, all of which must be leased to `holder`; Conflict (409) naming the
    first that is not (never leased, leased to another caller, or its lease expired)."""
    if not replies:
        return []
    try:
        leases = redis.hmget(names.gateway_leases_key(job_id), replies)
    except Exception as exc:  # noqa: BLE001
        raise TransientError(f"redis unavailable: could not read the tasks' leases ({exc})") from exc
    found = []
    for reply, lease in zip(replies, leases, strict=True):
        owner, _, token = (lease.decode() if isinstance(lease, bytes) else lease or "").partition("\n")
        token, _, trace = token.partition("\n")  # (a lease from before traces has none)
        if owner != holder:
            raise Conflict(f"reply_subject {reply[:120]!r} is not a task of job {job_id} handed to {holder} (only "
                           "the holder of a task may answer it; a lease ends ack_wait × max_deliver plus "
                           f"{MARGIN_S} s after the reservation); nothing of the request was accepted")
        found.append(Lease(token, trace or None))
    return found
