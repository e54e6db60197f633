"""The processing-service SDK over NATS (the default transport): what `ProcessingService` does with JetStream.

- connects with its own inbox prefix, `_INBOX.<its NATS user>` (the only replies its user may read);
- finds work by listing the job consumers of its pipeline's stream `PIPELINE_TASKS_<slug>`,
  keeps one long-lived pull subscription per job (never subscribe/fetch/unsubscribe per request:
  that loses deliveries in flight to a dropped inbox), and pulls from the jobs in the order the fair share
  decides (pipeline/fairshare.py: the highest priority first, then each project's share by its weight,
  read from the consumers' metadata); a paused job is not pulled, a job that had no task is looked at
  again after EMPTY_RECHECK_S (or at once when no other job has tasks);
- fetches only as many tasks as it has free slots, so no task's ack_wait runs while it waits in a buffer;
  never runs more than `concurrency` handlers: a fetch can bring more than it asked for (an earlier pull
  request answered after it gave up, typically after a reconnect), and those extra tasks wait, kept
  alive with +WPI, for the next free slots;
- sends `+WPI` (in progress) every ack_wait/3 while the handler runs;
- publishes results on `pipeline.results.<slug>.<job_id>` with `Pipeline-Task-Token` (the tokens of the
  tasks answered: only they decide images) and `Pipeline-Task-Reply`; never ACKs a task;
- batches success results: up to `batch_size` images of one job go out as one result message (their
  tasks' tokens and reply subjects comma-separated in the headers), after at most `batch_linger_s`, or at
  once when no other task of the job is running or waiting here (nothing more could join it); one
  message per batch is what lets the workers save a thousand images a second (docs/performance.md). Error
  results go out one per image, at once. `batch_size=1` turns batching off. A batch too large for one message
  is split in halves; one image's result too large on its own is put in the pipeline's object store bucket
  and a reference to it is published instead (up to MAX_RESULT_OBJECT_BYTES; "Big results" in the contract);
- learns of a new job the moment it is announced on `pipeline.jobs.<slug>`, and lists the job consumers
  every REFRESH_S as well (an announcement is a hint that can be missed).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import hashlib
import json
import logging
import time
import urllib.parse
import uuid

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from opentelemetry.trace import SpanKind

from pipeline import fairshare, names
from pipeline.infra import tracing
from pipeline.infra.crashpoints import crash_point
from pipeline.infra.natswatch import round_trip
from pipeline.infra.outage import Outage
from pipeline.infra.taskqueue import NATS_FAILURES, TaskQueue, take_waiting
from pipeline.schemas import MAX_RESULT_OBJECT_BYTES, ErrorResult, Result, SuccessResult, Task, decode_task, encode
from pipeline.sdk.transport import Service

log = logging.getLogger(__name__)

#: Seconds the NATS connection may stay down before the service opens a new one instead of waiting for
#: the client's own reconnect (which can stall when the server restarts under it).
RECONNECT_WATCHDOG_S = 15.0
#: Seconds between two round trips that check the connection is alive.
LIVENESS_CHECK_S = 5.0
#: Seconds between two listings of the pipeline's job consumers.
REFRESH_S = 1.0
#: Seconds one fetch waits on one job when it has no task ready.
FETCH_TIMEOUT_S = 0.5
#: Seconds a job that had no task ready is passed over while other jobs have tasks.
EMPTY_RECHECK_S = 1.0
#: Seconds one publish of a result may take in all (a wedged client must not hang the service).
PUBLISH_TIMEOUT_S = 15.0
#: Attempts to publish one result before leaving the task to redelivery.
PUBLISH_ATTEMPTS = 5
#: Reply subjects of processing services start with this, then the service's NATS user: each service user may
#: read `_INBOX.<its user>.>` only (deploy/nats-users.conf), so no service sees another's deliveries.
SERVICE_INBOX_PREFIX = "_INBOX"


@dataclasses.dataclass
class _Held:
    """A task delivered beyond the free slots, kept leased with +WPI until a slot frees."""

    msg: Msg
    keep_alive: asyncio.Task[None]


@dataclasses.dataclass
class _Batch:
    """Success results of one job waiting to go out as one message."""

    replies: list[str] = dataclasses.field(default_factory=list)
    results: list[Result] = dataclasses.field(default_factory=list)  # successes; or one result of any kind
    tokens: list[str] = dataclasses.field(default_factory=list)  # each task's task_token, named with the result
    #: The `traceparent` its message carries: the span of its first task that has one (a message carries one;
    #: docs/processing-services.md, "Traces")
    trace: str | None = None
    #: The images its results name, counted once when made and as results are `add`ed (summing them again at
    #: every result cost a pass over the batch per task)
    images: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.images = sum(len(r.source_images) if isinstance(r, SuccessResult) else 1 for r in self.results)

    def add(self, reply: str, token: str, result: SuccessResult, trace: str | None) -> None:
        """One more task's success."""
        self.replies.append(reply)
        self.results.append(result)
        self.tokens.append(token)
        self.trace = self.trace or trace
        self.images += len(result.source_images)

    def merged(self) -> Result:
        first = self.results[0]
        if len(self.results) == 1:
            return first
        successes = [r for r in self.results if isinstance(r, SuccessResult)]
        times = [r.total_time for r in successes if r.total_time is not None]
        return SuccessResult(pipeline=successes[0].pipeline,
                             source_images=[i for r in successes for i in r.source_images],
                             detections=[d for r in successes for d in r.detections],
                             total_time=sum(times) if times else None)


def service_inbox_prefix(nats_url: str) -> str:
    """`_INBOX.<user>` for the NATS user in `nats_url` (the first server's), `_INBOX` without one (a creds
    file or no authentication: pass `inbox_prefix` to match what the operator's permissions allow)."""
    user = urllib.parse.urlsplit(nats_url.split(",")[0].strip()).username if nats_url else None
    return f"{SERVICE_INBOX_PREFIX}.{user}" if user else SERVICE_INBOX_PREFIX


def _heartbeat_every(ack_wait_s: float) -> float:
    """Seconds between the +WPI that keep a running task's lease (a third of its ack_wait)."""
    return max(ack_wait_s / 3, 0.2)


class _Lease:
    """Keeps a running task's lease: +WPI every `_heartbeat_every` once it has run that long. Until then it is a
    timer, not a task: most tasks end sooner, and a task started and cancelled for each of them cost the event
    loop more than a fast model's work (docs/performance.md)."""

    def __init__(self, msg: Msg, ack_wait_s: float, *, at_once: bool) -> None:
        self._keeping: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        if at_once:
            self._keep(msg, ack_wait_s)
        else:
            self._timer = asyncio.get_running_loop().call_later(_heartbeat_every(ack_wait_s), self._keep, msg,
                                                                ack_wait_s)

    def _keep(self, msg: Msg, ack_wait_s: float) -> None:
        self._keeping = asyncio.create_task(NatsTransport._keep_alive(msg, ack_wait_s, at_once=True))

    def end(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._keeping is not None:
            self._keeping.cancel()


class NatsTransport:
    """The service's link to NATS: one connection (replaced if it gets stuck), one pull subscription per job
    of its pipeline, pulled round-robin with as many tasks as the service has free slots."""

    def __init__(self, nats_url: str, *, creds: str = "", tls_ca: str = "", inbox_prefix: str | None = None):
        if not nats_url:
            raise ValueError("the NATS transport needs nats_url")
        self.nats_url = nats_url
        self.nats_security = {"creds": creds, "tls_ca": tls_ca}
        self.inbox_prefix = inbox_prefix or service_inbox_prefix(nats_url)
        self._queue: TaskQueue | None = None  # the service's NATS connection (replaced if it gets stuck)
        self._checked = 0.0  # monotonic time of the last liveness check
        self._replacing = False  # a replacement connection failed: say so once per outage
        self._subs: dict[int, JetStreamContext.PullSubscription] = {}
        self._ack_wait: dict[int, float] = {}
        self._held: dict[int, collections.deque[_Held]] = {}  # per job: delivered beyond the free slots
        self._finishing: dict[int, asyncio.Future] = {}  # per job: a pull left to finish on its own (announced)
        self._batches: dict[int, _Batch] = {}
        self._free = 0  # slots not running a task (only touched on the event loop)
        self._slot_freed = asyncio.Event()
        self._inflight: set[asyncio.Task] = set()
        self._announced = asyncio.Event()  # a job of the pipeline was announced: list its consumers now
        self._running: collections.Counter[int] = collections.Counter()  # per job: tasks its handler runs
        self._claims: dict[int, fairshare.Claim] = {}  # per job: project, weight, priority (consumer metadata)
        self._paused: set[int] = set()
        self._empty_until: dict[int, float] = {}  # per job: passed over until then (it had no task)
        self._stride = fairshare.Stride()

    @property
    def queue(self) -> TaskQueue:
        """The current connection (replaced when it gets stuck); only while running."""
        if self._queue is None:
            raise RuntimeError("the NATS transport is not running")
        return self._queue

    async def run(self, service: Service) -> None:
        """Pull and answer the pipeline's tasks until the service stops; survives NATS outages."""
        self.service = service
        self._free = service.concurrency
        self._queue = await self._connect()
        await self._listen(self._queue)
        log.info("service %s pulling pipeline %s with %s slot(s)", service.name, service.pipeline,
                 service.concurrency)
        try:
            await self._loop()
        finally:
            try:
                if self._finishing:  # pulls left to finish: what they bring is handed back, not dropped
                    await asyncio.wait(list(self._finishing.values()), timeout=FETCH_TIMEOUT_S + 5)
                await self._release_held()
                if self._inflight:
                    await asyncio.wait(self._inflight, timeout=30)
                for job_id in list(self._batches):
                    await self._flush(self.queue, job_id)
            finally:  # even when cancelled while it waits for its last tasks: never leave the connection open
                await self.queue.close()

    async def _connect(self) -> TaskQueue:
        return await TaskQueue.connect(self.nats_url, name=self.service.name, inbox_prefix=self.inbox_prefix,
                                       watch=True, **self.nats_security)

    async def _listen(self, queue: TaskQueue) -> None:
        """Hear the pipeline's new jobs announced (`pipeline.jobs.<slug>`), to pull them at once rather than at
        the next listing. A hint: when it is missed (or not allowed), the listing every REFRESH_S finds the job."""
        async def announced(msg: Msg) -> None:
            self._announced.set()

        await queue.nc.subscribe(names.job_announcements(self.service.pipeline), cb=announced)

    async def _idle(self, seconds: float) -> None:
        """Wait `seconds`, or less if a job is announced or the service is stopped."""
        waits = [asyncio.ensure_future(event.wait()) for event in (self._announced, self.service.stopping)]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    async def _alive(self) -> bool:
        """One round trip with the server: the client may think it is connected when it is not (never a
        flush with a timeout, which nats-py 2.16 turns into a dead read loop: pipeline/infra/natswatch.py)."""
        return await round_trip(self.queue.nc, 2) is None

    async def _replace_stuck_connection(self, down_since: float | None) -> float | None:
        """When the connection has been down (or silent) longer than RECONNECT_WATCHDOG_S, replace it with
        a new one (the client's own reconnect can stall when a server restarts under it); when it was down."""
        now = time.monotonic()
        if now - self._checked < LIVENESS_CHECK_S and down_since is None:
            return None
        self._checked = now
        if self.queue.nc.is_connected and await self._alive():
            return None
        if down_since is None or now - down_since < RECONNECT_WATCHDOG_S:
            return down_since or now
        log.log(logging.DEBUG if self._replacing else logging.WARNING,
                "service %s: NATS connection down for %.0f s; opening a new one", self.service.name, now - down_since)
        self._replacing = True
        try:
            fresh = await self._connect()
        except Exception as exc:  # noqa: BLE001 - NATS still down: the next check tries again
            log.debug("service %s: NATS still unreachable (%s)", self.service.name, exc)
            return now
        self._replacing = False
        await self._listen(fresh)
        stale, self._queue = self.queue, fresh
        self._subs.clear()  # bound to the old connection; re-made on the next refresh
        self._ack_wait.clear()
        for job_id in list(self._held):  # their +WPI went through the old connection: back after ack_wait
            self._take_held(job_id)
        try:
            await asyncio.wait_for(stale.nc.close(), 5)
        except Exception:  # noqa: BLE001 - it was stuck: nothing more to release
            pass
        return None

    async def _loop(self) -> None:
        next_refresh = 0.0
        down_since: float | None = None
        outage = Outage(f"service {self.service.name}: NATS", log)
        while not self.service.stopping.is_set():
            down_since = await self._replace_stuck_connection(down_since)
            queue = self.queue
            try:
                if time.monotonic() >= next_refresh or self._announced.is_set():
                    self._announced.clear()
                    await self._refresh(queue)
                    next_refresh = time.monotonic() + REFRESH_S
                if not self._subs:
                    await self._idle(REFRESH_S)
                    continue
                got_any = False
                with_work, rest = self._turns()
                for job_id in with_work + rest:  # the first job that has tasks is served; then decide again
                    if self.service.stopping.is_set() or self._announced.is_set():
                        break
                    pulled = await self._pull(queue, job_id)
                    if pulled:
                        self._stride.served([self._claims[j] for j in with_work if j in self._claims], job_id,
                                            pulled)
                        self._empty_until.pop(job_id, None)
                        got_any = True
                        break
                    self._empty_until[job_id] = time.monotonic() + EMPTY_RECHECK_S
                outage.ok()
                if not got_any:
                    await self._idle(0.05)
            except NATS_FAILURES as exc:
                await self.service.wait(outage.failed(str(exc) or type(exc).__name__))
            except Exception as exc:  # noqa: BLE001 - a bug must not stop the service: say it once, carry on
                problem = f"{type(exc).__name__}: {exc}"
                if problem != outage.problem:
                    log.error("service %s: unexpected error; carrying on", self.service.name, exc_info=True)
                await self.service.wait(outage.failed(problem))

    def _turns(self) -> tuple[list[int], list[int]]:
        """The jobs to pull from, in order: those not known to be empty, in the fair share's order; then the
        ones that had no task last time (looked at only if none of the first has any). Paused jobs: none."""
        now = time.monotonic()
        jobs = [self._claims.get(j) or fairshare.Claim(j) for j in self._subs if j not in self._paused]
        fresh = [c for c in jobs if self._empty_until.get(c.job_id, 0.0) <= now]
        stale = [c for c in jobs if self._empty_until.get(c.job_id, 0.0) > now]
        return ([c.job_id for c in self._stride.order(fresh)],
                [c.job_id for c in sorted(stale, key=lambda c: (-c.priority, self._empty_until[c.job_id]))])

    async def _refresh(self, queue: TaskQueue) -> None:
        consumers = {c.job_id: c for c in await queue.job_consumers(self.service.pipeline)}
        for job_id, consumer in consumers.items():
            claim, paused = fairshare.claim_from_metadata(job_id, consumer.metadata)
            self._claims[job_id] = claim
            (self._paused.add if paused or consumer.paused else self._paused.discard)(job_id)
        for gone in set(self._claims) - set(consumers):
            self._claims.pop(gone, None)
            self._paused.discard(gone)
            self._empty_until.pop(gone, None)
        for job_id in list(self._subs):
            if job_id not in consumers:
                await self._stop_pulling(job_id, "is gone")
        for job_id, consumer in consumers.items():
            if job_id not in self._subs:
                stream = names.tasks_stream(self.service.pipeline)
                info = await queue.js.consumer_info(stream, consumer.consumer)
                self._ack_wait[job_id] = info.config.ack_wait or 30.0
                self._subs[job_id] = await queue.js.pull_subscribe_bind(consumer.consumer, stream=stream)
                log.info("service %s: pulling job %s", self.service.name, job_id)

    async def _stop_pulling(self, job_id: int, why: str) -> None:
        sub = self._subs.pop(job_id, None)
        self._ack_wait.pop(job_id, None)
        self._take_held(job_id)  # the job's tasks no longer matter
        if sub is not None:
            await sub.unsubscribe()
        log.info("service %s: job %s %s; stopped pulling it", self.service.name, job_id, why)

    async def _pull(self, queue: TaskQueue, job_id: int) -> int:
        """Start as many of the job's tasks as there are free slots, held ones first, else fetched; how many
        came."""
        while self._free <= 0 and not self.service.stopping.is_set():
            self._hold_late()
            self._slot_freed.clear()
            await self.service.wait_for(self._slot_freed, REFRESH_S)
        if self._free <= 0 or job_id not in self._subs:
            return 0
        self._hold_late()
        msgs = self._take_held(job_id, self._free)
        late = len(msgs)
        if not msgs:
            if not queue.nc.is_connected or job_id in self._finishing:
                # no pull request now: it would wait in the client and be answered after it gave up, or run
                # beside the job's previous pull, which is still finishing
                return 0
            # bounded from outside too: a client whose connection is wedged can hang inside fetch
            fetching = asyncio.ensure_future(asyncio.wait_for(
                self._subs[job_id].fetch(self._free, timeout=FETCH_TIMEOUT_S), FETCH_TIMEOUT_S + 5))
            announced = asyncio.ensure_future(self._announced.wait())
            await asyncio.wait((fetching, announced), return_when=asyncio.FIRST_COMPLETED)
            announced.cancel()
            if not fetching.done():
                # A new job: look at it now. The pull is left to finish (within FETCH_TIMEOUT_S), never
                # cancelled: nats-py's fetch keeps what it has received so far to itself, and a cancelled
                # one dropped those tasks until their ack_wait ran out. What it brings is held, late.
                self._finishing[job_id] = fetching
                fetching.add_done_callback(functools.partial(self._pull_finished, job_id))
                return 0
            try:
                fetched = fetching.result()
            except (TimeoutError, nats.errors.TimeoutError):
                return 0
            except (nats.js.errors.NotFoundError, nats.js.errors.ServiceUnavailableError):
                # the job's consumer was deleted (job finished or canceled)
                await self._stop_pulling(job_id, "consumer is gone")
                return 0
            msgs, surplus = fetched[:self._free], fetched[self._free:]
            self._hold(job_id, surplus)
        self._free -= len(msgs)
        self._running[job_id] += len(msgs)
        for i, msg in enumerate(msgs):
            task = asyncio.create_task(self._process(queue, job_id, msg, late=i < late))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        return len(msgs)

    def _pull_finished(self, job_id: int, fetching: asyncio.Future) -> None:
        """A pull left to finish on its own has ended: hold what it brought (or, if the job is no longer
        pulled or the service is stopping, hand it back at once)."""
        self._finishing.pop(job_id, None)
        if fetching.cancelled() or fetching.exception() is not None:
            return  # nothing came (timed out), or the job's consumer is gone: the next pull says so
        msgs = fetching.result()
        if job_id in self._subs and not self.service.stopping.is_set():
            self._hold(job_id, msgs)
            return
        task = asyncio.ensure_future(self._hand_back(msgs))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    @staticmethod
    async def _hand_back(msgs: list[Msg]) -> None:
        """NAK tasks this service will not run, so that they are redelivered at once, not after ack_wait."""
        for msg in msgs:
            try:
                await msg.nak()
            except NATS_FAILURES:
                pass  # redelivered after ack_wait instead

    def _hold_late(self) -> None:
        """Hold what waits on the subscriptions: answers to pull requests that reached NATS after their fetch
        gave up (e.g. sent while reconnecting, flushed once connected). Kept alive from now on, not from
        whenever a slot frees and the next fetch would find them."""
        for job_id, sub in self._subs.items():
            self._hold(job_id, take_waiting(sub))

    def _hold(self, job_id: int, msgs: list) -> None:
        """Keep tasks delivered beyond the free slots alive (+WPI) until a slot frees; they start first."""
        if not msgs:
            return
        held = self._held.setdefault(job_id, collections.deque())
        ack_wait = self._ack_wait.get(job_id, 30.0)
        for msg in msgs:
            held.append(_Held(msg, asyncio.create_task(self._keep_alive(msg, ack_wait, at_once=True))))
        log.info("service %s: job=%s %s task(s) delivered late, held until a slot is free", self.service.name, job_id,
                 len(msgs))

    def _take_held(self, job_id: int, count: int | None = None) -> list[Msg]:
        """Up to `count` (default: all) of the job's held tasks, oldest first, no longer kept alive here."""
        held = self._held.get(job_id)
        taken: list[Msg] = []
        while held and (count is None or len(taken) < count):
            entry = held.popleft()
            entry.keep_alive.cancel()
            taken.append(entry.msg)
        if held is not None and not held:
            del self._held[job_id]
        return taken

    async def _release_held(self) -> None:
        """On stopping: hand the held tasks back (NAK) so they are redelivered at once, not after ack_wait."""
        for job_id in list(self._held):
            await self._hand_back(self._take_held(job_id))

    async def _process(self, queue: TaskQueue, job_id: int, msg, *, late: bool = False) -> None:
        headers = msg.headers or {}
        task: Task | ErrorResult
        try:
            task = decode_task(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            task = ErrorResult(error=f"malformed task: {exc}", image_id=headers.get(names.HDR_IMAGE_ID))
        try:
            # a late task's lease ran while it waited: +WPI at once
            lease = _Lease(msg, self._ack_wait.get(job_id, 30.0), at_once=late)
            try:
                parent = headers.get(tracing.TRACEPARENT)
                if tracing.wanted(parent):
                    with tracing.span("jetpipe.service.task", parent=parent, kind=SpanKind.CONSUMER,
                                      attributes=self._span_attributes(job_id, msg)):
                        trace = tracing.traceparent()
                        result = await self._run_handler(task)
                else:  # nothing traced: no span, and nothing read for one
                    trace, result = None, await self._run_handler(task)
            finally:
                lease.end()
        except Exception as exc:  # noqa: BLE001 - one task's trouble must not stop the service
            log.warning("service %s: job=%s task left to redelivery: %s", self.service.name, job_id, exc)
            return
        finally:
            self._free += 1
            self._running[job_id] -= 1
            if self._running[job_id] <= 0:
                del self._running[job_id]
            self._slot_freed.set()
        token = task.task_token if isinstance(task, Task) else ""
        if isinstance(result, SuccessResult) and self.service.batch_size > 1:
            await self._add_to_batch(queue, job_id, msg.reply, token, result, trace)
        else:
            await self._send(queue, job_id, _Batch([msg.reply], [result], [token], trace))

    def _span_attributes(self, job_id: int, msg: Msg) -> dict[str, str | int]:
        return {"jetpipe.job_id": job_id, "jetpipe.image_id": (msg.headers or {}).get(names.HDR_IMAGE_ID, "?"),
                "jetpipe.service": self.service.name}

    async def _add_to_batch(self, queue: TaskQueue, job_id: int, reply: str, token: str,
                            result: SuccessResult, trace: str | None) -> None:
        # The batches change only between awaits, so concurrent tasks never lose one another's results.
        ready = []
        batch = self._batches.get(job_id)
        if batch is not None and batch.images + len(result.source_images) > self.service.batch_size:
            ready.append(self._batches.pop(job_id))
            batch = None
        if batch is None:
            batch = self._batches[job_id] = _Batch()
            task = asyncio.create_task(self._flush_later(queue, job_id, batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        batch.add(reply, token, result, trace)
        if batch.images >= self.service.batch_size or not self._more_coming(job_id):
            ready.append(self._batches.pop(job_id))
        for full in ready:
            await self._send(queue, job_id, full)

    def _more_coming(self, job_id: int) -> bool:
        """Whether another result of the job may soon join its batch: a task of it is running or held. If none
        is, the batch goes out at once (a small job's last result does not wait out the linger)."""
        return self._running[job_id] > 0 or bool(self._held.get(job_id))

    async def _flush_later(self, queue: TaskQueue, job_id: int, batch: _Batch) -> None:
        await asyncio.sleep(self.service.batch_linger_s)
        if self._batches.get(job_id) is batch:
            await self._flush(queue, job_id)

    async def _flush(self, queue: TaskQueue, job_id: int) -> None:
        batch = self._batches.pop(job_id, None)
        if batch is not None and batch.results:
            await self._send(queue, job_id, batch)

    async def _send(self, queue: TaskQueue, job_id: int, batch: _Batch) -> None:
        """Publish a batch's results as one message; one too large for the server is split in halves, and a
        single task's result too large on its own goes out as an error result for its image."""
        result = batch.merged()
        try:
            await self._publish(queue, job_id, batch.replies, batch.tokens, result, batch.trace)
        except nats.errors.MaxPayloadError:
            if len(batch.results) > 1:
                half = len(batch.results) // 2
                for part in (slice(None, half), slice(half, None)):
                    await self._send(queue, job_id, _Batch(batch.replies[part], batch.results[part],
                                                           batch.tokens[part], batch.trace))
                return
            try:
                await self._send_as_object(queue, job_id, batch, result)
            except Exception as exc:  # noqa: BLE001 - one result's trouble must not stop the service
                log.warning("service %s: job=%s result object not sent, task(s) left to redelivery: %s",
                            self.service.name, job_id, str(exc) or type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - one batch's trouble must not stop the service
            images = ([i.id for i in result.source_images] if isinstance(result, SuccessResult)
                      else [result.image_id or "?"])
            log.warning("service %s: job=%s image=%s result not published, task(s) left to redelivery: %s",
                        self.service.name, job_id, ",".join(images), exc)

    async def _send_as_object(self, queue: TaskQueue, job_id: int, batch: _Batch, result: Result) -> None:
        """One task's result too large for a message: put it in the pipeline's bucket and publish a reference to
        it (docs/processing-services.md, "Big results"); over MAX_RESULT_OBJECT_BYTES, an error result instead."""
        body = encode(result)
        image_id = result.source_images[0].id if isinstance(result, SuccessResult) else result.image_id
        if len(body) > MAX_RESULT_OBJECT_BYTES:
            too_large = ErrorResult(error=f"result of {len(body)} bytes is larger than {MAX_RESULT_OBJECT_BYTES} "
                                          "bytes, the most one image may have", image_id=image_id)
            await self._send(queue, job_id, _Batch(batch.replies, [too_large], batch.tokens, batch.trace))
            return
        name = f"{names.result_object_prefix(job_id)}{uuid.uuid4().hex}"
        # the upload may outlast what is left of the task's lease: keep it (the task is not done until published)
        leases = asyncio.create_task(self._keep_alive(None, self._ack_wait.get(job_id, 30.0), at_once=True,
                                                      replies=batch.replies, nc=queue.nc))
        try:
            await asyncio.wait_for(queue.put_result_object(self.service.pipeline, name, body),
                                   PUBLISH_TIMEOUT_S + len(body) / 2**20)
        finally:
            leases.cancel()
        crash_point("after_result_object", job=job_id)
        reference = json.dumps({"result_object": name, "size": len(body),
                                "sha256": hashlib.sha256(body).hexdigest()}).encode()
        await self._publish(queue, job_id, batch.replies, batch.tokens, reference, batch.trace, result_object=name)
        log.info("service %s: job=%s image=%s result of %s bytes sent as object %s", self.service.name, job_id,
                 image_id, len(body), name)

    async def _run_handler(self, task: Task | ErrorResult) -> Result:
        """The handler's result for the task (a task that could not be read: the error saying so)."""
        if isinstance(task, ErrorResult):
            return task
        return await self.service.run_task(task)

    @staticmethod
    async def _keep_alive(msg, ack_wait_s: float, *, at_once: bool = False,
                          replies: list[str] | None = None, nc=None) -> None:
        """+WPI every ack_wait/3 on the task `msg` (or, with `replies` and `nc`, on those tasks' reply subjects:
        tasks whose result is on its way); `at_once`: the first now (a task whose ack_wait ran meanwhile)."""
        every = _heartbeat_every(ack_wait_s)
        if not at_once:
            await asyncio.sleep(every)
        while True:
            try:
                if replies is None:
                    await msg.in_progress()
                else:
                    for reply in replies:
                        await nc.publish(reply, b"+WPI")
            except Exception:  # noqa: BLE001 - a lost +WPI only risks a redelivery
                return
            await asyncio.sleep(every)

    async def _publish(self, queue: TaskQueue, job_id: int, replies: list[str], tokens: list[str],
                       result: Result | bytes, trace: str | None, *, result_object: str | None = None) -> None:
        """Publish a result (or, with `result_object`, the reference to the object holding it)."""
        body = result if isinstance(result, bytes) else encode(result)
        headers = {names.HDR_TASK_REPLY: names.join_task_replies(replies),
                   names.HDR_TASK_TOKEN: ",".join(t for t in tokens if t)}
        if trace:
            headers[tracing.TRACEPARENT] = trace
        if result_object:
            headers[names.HDR_RESULT_OBJECT] = result_object
        for attempt in range(1, PUBLISH_ATTEMPTS + 1):
            try:
                subject = names.result_subject(self.service.pipeline, job_id)
                await asyncio.wait_for(queue.js.publish(subject, body, stream=names.RESULTS_STREAM,
                                                        headers=headers), PUBLISH_TIMEOUT_S)
                return
            except NATS_FAILURES as exc:
                if attempt == PUBLISH_ATTEMPTS or isinstance(exc, nats.errors.MaxPayloadError):
                    raise
                log.warning("service %s: job=%s publishing result failed (%s); retry %s", self.service.name, job_id,
                            str(exc) or type(exc).__name__, attempt)
                await asyncio.sleep(0.5 * attempt)
