"""Probes for orchestrators: `/healthz` (the process is alive: always yes when it answers) and `/readyz`
(the database, Redis and NATS answer within a couple of seconds). They are separate so that an outage of a
dependency marks every process unready without getting every pod restarted.

Served by `cli.py web` and by each worker's metrics port. Each probe opens short-lived connections of its
own with short timeouts, so it answers within a few seconds whatever is down.
"""

from __future__ import annotations

import asyncio

import peewee
import redis

import models
from pipeline.infra.taskqueue import connect_nats
from pipeline.settings import Settings, redact_text

#: Seconds each dependency has to answer.
PROBE_TIMEOUT_S = 2.0


def readiness(settings: Settings) -> tuple[bool, dict[str, str]]:
    """(ready, {dependency: "ok" or why not})."""
    checks = {"database": _database(settings), "redis": _redis(settings), "nats": _nats(settings)}
    return all(v == "ok" for v in checks.values()), checks


def _database(settings: Settings) -> str:
    db = models.make_database(settings.database_url)
    try:
        db.connect()
        db.execute_sql("SELECT 1")  # type: ignore[no-untyped-call]
        return "ok"
    except peewee.PeeweeException as exc:
        return _why(exc)
    finally:
        if not db.is_closed():
            db.close()


def _redis(settings: Settings) -> str:
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=PROBE_TIMEOUT_S,
                                  socket_connect_timeout=PROBE_TIMEOUT_S)
    try:
        client.ping()
        return "ok"
    except redis.RedisError as exc:
        return _why(exc)
    finally:
        client.close()


def _nats(settings: Settings) -> str:
    async def probe() -> None:
        nc = await connect_nats(settings.nats_url, name="jetpipe-readyz", connect_timeout_s=PROBE_TIMEOUT_S,
                                reconnect=False, **settings.nats_options())
        try:
            await nc.flush(timeout=int(PROBE_TIMEOUT_S))
        finally:
            await nc.close()

    try:
        asyncio.run(probe())
        return "ok"
    except Exception as exc:  # noqa: BLE001 - unreachable, whatever the way
        return _why(exc)


def _why(exc: BaseException) -> str:
    return redact_text((str(exc).strip().splitlines() or [type(exc).__name__])[0])
