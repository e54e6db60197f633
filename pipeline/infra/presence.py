"""Worker presence: every worker process says in Redis, every few seconds, that it is alive and whether
it can reach NATS and the database. `cli.py health` counts the workers from it, names those that cannot
reach a dependency, with the reason, and those that vanished without a clean shutdown (a lost host, a
killed process): a worker that stops cleanly says goodbye, one that is lost just falls silent.

(Dramatiq's own heartbeats are not a worker count: any process that sends a message, a CLI enqueue
included, appears among them for a while.)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from pipeline import names

log = logging.getLogger(__name__)

#: Seconds between two announcements of one worker.
BEAT_S = 5.0
#: A worker silent this long is gone.
TTL_S = 20
#: A vanished worker is reported by `health` this long after its last announcement (seconds).
VANISHED_REPORTED_S = 15 * 60


def identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Presence:
    """Announces `facts()` (a dict: dependency -> "ok" or the reason it cannot be reached) every BEAT_S."""

    def __init__(self, client: redis.Redis, facts: Callable[[], dict[str, str]]):
        self.client = client
        self.facts = facts
        self.identity = identity()
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        now = time.time()
        entry = {"worker": self.identity, "since": self.started, "at": now, **self.facts()}
        with self.client.pipeline() as pipe:
            pipe.set(names.worker_presence_key(self.identity), json.dumps(entry), ex=TTL_S)
            pipe.hset(names.WORKERS_SEEN_KEY, self.identity, json.dumps({"at": now, "since": self.started}))
            pipe.execute()
        self._forget_long_gone(now)

    def _forget_long_gone(self, now: float) -> None:
        """Drop the records of workers silent for longer than health reports them."""
        for identity, seen in _seen(self.client).items():
            if now - seen["at"] > VANISHED_REPORTED_S:
                self.client.hdel(names.WORKERS_SEEN_KEY, identity)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="presence", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:  # a clean shutdown: gone, not vanished
            self.client.delete(names.worker_presence_key(self.identity))
            self.client.hdel(names.WORKERS_SEEN_KEY, self.identity)
        except redis.RedisError:
            pass  # it expires (and health reports it as vanished for a while)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - Redis down: health reports Redis itself
                log.debug("presence: %s", exc)
            self._stop.wait(BEAT_S)


def live_workers(client: redis.Redis) -> list[dict[str, Any]]:
    """Every worker that announced itself within TTL_S, by identity."""
    keys = sorted(client.scan_iter(match=names.worker_presence_key("*"), count=500))
    return [json.loads(raw) for raw in client.mget(keys) if raw] if keys else []


def _seen(client: redis.Redis) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for identity, raw in client.hgetall(names.WORKERS_SEEN_KEY).items():
        try:
            found[_text(identity)] = json.loads(raw)
        except ValueError:
            continue
    return found


def vanished_workers(client: redis.Redis, live: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Workers that stopped announcing themselves without a clean shutdown within the last
    VANISHED_REPORTED_S: {"worker", "silent_s"} each, the most recent first."""
    now = time.time()
    alive = {w["worker"] for w in live}
    gone = [{"worker": identity, "silent_s": round(now - seen["at"])} for identity, seen in _seen(client).items()
            if identity not in alive and TTL_S < now - seen["at"] <= VANISHED_REPORTED_S]
    return sorted(gone, key=lambda w: w["silent_s"])


#: An HTTP processing service's record is kept this long after its last request (seconds).
SERVICE_TTL_S = 7 * 24 * 3600


def service_seen(client: redis.Redis, name: str, *, pipeline: str, job_id: int, reserved: int = 0,
                 returned: int = 0) -> None:
    """Record a request of the HTTP processing service `name` (what it reserved or returned)."""
    key = names.service_presence_key(name)
    with client.pipeline() as pipe:
        pipe.hset(key, mapping={"service": name, "pipeline": pipeline, "job": job_id, "at": time.time()})
        pipe.hincrby(key, "reserved", reserved)
        pipe.hincrby(key, "returned", returned)
        pipe.expire(key, SERVICE_TTL_S)
        pipe.execute()


def http_services(client: redis.Redis) -> list[dict[str, Any]]:
    """Every HTTP processing service seen, with its last request and how many tasks it holds (reserved
    and not yet returned, as far as the gateway saw)."""
    found: list[dict[str, Any]] = []
    for key in sorted(client.scan_iter(match=names.service_presence_key("*"), count=500)):
        raw = {_text(k): _text(v) for k, v in client.hgetall(key).items()}
        if raw:
            reserved, returned = int(raw.get("reserved", 0)), int(raw.get("returned", 0))
            found.append({"service": raw["service"], "pipeline": raw.get("pipeline"), "job": int(raw.get("job", 0)),
                          "last_request_s_ago": round(time.time() - float(raw.get("at", 0))),
                          "reserved": reserved, "returned": returned, "holding": max(reserved - returned, 0)})
    return found


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
