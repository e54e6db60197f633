"""The JetStream task queue: streams, per-job durable consumers, publishing tasks, ACK and TERM.

One `TaskQueue` holds one long-lived NATS connection; a process has one (no
connection per ACK, no subscribe/fetch/unsubscribe per request). Its methods are coroutines;
`SyncTaskQueue` runs them on the process's event loop for sync callers such as Dramatiq actors.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import logging
import random
import re
import ssl
from collections.abc import Coroutine, Iterable
from typing import Any, NamedTuple, TypeVar, cast

import msgspec
import nats
import nats.aio.client
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    ObjectMeta,
    ObjectMetaOptions,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.object_store import ObjectStore

from pipeline import names
from pipeline.errors import JobSlotsFull, TransientError
from pipeline.infra.aio import LoopRunner
from pipeline.infra.natswatch import ConnectionWatch, round_trip
from pipeline.schemas import Task
from pipeline.settings import redact

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Tasks published concurrently per round trip burst (~10k msg/s on 2 cores, docs/performance.md).
PUBLISH_CHUNK = 500
#: Nats-Msg-Id dedupe window: a run_job retried within it republishes nothing.
DUPLICATE_WINDOW_S = 20 * 60
#: Outstanding un-acked deliveries per job consumer before JetStream stops handing out more.
MAX_ACK_PENDING = 10_000
#: Stream max_age: none on tasks/results (JetStream drops an expired, never-delivered task silently).
ADVISORY_MAX_AGE_S = 7 * 24 * 3600
#: JetStream API error code for "no message found" (deleting a message that is already gone).
NO_MESSAGE_FOUND = 10057
#: Timeout of one JetStream API call or publish, seconds.
API_TIMEOUT_S = 10.0
#: Loop iterations a closed connection gets for the tasks it cancelled to finish.
CLOSE_SETTLE_ROUNDS = 3
#: Job consumers a pipeline's tasks stream allows unless PIPELINE_NATS_MAX_JOBS says otherwise.
DEFAULT_MAX_JOBS = 10_000
#: What nats-py raises for an object (or its bucket) that is not there.
OBJECT_GONE = (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError,
               nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError)
#: Bytes per chunk of a result object (nats-py's own default; less where the server's max_payload is smaller).
OBJECT_CHUNK_BYTES = 128 * 1024
#: Seconds a result object lives in its bucket at most (jetpipe deletes it once taken; this is the safety net).
RESULT_OBJECT_TTL_S = 7 * 24 * 3600
#: Bytes of results PIPELINE_RESULTS holds untaken unless PIPELINE_NATS_RESULTS_MAX_GB says otherwise.
DEFAULT_RESULTS_MAX_BYTES = 10 * 2**30
#: Largest result message the results stream stores: the largest `max_payload` jetpipe ships (deploy/nats.conf).
RESULT_MAX_MSG_BYTES = 8 * 2**20
#: JetStream's "maximum consumers limit reached".
MAX_CONSUMERS_ERR_CODE = 10026

_encoder = msgspec.json.Encoder()


def direct_get_subject(stream: str) -> str:
    """Direct get of one message by stream sequence (tasks streams allow direct gets; no consumer is involved)."""
    return f"$JS.API.DIRECT.GET.{stream}"

NATS_FAILURES = (nats.errors.Error, asyncio.TimeoutError, TimeoutError, OSError)


@dataclasses.dataclass(frozen=True)
class ConsumerState:
    """A job consumer's counters, or why they could not be read (`error`); reading never raises."""

    exists: bool
    num_pending: int = 0
    num_ack_pending: int = 0
    num_redelivered: int = 0
    num_delivered: int = 0
    last_active: dt.datetime | None = None
    error: str | None = None

    @property
    def reachable(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        if self.error:
            return f"unreachable ({self.error})"
        if not self.exists:
            return "no consumer"
        return (f"num_pending={self.num_pending} num_ack_pending={self.num_ack_pending} "
                f"num_redelivered={self.num_redelivered}")


class Published(NamedTuple):
    """A task as JetStream stored it."""

    seq: int  # its stream sequence (what the reply subjects of its deliveries name)
    new: bool  # False: a duplicate of a task already stored (same Nats-Msg-Id)


@dataclasses.dataclass(frozen=True)
class JobConsumer:
    job_id: int
    consumer: str
    filter_subject: str
    pipeline: str  # whose tasks stream holds it
    num_pending: int = 0  # its tasks not yet delivered
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)  # project, priority, weight, paused
    paused: bool = False  # the server holds its deliveries (consumer pause, NATS 2.11 and later)
    num_ack_pending: int = 0  # delivered and not yet answered: in flight with a service
    num_waiting: int = 0  # pull requests waiting for a task: services idle on this job right now
    delivered_seq: int = 0  # stream sequence of its last delivery
    last_active: dt.datetime | None = None  # when it last delivered


#: `pause_until` for a pause with no end: the job is resumed by hand.
PAUSED_FOR_GOOD = "2999-12-31T00:00:00Z"


def own_metadata(config: ConsumerConfig) -> dict[str, str]:
    """A consumer's metadata as jetpipe wrote it (without the keys the server adds, `_nats.*`)."""
    return {k: v for k, v in (config.metadata or {}).items() if not k.startswith("_nats.")}


def is_paused(config: ConsumerConfig) -> bool:
    """Whether the server holds this consumer's deliveries now (its `pause_until` lies ahead)."""
    until = config.pause_until or ""
    return until[:19] > dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")


#: Reply subjects of jetpipe's own processes (workers, CLI) start with this, not the default `_INBOX`:
#: the NATS permissions in deploy/nats.conf let processing services read `_INBOX.>` only, so they never
#: see jetpipe's replies (task PubAcks, tasks read back by sequence, ACK confirmations).
JETPIPE_INBOX_PREFIX = "_INBOX_jetpipe"


async def connect_nats(url: str, *, name: str, connect_timeout_s: float = 10.0, reconnect: bool = True,
                       creds: str = "", tls_ca: str = "", inbox_prefix: str = JETPIPE_INBOX_PREFIX) -> nats.NATS:
    """A NATS connection that reconnects forever once up, but fails within `connect_timeout_s` at first.

    Credentials: user/password or token in the URL, or a `creds` file; TLS: a `tls://` URL, and `tls_ca`
    for a private CA. Processing services connect with `inbox_prefix="_INBOX"` (the SDK does).
    """
    security: dict[str, object] = {}
    if creds:
        security["user_credentials"] = creds
    if tls_ca:
        security["tls"] = ssl.create_default_context(cafile=tls_ca)

    problem: list[str] = []  # this connection's current problem

    async def quiet_error(exc: Exception) -> None:
        text = describe_connection_error(exc)
        if _logged_problems.get(url) != text:  # once per change for the whole process, not per attempt
            log.warning("nats connection problem (%s): %s", redact(url), text)
        _logged_problems[url] = text
        problem[:] = [text]

    connection: list[nats.NATS] = []

    async def disconnected() -> None:
        if connection and connection[0].is_closed:
            return  # our own close(), not an outage
        log.warning("nats disconnected from %s", redact(url))

    async def reconnected() -> None:
        problem.clear()
        _logged_problems.pop(url, None)
        log.info("nats reconnected to %s", redact(url))

    try:
        servers = [server.strip() for server in url.split(",") if server.strip()]  # a cluster: several URLs
        random.shuffle(servers)  # processes spread over the nodes; then each reconnect tries the next node in
        # this order (dont_randomize), never first the one it is leaving (a cut link, a node without quorum)
        nc = await asyncio.wait_for(_connect(
            servers=servers, dont_randomize=True,
            name=name, connect_timeout=2, reconnect_time_wait=0.5,
            max_reconnect_attempts=-1 if reconnect else 0, allow_reconnect=reconnect,
            ping_interval=10, max_outstanding_pings=3, inbox_prefix=inbox_prefix,
            error_cb=quiet_error, disconnected_cb=disconnected, reconnected_cb=reconnected, **security,
        ), connect_timeout_s)
        connection.append(nc)
        _logged_problems.pop(url, None)
        return nc
    except NATS_FAILURES as exc:
        cause = problem[-1] if problem else describe_connection_error(exc)  # the reason, not our time-out
        raise TransientError(f"cannot connect to NATS at {redact(url)}: {cause}") from exc


class _Client(nats.aio.client.Client):
    """nats-py's client, reading message headers faster. nats-py 2.16 checks each header name for whitespace a
    character at a time in Python: for a task's five headers that was a tenth of a fast processing service's
    CPU (docs/performance.md). The same rule (`str.isspace`), in one regular expression search."""

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in raw.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            try:
                key = name.strip().decode("ascii")
            except UnicodeDecodeError:
                continue  # a name that is not ASCII: left out, as nats-py does
            if _SPACE.search(key):
                continue  # a name with whitespace in it: left out, as nats-py does
            out[key] = value.strip().decode("utf-8", "replace")
        return out


_SPACE = re.compile(r"\s")  # what `str.isspace` calls whitespace (checked by tests/unit/test_nats_headers.py)


async def _connect(**options: Any) -> nats.aio.client.Client:
    """`nats.connect`, with `_Client`."""
    nc = _Client()
    await nc.connect(**options)
    return nc


#: The connection problem last logged per NATS URL in this process (cleared once a connection works).
_logged_problems: dict[str, str] = {}


def describe_connection_error(exc: BaseException) -> str:
    """What went wrong connecting, in words: "connection refused" rather than "[Errno 111] Connect call
    failed ('127.0.0.1', 4222)"."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is nats-server running on that port?)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class Requests:
    """Many requests at once over one wildcard reply subscription: replies are matched by a counter token,
    and one timer and one future cover the whole batch. nats-py's `request` draws random bytes (a system call)
    and arms a timer per request, which made ACKs and task publishing the worker's busiest event-loop work; a
    future per request (and `asyncio.wait` over them) cost a callback per reply more."""

    def __init__(self, nc: nats.NATS):
        self.nc = nc
        self._prefix: str | None = None
        self._tokens = itertools.count()
        self._waiting: dict[str, tuple[_Replies, int]] = {}

    async def _on_reply(self, msg: Msg) -> None:
        waiting = self._waiting.pop(msg.subject[len(self._prefix or ""):], None)
        if waiting is not None:
            waiting[0].arrived(waiting[1], msg)

    async def send(self, requests: list[tuple[str, bytes, dict[str, str] | None]], *, timeout: float) -> list[Msg]:
        """Publish every (subject, payload, headers) with its own reply subject; the replies, in order (a
        reply for which `no_responders(reply)` is true means nothing listens on that subject).

        Raises nats.errors.TimeoutError if any reply is missing after `timeout` seconds.
        """
        if not requests:
            return []
        if not self.nc.is_connected:  # reconnecting: fail now, the caller retries on a live connection
            raise nats.errors.ConnectionReconnectingError
        if self._prefix is None:  # set before the await: a concurrent first call must not subscribe twice
            self._prefix = self.nc.new_inbox() + "."
            try:
                await self.nc.subscribe(self._prefix + "*", cb=self._on_reply)
            except BaseException:
                self._prefix = None
                raise
        replies = _Replies(len(requests), asyncio.get_running_loop().create_future())
        tokens: list[str] = []
        try:
            async with asyncio.timeout(timeout):  # the whole exchange, publishing included, never longer
                for n, (subject, payload, headers) in enumerate(requests):
                    token = str(next(self._tokens))
                    tokens.append(token)
                    self._waiting[token] = (replies, n)
                    await self.nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
                await replies.complete
        except TimeoutError:
            raise nats.errors.TimeoutError from None
        finally:
            for token in tokens:
                self._waiting.pop(token, None)
        return cast(list[Msg], replies.received)


class _Replies:
    """The replies of one `Requests.send`, in the order of its requests; `complete` is done once each came."""

    __slots__ = ("received", "missing", "complete")

    def __init__(self, count: int, complete: asyncio.Future[None]):
        self.received: list[Msg | None] = [None] * count
        self.missing = count
        self.complete = complete

    def arrived(self, n: int, msg: Msg) -> None:
        if self.received[n] is None:
            self.received[n] = msg
            self.missing -= 1
            if not self.missing and not self.complete.done():
                self.complete.set_result(None)


def no_responders(reply: Msg) -> bool:
    """True for the server's "503 no responders" answer to a request."""
    return (reply.headers or {}).get("Status") == "503"


def take_waiting(sub: Any) -> list[Msg]:
    """The deliveries waiting on a pull subscription that no fetch took: answers to pull requests that
    reached the server after their fetch gave up (it timed out, or the request waited out a reconnect in
    the client). Status messages (timeouts, heartbeats of those requests) are left out.

    nats-py's `fetch` hands these out along with its own, more than it was asked for, and when they cover
    its whole batch it still sends a pull request for none, which the server answers with one more task.
    Taking them first avoids both."""
    queue = sub._sub._pending_queue  # nats-py has no public way to drain a pull subscription
    waiting = []
    while not queue.empty():
        msg = queue.get_nowait()
        sub._sub._pending_size -= len(msg.data)
        if msg.reply and msg.reply.startswith("$JS.ACK."):
            waiting.append(msg)
    return waiting


class TaskQueue:
    """JetStream operations of jetpipe over one connection."""

    def __init__(self, nc: nats.NATS, *, watch_as: str | None = None):
        self.nc = nc
        self.js = nc.jetstream(timeout=API_TIMEOUT_S)
        self.requests = Requests(nc)
        self._stores: dict[str, ObjectStore] = {}  # result buckets by name (`_store`)
        self.watch: ConnectionWatch | None = None
        self._watching: asyncio.Task[None] | None = None
        if watch_as is not None:  # a long-lived connection: replaced within seconds when it stops answering
            self.watch = ConnectionWatch(nc, name=watch_as)
            self._watching = asyncio.get_running_loop().create_task(self.watch.run())

    @classmethod
    async def connect(cls, url: str, *, name: str = "jetpipe", creds: str = "", tls_ca: str = "",
                      inbox_prefix: str = JETPIPE_INBOX_PREFIX, watch: bool = False) -> TaskQueue:
        """Connect; with `watch`, a ConnectionWatch checks the connection every few seconds (long-lived
        processes: workers, the web server, processing services)."""
        nc = await connect_nats(url, name=name, creds=creds, tls_ca=tls_ca, inbox_prefix=inbox_prefix)
        return cls(nc, watch_as=name if watch else None)

    async def confirm_sent(self, timeout_s: float = 5.0) -> None:
        """Return once everything published so far has reached the server (a round trip, never nats-py's
        flush with a timeout: natswatch.py says why); raises TimeoutError if the server does not answer."""
        why = await round_trip(self.nc, timeout_s)
        if why is not None:
            raise TimeoutError(f"nats: not confirmed: {why}")

    async def close(self) -> None:
        """Send buffered publishes and ACKs, then close (no drain: pull subscriptions hold no work)."""
        if self.watch is not None and self._watching is not None:
            self.watch.stop()
            await asyncio.gather(self._watching, return_exceptions=True)
        if self.nc.is_closed:
            return
        with contextlib.suppress(*NATS_FAILURES):
            await self.confirm_sent(2)
        await self.nc.close()
        # nats-py cancels its reader, flusher and subscription tasks without waiting for them: let them finish
        # here, or a loop stopped right after this leaves them pending ("Event loop is closed" when collected)
        for _ in range(CLOSE_SETTLE_ROUNDS):
            await asyncio.sleep(0)

    # ---- streams ------------------------------------------------------------------------------------
    async def ensure_streams(self, *, max_jobs: int | None = None, replicas: int | None = None,
                             results_max_bytes: int | None = None) -> None:
        """Create the results and advisories streams of the wire contract if missing, with `replicas` replicas
        (1 if None); tasks streams are made per pipeline as its first job is dispatched (`ensure_tasks_stream`).
        Existing streams are left as they are, except that a `max_jobs` or `replicas` that is not None is
        imposed on them (on every pipeline's tasks stream too), and the advisories stream's subjects are
        brought up to date. The results stream holds at most `results_max_bytes` (DEFAULT_RESULTS_MAX_BYTES if
        None; imposed when given, and on a stream that has no limit) and messages of RESULT_MAX_MSG_BYTES;
        when full it refuses new results (discard new: a stored result is never dropped). The single tasks
        stream of earlier versions is removed (its subjects overlap every pipeline's): the health check
        publishes the pending tasks of running jobs again."""
        await self._remove_legacy_tasks_stream()
        wanted = [
            StreamConfig(name=names.RESULTS_STREAM, subjects=[names.RESULTS_SUBJECTS],
                         retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
                         duplicate_window=120, num_replicas=replicas or 1, discard=DiscardPolicy.NEW,
                         max_bytes=results_max_bytes or DEFAULT_RESULTS_MAX_BYTES, max_msg_size=RESULT_MAX_MSG_BYTES),
            StreamConfig(name=names.ADVISORIES_STREAM,
                         subjects=[names.MAX_DELIVERIES_ADVISORY, names.TERMINATED_ADVISORY],
                         retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
                         max_age=ADVISORY_MAX_AGE_S, num_replicas=replicas or 1),
        ]
        for config in wanted:
            await self._ensure_stream(config, max_jobs=None, replicas=replicas, results_max_bytes=results_max_bytes)
        if max_jobs is not None or replicas is not None:
            for slug in await self.task_stream_pipelines():
                await self._ensure_stream(self._tasks_stream_config(slug, max_jobs, replicas), max_jobs=max_jobs,
                                          replicas=replicas)

    async def ensure_tasks_stream(self, pipeline_slug: str, *, max_jobs: int | None = None,
                                  replicas: int | None = None) -> None:
        """The pipeline's tasks stream, created if missing (room for `max_jobs` job consumers, DEFAULT_MAX_JOBS
        if None: NATS 2.15 gives a stream 1,000 unless it says otherwise), and its bucket for big results; as
        `ensure_streams` for the rest."""
        await self._ensure_stream(self._tasks_stream_config(pipeline_slug, max_jobs, replicas), max_jobs=max_jobs,
                                  replicas=replicas)
        await self._ensure_result_objects(pipeline_slug, replicas)

    async def put_result_object(self, pipeline_slug: str, name: str, body: bytes) -> None:
        """Put a result too large for one message in the pipeline's bucket (in chunks that fit a message)."""
        await (await self._store(pipeline_slug)).put(name, body, meta=object_meta(name, self.nc.max_payload))

    async def ensure_result_buckets(self, *, replicas: int | None = None) -> None:
        """Every pipeline's bucket for big results (a worker starting: pipelines whose tasks stream was made
        before the buckets existed get theirs)."""
        for slug in await self.task_stream_pipelines():
            await self._ensure_result_objects(slug, replicas)

    async def _ensure_result_objects(self, pipeline_slug: str, replicas: int | None) -> None:
        """The pipeline's object store bucket for results too large for one message; what is in it lives at
        most RESULT_OBJECT_TTL_S (jetpipe deletes each object once taken, and a job's leftovers when it ends)."""
        bucket = names.result_objects_bucket(pipeline_slug)
        try:
            await self.js.object_store(bucket)
        except nats.js.errors.BucketNotFoundError:
            await self.js.create_object_store(bucket, ObjectStoreConfig(
                description=f"results of pipeline {pipeline_slug} too large for one message",
                ttl=RESULT_OBJECT_TTL_S, storage=StorageType.FILE, replicas=replicas or 1))
            log.info("created object store bucket %s", bucket)

    async def _store(self, pipeline_slug: str) -> ObjectStore:
        """The pipeline's result bucket (looked up once per connection; a bucket gone since answers NotFound)."""
        bucket = names.result_objects_bucket(pipeline_slug)
        if bucket not in self._stores:
            self._stores[bucket] = await self.js.object_store(bucket)
        return self._stores[bucket]

    async def result_object(self, pipeline_slug: str, name: str) -> bytes | None:
        """The content of the pipeline's result object `name`; None if there is no such object."""
        try:
            return (await (await self._store(pipeline_slug)).get(name)).data
        except OBJECT_GONE:
            return None

    async def result_object_size(self, pipeline_slug: str, name: str) -> int | None:
        """The size in bytes of the pipeline's result object `name`; None if there is no such object."""
        try:
            info = await (await self._store(pipeline_slug)).get_info(name)
        except OBJECT_GONE:
            return None
        return None if info.deleted else int(info.size or 0)

    async def delete_result_objects(self, pipeline_slug: str, object_names: Iterable[str]) -> None:
        """Remove these result objects (those already gone are no error)."""
        for name in object_names:
            store = await self._store(pipeline_slug)
            try:
                await store.delete(name)
            except OBJECT_GONE:
                pass

    async def job_result_objects(self, pipeline_slug: str, job_id: int) -> list[str]:
        """The names of the job's result objects still in its pipeline's bucket (uploaded and never taken: a
        service that stopped between its upload and its publish). One request finds them: the names are read from
        the subjects of the bucket's meta messages (every job's cleanup asks, and most jobs have none); only the
        job's own are then looked at, to leave out those deleted."""
        bucket = names.result_objects_bucket(pipeline_slug)
        meta = f"$O.{bucket}.M."
        try:
            info = await self.js.stream_info(f"OBJ_{bucket}", subjects_filter=f"{meta}>")
        except OBJECT_GONE:
            return []
        prefix = names.result_object_prefix(job_id)
        found = []
        for subject in info.state.subjects or {}:
            name = base64.urlsafe_b64decode(subject[len(meta):]).decode("utf-8", "replace")
            if name.startswith(prefix) and await self.result_object_size(pipeline_slug, name) is not None:
                found.append(name)
        return sorted(found)

    @staticmethod
    def _tasks_stream_config(pipeline_slug: str, max_jobs: int | None, replicas: int | None) -> StreamConfig:
        return StreamConfig(name=names.tasks_stream(pipeline_slug), subjects=[names.tasks_subjects(pipeline_slug)],
                            retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
                            duplicate_window=DUPLICATE_WINDOW_S, discard=DiscardPolicy.OLD, allow_direct=True,
                            max_consumers=max_jobs or DEFAULT_MAX_JOBS, num_replicas=replicas or 1)

    async def _ensure_stream(self, config: StreamConfig, *, max_jobs: int | None, replicas: int | None,
                             results_max_bytes: int | None = None) -> None:
        try:
            info = await self.js.stream_info(config.name or "")
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_stream(config)
                log.info("created stream %s subjects=%s", config.name, config.subjects)
            except nats.js.errors.BadRequestError as exc:  # created concurrently by another process
                if "already in use" not in str(exc):
                    raise
            return
        changes: dict[str, Any] = {}
        if max_jobs is not None and config.max_consumers and info.config.max_consumers != max_jobs:
            changes["max_consumers"] = max_jobs
        if replicas is not None and (info.config.num_replicas or 1) != replicas:
            changes["num_replicas"] = replicas
        subjects = sorted(config.subjects or [])
        if config.name == names.ADVISORIES_STREAM and sorted(info.config.subjects or []) != subjects:
            changes["subjects"] = config.subjects
        if config.name == names.RESULTS_STREAM:  # limits on a stream made before them, or newly asked for
            current = info.config
            asked = results_max_bytes is not None and current.max_bytes != results_max_bytes
            if asked or (current.max_bytes or -1) < 0:
                changes["max_bytes"] = config.max_bytes
            if (current.max_msg_size or -1) < 0:
                changes["max_msg_size"] = config.max_msg_size
            if current.discard != DiscardPolicy.NEW:
                changes["discard"] = DiscardPolicy.NEW
        if changes:
            await self._update_stream(info.config, changes)

    async def _remove_legacy_tasks_stream(self) -> None:
        try:
            info = await self.js.stream_info(names.LEGACY_TASKS_STREAM)
        except nats.js.errors.NotFoundError:
            return
        await self.js.delete_stream(names.LEGACY_TASKS_STREAM)
        log.warning("removed stream %s of an earlier jetpipe (one tasks stream for every pipeline; now each pipeline "
                    "has its own, PIPELINE_TASKS_<slug>): its %s task(s) of running jobs are published again into "
                    "their pipelines' streams by the health check", names.LEGACY_TASKS_STREAM, info.state.messages)

    async def task_stream_pipelines(self) -> list[str]:
        """The pipelines that have a tasks stream."""
        found, offset = [], 0
        while True:
            answer = json.loads((await self.nc.request("$JS.API.STREAM.NAMES", json.dumps(
                {"offset": offset, "subject": names.TASKS_SUBJECTS}).encode(), timeout=API_TIMEOUT_S)).data)
            if "error" in answer:
                raise nats.js.errors.APIError.from_error(answer["error"])
            page = answer.get("streams") or []
            found += [slug for stream in page if (slug := names.pipeline_of_tasks_stream(stream))]
            offset += len(page)
            if not page or offset >= answer.get("total", 0):
                return sorted(found)

    async def _update_stream(self, current: StreamConfig, changes: dict[str, Any]) -> None:
        was = {name: getattr(current, name) for name in changes}
        try:
            await self.js.update_stream(dataclasses.replace(current, **changes))
            log.info("stream %s now has %s (was %s)", current.name, changes, was)
        except nats.js.errors.BadRequestError as exc:  # a server that cannot make the change keeps its own
            log.warning("stream %s keeps %s (wanted %s): %s", current.name, was, changes, exc)

    # ---- job consumers ------------------------------------------------------------------------------
    async def ensure_job_consumer(self, job_id: int, pipeline_slug: str, *, max_deliver: int,
                                  ack_wait_s: float, metadata: dict[str, str] | None = None,
                                  paused: bool = False) -> ConsumerConfig:
        """Create the job's durable consumer, or check an existing one; returns the config the server holds.
        `metadata`: what services read about the job (its project, priority, weight); `paused`: create it
        paused (NATS 2.11 and later hold its deliveries; an older server ignores it).

        `add_consumer` silently *updates* an existing consumer (nats-py, measured), so an existing
        consumer is read, not re-added, and a mismatch is logged as a warning.
        """
        name = names.job_consumer(job_id)
        wanted = ConsumerConfig(
            durable_name=name, filter_subject=names.task_subject(pipeline_slug, job_id),
            ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=ack_wait_s,
            max_deliver=max_deliver, max_ack_pending=MAX_ACK_PENDING, metadata=metadata or None,
            pause_until=PAUSED_FOR_GOOD if paused else None,
        )
        stream = names.tasks_stream(pipeline_slug)
        try:
            info = await self.js.consumer_info(stream, name)
            created = False
        except nats.js.errors.NotFoundError:
            try:
                info = await self.js.add_consumer(stream, wanted)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != MAX_CONSUMERS_ERR_CODE:
                    raise
                raise JobSlotsFull(
                    f"job {job_id} cannot be dispatched yet: {stream} holds its maximum of job consumers (jobs of "
                    f"pipeline {pipeline_slug} dispatched and not yet ended); raise PIPELINE_NATS_MAX_JOBS or let "
                    "jobs finish") from None
            created = True
        got: ConsumerConfig = info.config
        summary = (f"max_deliver={got.max_deliver} ack_wait={got.ack_wait}s max_ack_pending={got.max_ack_pending} "
                   f"filter={got.filter_subject} inactive_threshold={got.inactive_threshold}")
        mismatch = (got.max_deliver != max_deliver or abs((got.ack_wait or 0) - ack_wait_s) > 1e-3
                    or got.filter_subject != wanted.filter_subject)
        if mismatch:
            log.warning("job=%s consumer %s exists with different settings: %s (wanted max_deliver=%s "
                        "ack_wait=%ss)", job_id, name, summary, max_deliver, ack_wait_s)
        else:
            log.info("job=%s consumer %s %s: %s", job_id, name, "created" if created else "reused", summary)
        return got

    async def set_job_claim(self, job_id: int, pipeline_slug: str, metadata: dict[str, str]) -> bool:
        """Write the job's claim (project, priority, weight, paused) into its consumer's metadata, where
        services listing the consumers read it; False if the job has no consumer (not dispatched, or ended)."""
        stream, name = names.tasks_stream(pipeline_slug), names.job_consumer(job_id)
        try:
            info = await self.js.consumer_info(stream, name, timeout=API_TIMEOUT_S)
        except nats.js.errors.NotFoundError:
            return False
        if own_metadata(info.config) != metadata:
            await self.js.add_consumer(stream, dataclasses.replace(info.config, metadata=metadata))
        return True

    async def pause_job_consumer(self, job_id: int, pipeline_slug: str, *, paused: bool) -> bool | None:
        """Pause (hold its deliveries, with no end) or resume the job's consumer on the server: True if
        done, False if the job has no consumer, None if this server cannot pause a consumer (before 2.11)."""
        stream, name = names.tasks_stream(pipeline_slug), names.job_consumer(job_id)
        version = self.nc.connected_server_version
        if (version.major, version.minor) < (2, 11):
            return None
        try:
            if paused:
                await self.js.pause_consumer(stream, name, PAUSED_FOR_GOOD, timeout=API_TIMEOUT_S)
            else:
                await self.js.resume_consumer(stream, name, timeout=API_TIMEOUT_S)
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def delete_job_consumer(self, job_id: int, pipeline_slug: str) -> None:
        """Remove the job's consumer and any of its tasks still in the stream (idempotent)."""
        stream = names.tasks_stream(pipeline_slug)
        try:
            await self.js.delete_consumer(stream, names.job_consumer(job_id))
        except nats.js.errors.NotFoundError:
            pass
        try:
            await self.js.purge_stream(stream, subject=names.task_subject(pipeline_slug, job_id))
        except nats.js.errors.NotFoundError:
            pass

    async def consumer_state(self, job_id: int, pipeline_slug: str) -> ConsumerState:
        """The job consumer's counters; never raises (an outage comes back as `error`)."""
        if not self.nc.is_connected:  # reconnecting: answer now instead of waiting out a timeout
            return ConsumerState(exists=False, error="not connected to NATS")
        try:
            info = await self.js.consumer_info(names.tasks_stream(pipeline_slug), names.job_consumer(job_id),
                                               timeout=API_TIMEOUT_S)
        except nats.js.errors.NotFoundError:
            return ConsumerState(exists=False)
        except Exception as exc:  # noqa: BLE001 - "never raises" is the contract
            return ConsumerState(exists=False, error=f"{type(exc).__name__}: {exc}"[:200])
        delivered = info.delivered
        return ConsumerState(
            exists=True, num_pending=info.num_pending or 0, num_ack_pending=info.num_ack_pending or 0,
            num_redelivered=info.num_redelivered or 0,
            num_delivered=delivered.consumer_seq if delivered else 0,
            last_active=delivered.last_active if delivered else None,
        )

    async def job_consumers(self, pipeline_slug: str | None = None) -> list[JobConsumer]:
        """Every job consumer of one pipeline's tasks stream (of every pipeline if None), oldest job first."""
        if not self.nc.is_connected:
            raise nats.errors.ConnectionClosedError("not connected to NATS")
        found: list[JobConsumer] = []
        for slug in [pipeline_slug] if pipeline_slug else await self.task_stream_pipelines():
            prefix = names.task_subject_prefix(slug)
            offset = 0
            while True:
                try:
                    page = await self.js.consumers_info(names.tasks_stream(slug), offset=offset)
                except nats.js.errors.NotFoundError:
                    break  # no stream yet: no job of the pipeline was dispatched
                for info in page:
                    job_id = names.job_id_from_consumer(info.name)
                    subject = info.config.filter_subject or ""
                    if job_id is not None and subject.startswith(prefix):
                        delivered = info.delivered
                        found.append(JobConsumer(job_id, info.name, subject, slug, info.num_pending or 0,
                                                 own_metadata(info.config), bool(info.paused),
                                                 info.num_ack_pending or 0, info.num_waiting or 0,
                                                 (delivered.stream_seq or 0) if delivered else 0,
                                                 delivered.last_active if delivered else None))
                if len(page) < 256:
                    break
                offset += len(page)
        return sorted(found, key=lambda c: c.job_id)

    async def next_waiting_task_at(self, consumer: JobConsumer) -> dt.datetime | None:
        """When the job's next task to deliver was published (its oldest waiting task); None if none waits."""
        if consumer.num_pending <= 0:
            return None
        try:
            msg = await self.js.get_msg(names.tasks_stream(consumer.pipeline), seq=consumer.delivered_seq + 1,
                                        subject=consumer.filter_subject, next=True)
        except nats.js.errors.NotFoundError:
            return None
        return msg.time

    # ---- tasks --------------------------------------------------------------------------------------
    async def announce_job(self, pipeline_slug: str, job_id: int) -> None:
        """Tell the pipeline's services that the job has tasks (a hint on a core subject, not stored: a service
        that misses it finds the job at its next listing)."""
        body = json.dumps({"job_id": job_id, "pipeline": pipeline_slug}).encode()
        await self.nc.publish(names.job_announcements(pipeline_slug), body)

    async def publish_tasks(self, tasks: Iterable[Task], *, chunk: int = PUBLISH_CHUNK,
                            headers: dict[str, str] | None = None) -> list[Published]:
        """Publish tasks concurrently in chunks, deduplicated by `Nats-Msg-Id`; each task's stream sequence
        and whether it was new (a republished task keeps the sequence it was first stored at). `headers`: more
        headers for every task (its trace context)."""
        batch: list[Task] = []
        published: list[Published] = []
        for task in tasks:
            batch.append(task)
            if len(batch) >= chunk:
                published += await self._publish_chunk(batch, headers or {})
                batch = []
        if batch:
            published += await self._publish_chunk(batch, headers or {})
        return published

    async def _publish_chunk(self, batch: list[Task], headers: dict[str, str]) -> list[Published]:
        """Publish a chunk and wait for every PubAck (what `js.publish` does, for many at once)."""
        acks = await self.requests.send([
            (names.task_subject(t.pipeline, t.job_id), _encoder.encode(t),
             {**headers, **task_headers(t), "Nats-Expected-Stream": names.tasks_stream(t.pipeline)}) for t in batch],
            timeout=API_TIMEOUT_S)
        published = []
        for ack in acks:
            if no_responders(ack):
                raise nats.js.errors.NoStreamResponseError
            answer = _read_pub_ack(ack.data)
            if answer.error is not None:
                raise nats.js.errors.APIError.from_error(answer.error)
            if answer.seq is None:
                raise nats.js.errors.APIError(description=f"a PubAck without a sequence: {ack.data[:200]!r}")
            published.append(Published(answer.seq, not answer.duplicate))
        return published

    async def ack(self, reply_subject: str) -> bool:
        """ACK a task by its reply subject and wait for the server; False if the consumer is gone."""
        [reply] = await self.requests.send([(reply_subject, b"+ACK", None)], timeout=5)
        return not no_responders(reply)  # no responder: consumer or stream deleted, nothing left to ACK

    async def ack_many(self, reply_subjects: Iterable[str]) -> None:
        """`ack` several tasks at once, confirmed by the server in one round trip however many.

        Only the last ACK to each consumer asks for a confirmation: NATS hands one connection's messages to a
        subscriber in the order they were sent, and a consumer processes its ACKs in the order they come, so its
        confirmation of the last one says the ones before it were processed too. A confirmation for each cost
        this client 5 µs an ACK (a reply to read and match) instead of 1.3, and the server a message more."""
        replies = list(dict.fromkeys(reply_subjects))
        last: dict[object, str] = {}
        for reply in replies:
            parsed = names.parse_ack_subject(reply)
            last[parsed[:2] if parsed else reply] = reply  # by (stream, consumer)
        confirmed = set(last.values())
        if not self.nc.is_connected:  # reconnecting: fail now rather than leave ACKs in the client's buffer
            raise nats.errors.ConnectionReconnectingError
        for reply in replies:
            if reply not in confirmed:
                await self.nc.publish(reply, b"+ACK")
        await self.requests.send([(reply, b"+ACK", None) for reply in last.values()], timeout=5)

    async def task_images(self, reply_subjects: Iterable[str]) -> dict[str, tuple[int, str]]:
        """(job id, image id) of the task behind each ACK subject, read from the tasks stream in one burst
        of direct gets; subjects whose task is gone (ACKed, purged) or unreadable are left out."""
        seqs = {}
        for reply in dict.fromkeys(reply_subjects):
            parsed = names.parse_ack_subject(reply)
            if parsed and names.is_tasks_stream(parsed[0]):
                seqs[reply] = (parsed[0], parsed[3])
        answers = await self.requests.send(
            [(direct_get_subject(stream), _encoder.encode({"seq": seq}), None) for stream, seq in seqs.values()],
            timeout=API_TIMEOUT_S)
        found = {}
        for reply, answer in zip(seqs, answers, strict=True):
            headers = answer.headers or {}
            if no_responders(answer):
                raise nats.js.errors.NoStreamResponseError
            job_id = names.parse_job_id(headers.get(names.HDR_JOB_ID, ""))
            if headers.get("Status") is None and job_id is not None and headers.get(names.HDR_IMAGE_ID):
                found[reply] = (job_id, headers[names.HDR_IMAGE_ID])
        return found

    async def images_of_tasks(self, reply_subjects: Iterable[str]) -> list[str]:
        """The image ids of the tasks behind ACK subjects, read from the stream at once (those gone or
        unknown are left out)."""
        return [image for _, image in (await self.task_images(reply_subjects)).values()]

    async def oldest_result_seq(self, job_id: int) -> int | None:
        """The stream sequence of the oldest message still in `PIPELINE_RESULTS` for the job (published and
        not yet taken into the inbox), or None if there is none."""
        found: list[int] = []
        for subject in (names.results_of_job(job_id), f"pipeline.results.{job_id}"):  # (and the form of old services)
            try:
                seq = (await self.js.get_msg(names.RESULTS_STREAM, seq=1, subject=subject, next=True)).seq
                if seq is not None:
                    found.append(seq)
            except nats.js.errors.NotFoundError:
                pass
        return min(found, default=None)

    async def results_last_seq(self) -> int:
        """The sequence of the newest message ever stored in `PIPELINE_RESULTS`."""
        return (await self.js.stream_info(names.RESULTS_STREAM)).state.last_seq

    async def task_at(self, stream: str, stream_seq: int) -> tuple[int, str] | None:
        """(job id, image id) of the task at `stream_seq` of a tasks stream (None if it is gone or is not
        a task jetpipe published)."""
        try:
            msg = await self.js.get_msg(stream, stream_seq)
        except nats.js.errors.NotFoundError:
            return None
        headers = msg.headers or {}
        job_id = names.parse_job_id(headers.get(names.HDR_JOB_ID, ""))
        image_id = headers.get(names.HDR_IMAGE_ID)
        return (job_id, image_id) if job_id is not None and image_id else None

    async def delete_task(self, stream: str, stream_seq: int) -> None:
        """Remove one task from a tasks stream (one JetStream gave up on); idempotent."""
        try:
            await self.js.delete_msg(stream, stream_seq)
        except nats.js.errors.NotFoundError:
            pass
        except nats.js.errors.APIError as exc:
            if exc.err_code != NO_MESSAGE_FOUND:  # already gone (acked, purged by cleanup): nothing to do
                raise

    async def term_many(self, reply_subjects: Iterable[str], reason: str) -> None:
        """Stop redelivery of these tasks for good, flushed once; `reason` (naming the images) reaches their
        MSG_TERMINATED advisories."""
        payload = f"+TERM {reason}"[:1000].encode()
        for reply in reply_subjects:
            await self.nc.publish(reply, payload)
        await self.confirm_sent(5)


def object_meta(name: str, max_payload: int) -> ObjectMeta:
    """An object's metadata with chunks that fit one message of a server whose max_payload is `max_payload`."""
    return ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=max(min(OBJECT_CHUNK_BYTES,
                                                                                 max_payload - 4096), 1024)))


class _PubAck(msgspec.Struct, gc=False):
    """What JetStream answers a publish with (the fields jetpipe reads)."""

    seq: int | None = None
    duplicate: bool = False
    error: dict[str, Any] | None = None


#: (a typed decoder: `json.loads` of bytes guesses their encoding first, and was 3 % of a dispatching worker's CPU)
_read_pub_ack = msgspec.json.Decoder(_PubAck).decode


def task_headers(task: Task) -> dict[str, str]:
    return {names.HDR_MSG_ID: names.task_msg_id(task.job_id, task.image_id),
            names.HDR_JOB_ID: str(task.job_id), names.HDR_IMAGE_ID: task.image_id}


class SyncTaskQueue:
    """TaskQueue for sync callers: each method runs its TaskQueue coroutine on `runner`'s loop and maps
    NATS outages to TransientError. Usage: `queue.ack(reply)` instead of `await queue.ack(reply)`."""

    def __init__(self, queue: TaskQueue, runner: LoopRunner, *, timeout_s: float = 60.0):
        self.queue = queue
        self.runner = runner
        self.timeout_s = timeout_s

    @classmethod
    def connect(cls, url: str, runner: LoopRunner, *, name: str = "jetpipe", watch: bool = False,
                **security: str) -> SyncTaskQueue:
        return cls(runner.run(TaskQueue.connect(url, name=name, watch=watch, **security), timeout=30), runner)

    def _run(self, what: str, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return self.runner.run(coro, timeout=self.timeout_s)
        except NATS_FAILURES as exc:
            raise TransientError(f"nats: {what} failed: {str(exc) or type(exc).__name__}") from exc

    def close(self) -> None:
        self._run("close", self.queue.close())

    def ensure_streams(self, *, max_jobs: int | None = None, replicas: int | None = None,
                       results_max_bytes: int | None = None) -> None:
        self._run("ensure_streams", self.queue.ensure_streams(max_jobs=max_jobs, replicas=replicas,
                                                              results_max_bytes=results_max_bytes))

    def ensure_tasks_stream(self, pipeline_slug: str, *, max_jobs: int | None = None,
                            replicas: int | None = None) -> None:
        self._run("ensure_tasks_stream", self.queue.ensure_tasks_stream(pipeline_slug, max_jobs=max_jobs,
                                                                        replicas=replicas))

    def set_job_claim(self, job_id: int, pipeline_slug: str, metadata: dict[str, str]) -> bool:
        return self._run("set job claim", self.queue.set_job_claim(job_id, pipeline_slug, metadata))

    def pause_job_consumer(self, job_id: int, pipeline_slug: str, *, paused: bool) -> bool | None:
        return self._run("pause job consumer", self.queue.pause_job_consumer(job_id, pipeline_slug, paused=paused))

    def next_waiting_task_at(self, consumer: JobConsumer) -> dt.datetime | None:
        return self._run("next waiting task", self.queue.next_waiting_task_at(consumer))

    def ensure_job_consumer(self, job_id: int, pipeline_slug: str, *, max_deliver: int, ack_wait_s: float,
                            metadata: dict[str, str] | None = None, paused: bool = False) -> ConsumerConfig:
        return self._run("ensure_job_consumer", self.queue.ensure_job_consumer(
            job_id, pipeline_slug, max_deliver=max_deliver, ack_wait_s=ack_wait_s, metadata=metadata, paused=paused))

    def delete_job_consumer(self, job_id: int, pipeline_slug: str) -> None:
        self._run("delete_job_consumer", self.queue.delete_job_consumer(job_id, pipeline_slug))

    def consumer_state(self, job_id: int, pipeline_slug: str) -> ConsumerState:
        return self._run("consumer_state", self.queue.consumer_state(job_id, pipeline_slug))

    def job_consumers(self, pipeline_slug: str | None = None) -> list[JobConsumer]:
        return self._run("job_consumers", self.queue.job_consumers(pipeline_slug))

    def result_object(self, pipeline_slug: str, name: str) -> bytes | None:
        return self._run("result_object", self.queue.result_object(pipeline_slug, name))

    def result_object_size(self, pipeline_slug: str, name: str) -> int | None:
        return self._run("result_object_size", self.queue.result_object_size(pipeline_slug, name))

    def delete_result_objects(self, pipeline_slug: str, object_names: Iterable[str]) -> None:
        self._run("delete_result_objects", self.queue.delete_result_objects(pipeline_slug, object_names))

    def job_result_objects(self, pipeline_slug: str, job_id: int) -> list[str]:
        return self._run("job_result_objects", self.queue.job_result_objects(pipeline_slug, job_id))

    def start_publishing(self, tasks: Iterable[Task], *,
                         headers: dict[str, str] | None = None) -> concurrent.futures.Future[list[Published]]:
        """`publish_tasks`, started now: the caller does other work meanwhile, then waits with `published` (or
        cancels it)."""
        return self.runner.spawn(self.queue.publish_tasks(tasks, headers=headers))

    def published(self, publishing: concurrent.futures.Future[list[Published]]) -> list[Published]:
        """The result of `start_publishing`."""
        try:
            return self.runner.wait(publishing, timeout=self.timeout_s)
        except NATS_FAILURES as exc:
            raise TransientError(f"nats: publish_tasks failed: {str(exc) or type(exc).__name__}") from exc

    def announce_job(self, pipeline_slug: str, job_id: int) -> None:
        self._run("announce_job", self.queue.announce_job(pipeline_slug, job_id))

    def ack(self, reply_subject: str) -> bool:
        return self._run("ack", self.queue.ack(reply_subject))

    def ack_many(self, reply_subjects: Iterable[str]) -> None:
        self._run("ack_many", self.queue.ack_many(reply_subjects))

    def task_images(self, reply_subjects: Iterable[str]) -> dict[str, tuple[int, str]]:
        return self._run("task_images", self.queue.task_images(reply_subjects))

    def images_of_tasks(self, reply_subjects: Iterable[str]) -> list[str]:
        return self._run("images_of_tasks", self.queue.images_of_tasks(reply_subjects))

    def oldest_result_seq(self, job_id: int) -> int | None:
        return self._run("oldest_result_seq", self.queue.oldest_result_seq(job_id))

    def results_last_seq(self) -> int:
        return self._run("results_last_seq", self.queue.results_last_seq())

    def task_at(self, stream: str, stream_seq: int) -> tuple[int, str] | None:
        return self._run("task_at", self.queue.task_at(stream, stream_seq))

    def delete_task(self, stream: str, stream_seq: int) -> None:
        self._run("delete_task", self.queue.delete_task(stream, stream_seq))

    def term_many(self, reply_subjects: Iterable[str], reason: str) -> None:
        self._run("term_many", self.queue.term_many(reply_subjects, reason))
