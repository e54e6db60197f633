"""The one retry policy of jetpipe's actors: retry outages for a bounded time, never bad data or a bug.

An outage is a dependency that could not be reached: the database (`models.is_transient`), Redis or
NATS (`TransientError`, the Redis client's connection errors), a job's Redis state that a retry rebuilds
(`StateMissing`), or the operating system refusing a connection. Anything else fails at once: retrying
bad data only delays its verdict, and retrying a bug fills the queue.
"""

from __future__ import annotations

from collections.abc import Callable

import redis

import models
from pipeline.errors import StateMissing, TransientError


def is_outage(exc: BaseException) -> bool:
    return models.is_transient(exc) or isinstance(
        exc, TransientError | StateMissing | OSError | redis.ConnectionError | redis.TimeoutError)


def retry_outages(limit: int) -> Callable[[int, BaseException], bool]:
    """A Dramatiq `retry_when`: retry an outage up to `limit` times (the actor's backoff spaces them)."""

    def retry_when(retries: int, exc: BaseException) -> bool:
        return is_outage(exc) and retries < limit

    return retry_when
