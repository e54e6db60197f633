"""Per-job state in Redis: the atomic index of pending images and the job's counters.

Redis is an index, not the source of truth: everything here can be rebuilt from JobImage rows
(`load(..., force=True)`), and losing it never loses or fails a job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from importlib import resources
from typing import Any, cast

import msgspec
import redis

from pipeline import names
from pipeline.errors import StateMissing, TransientError

log = logging.getLogger(__name__)

#: Job state outlives any sane job; every update refreshes it.
STATE_TTL_S = 7 * 24 * 3600
_json = msgspec.json.Encoder()
#: Ids sent to Redis per SADD when loading a job's state.
LOAD_CHUNK = 5000


def _script_text(name: str) -> str:
    return resources.files("pipeline.infra").joinpath("lua").joinpath(name).read_text()


_SCRIPTS = {name: _script_text(f"{name}.lua") for name in ("record_outcomes", "snapshot", "load_begin",
                                                            "load_finish")}


#: Delete a lock only if this holder's token still owns it.
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
#: Give a lock a new time to live, only if this holder's token still owns it.
_EXTEND_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one image contributes when its outcome is recorded."""

    image_id: str
    failed: bool = False
    captures: int = 1
    detections: int = 0
    classifications: int = 0
    #: a valid result replacing a "lost" verdict: counted once, moving the image from failed to processed
    supersedes: bool = False
    #: why it failed, as a kind (`pipeline.core.result_rows.failure_kind`): a metric's label, never stored here
    failure: str = ""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A job's counters at one instant. `processed` counts processed and failed images alike."""

    total: int
    remaining: int
    failed: int
    captures: int
    detections: int
    classifications: int
    newly_removed: tuple[str, ...] = ()

    @property
    def processed(self) -> int:
        return self.total - self.remaining

    @property
    def complete(self) -> bool:
        return self.remaining == 0

    @classmethod
    def from_reply(cls, reply: list[Any]) -> Snapshot:
        total, remaining, failed, captures, detections, classifications = (int(x) for x in reply[1:7])
        return cls(total, remaining, failed, captures, detections, classifications,
                   tuple(str(x) for x in reply[7:]))


def connect_redis(url: str) -> redis.Redis:
    """A Redis client that fails fast (5 s) instead of hanging when the server is gone."""
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5,
                                health_check_interval=30, retry_on_timeout=False)


class JobState:
    """Atomic per-job state operations on one Redis server. Every Redis failure raises TransientError."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self._scripts = {name: client.register_script(text) for name, text in _SCRIPTS.items()}
        self._release = client.register_script(_RELEASE_LOCK)
        self._extend = client.register_script(_EXTEND_LOCK)

    def _run(self, script: str, job_id: int, args: Iterable[str | bytes | int] = ()) -> list[Any]:
        try:
            return cast(list[Any], self._scripts[script](keys=names.job_keys(job_id), args=list(args)))
        except redis.RedisError as exc:
            raise TransientError(f"redis unavailable for job {job_id}: {exc}") from exc

    def load(self, job_id: int, rows: Iterable[tuple[str, str, int, int]], *, force: bool = False) -> bool:
        """Load a job's state from its image rows `(image_id, status, detections, classifications)`, which
        must come from one consistent read; False if a complete state already existed (without `force`).

        Without `force` this is idempotent: a retried run_job finds the state ready and changes nothing.
        With `force`, call it under `rebuild_lock`: two concurrent rebuilds would interleave.
        """
        if not self._run("load_begin", job_id, ["force" if force else ""]):
            return False
        pending_key, failed_key, _ = names.job_keys(job_id)
        chunks: dict[str, list[str]] = {pending_key: [], failed_key: []}
        total = captures = detections = classifications = 0
        try:
            for image_id, status, n_det, n_cls in rows:
                total += 1
                if status == "processed":
                    captures, detections, classifications = captures + 1, detections + n_det, classifications + n_cls
                    continue
                key = pending_key if status == "pending" else failed_key
                chunks[key].append(str(image_id))
                if len(chunks[key]) >= LOAD_CHUNK:
                    self.client.sadd(key, *chunks[key])
                    chunks[key] = []
            for key, ids in chunks.items():
                if ids:
                    self.client.sadd(key, *ids)
        except redis.RedisError as exc:
            raise TransientError(f"redis unavailable while loading job {job_id}: {exc}") from exc
        self._run("load_finish", job_id, [STATE_TTL_S, total, captures, detections, classifications])
        return True

    def try_lock(self, key: str, ttl_ms: int) -> str | None:
        """Take lock `key` for `ttl_ms` if it is free; the token to release it with, or None if it is held."""
        token = uuid.uuid4().hex
        return token if self.client.set(key, token, nx=True, px=ttl_ms) else None

    def extend_lock(self, key: str, token: str, ttl_ms: int) -> bool:
        """Keep a lock taken with `try_lock` for `ttl_ms` more; False if this holder lost it (it expired)."""
        try:
            return bool(self._extend(keys=[key], args=[token, ttl_ms]))
        except redis.RedisError as exc:
            raise TransientError(f"redis unavailable: {exc}") from exc

    def set_flag(self, key: str, ttl_s: int) -> None:
        try:
            self.client.set(key, "1", ex=ttl_s)
        except redis.RedisError as exc:
            raise TransientError(f"redis unavailable: {exc}") from exc

    def take_flag(self, key: str) -> bool:
        """True if flag `key` was set (and clear it)."""
        try:
            return bool(self.client.delete(key))
        except redis.RedisError as exc:
            raise TransientError(f"redis unavailable: {exc}") from exc

    def release(self, key: str, token: str) -> None:
        """Release a lock taken with `try_lock`, only if this holder still owns it (else it expired)."""
        try:
            self._release(keys=[key], args=[token])
        except redis.RedisError:
            pass  # it expires

    @contextlib.contextmanager
    def rebuild_lock(self, job_id: int, *, wait_s: float = 60.0) -> Iterator[None]:
        """Hold the job's rebuild lock (one rebuild at a time); waits for another holder to finish."""
        key = names.rebuild_lock_key(job_id)
        deadline = time.monotonic() + wait_s
        try:
            while (token := self.try_lock(key, int(wait_s * 1000))) is None:
                if time.monotonic() > deadline:
                    raise TransientError(f"job {job_id}: Redis state rebuild lock still held after {wait_s} s")
                time.sleep(0.05)
        except redis.RedisError as exc:
            raise TransientError(f"redis unavailable for job {job_id}: {exc}") from exc
        try:
            yield
        finally:
            self.release(key, token)

    def record(self, job_id: int, outcomes: Iterable[Outcome]) -> Snapshot:
        """Count each image's outcome once (atomic gate); raises StateMissing if the job has no state."""
        packed = _json.encode([[o.image_id, int(o.failed), o.captures, o.detections, o.classifications,
                                int(o.supersedes)] for o in outcomes])
        reply = self._run("record_outcomes", job_id, [STATE_TTL_S, packed])
        if int(reply[0]) < 0:
            raise StateMissing(f"no Redis state for job {job_id}")
        return Snapshot.from_reply(reply)

    def snapshot(self, job_id: int) -> Snapshot | None:
        """The job's counters, or None if it has no state in Redis."""
        reply = self._run("snapshot", job_id)
        return None if int(reply[0]) < 0 else Snapshot.from_reply(reply)

    def ready_jobs(self, job_ids: list[int]) -> set[int]:
        """Those of `job_ids` whose state is present (what `snapshot` would find), in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(names.job_counts_key(job_id), "ready")
        try:
            flags = pipe.execute()
        except redis.RedisError as exc:
            raise TransientError(f"redis unavailable: {exc}") from exc
        return {job_id for job_id, flag in zip(job_ids, flags, strict=True) if flag == "1"}

    def pending_ids(self, job_id: int) -> set[str]:
        try:
            return {str(member) for member in self.client.smembers(names.job_pending_key(job_id))}
        except redis.RedisError as exc:
            raise TransientError(f"redis unavailable for job {job_id}: {exc}") from exc

    def delete(self, job_id: int) -> None:
        try:
            self.client.delete(*names.job_keys(job_id))
        except redis.RedisError as exc:
            raise TransientError(f"redis unavailable for job {job_id}: {exc}") from exc
