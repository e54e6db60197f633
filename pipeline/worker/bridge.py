"""The bridge: JetStream -> jetpipe, inside each worker process.

Two routes, each a durable pull consumer shared by every worker (JetStream hands each message to one):
- `PIPELINE_RESULTS`: result messages are *taken* into the database inbox (`pipeline/core/inbox.py`), which
  ACKs the tasks they settle, and `process_pipeline_result(job_id)` is asked to save them;
- `PIPELINE_ADVISORIES` (MAX_DELIVERIES and MSG_TERMINATED of tasks) -> `process_task_advisory(body)`,
  the fast path that fails a lost image within seconds.

A message is ACKed on its stream only after it was delivered (committed to the inbox, or sent to
Dramatiq), so a crash in between redelivers it (at-least-once; both consumers of it are idempotent).
Each route stops pulling while its backlog (inbox rows, Dramatiq's queue) is over its bound, so memory
stays bounded and the backlog waits on disk in JetStream. A periodic sweep asks for the inbox rows of
every job to be drained, so a lost drain request (a Redis flush, a worker killed) delays a save by
seconds, never loses it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

import models
from pipeline import names
from pipeline.core import inbox
from pipeline.core.saving import request_drains
from pipeline.errors import TasksNotAcked
from pipeline.infra.broker import redis_of
from pipeline.infra.metrics import metrics, outage_reporter
from pipeline.infra.outage import Outage
from pipeline.infra.runtime import Runtime

log = logging.getLogger(__name__)

#: Advisories queued in Dramatiq (not yet handled) above which the bridge stops pulling them.
MAX_ADVISORIES_QUEUED = 2000

#: Messages pulled per fetch.
FETCH_BATCH = 200
#: Bytes of results a worker's subscription holds before it takes them, at most: beyond it the client drops
#: deliveries (JetStream redelivers them after BRIDGE_ACK_WAIT_S), so a burst of large results cannot grow a
#: worker's memory past this plus one fetch's worth of messages being taken.
MAX_PENDING_BYTES = 64 * 2**20
#: Seconds one fetch waits for messages when the stream is empty. Short on purpose: once nats-py (2.16) has
#: had to leave a pull request waiting, it hands over the first message that arrives only with the rest of
#: the batch, or when the request expires; at 0.5 s a small job's last result waited up to half a second
#: in the bridge. An idle bridge asks again ten times a second per stream, which NATS answers cheaply.
FETCH_TIMEOUT_S = 0.1
#: Seconds JetStream waits for the bridge's ACK of a message before redelivering it, at most (taking a
#: batch takes milliseconds; a worker killed holding a batch has it redelivered this long after). It is
#: also kept under half the tasks' ack_wait, so a result a dead worker held comes back to another bridge
#: before the task it settles is redelivered to a service.
BRIDGE_ACK_WAIT_S = 30.0
#: Seconds between two sweeps of the inbox for rows nobody has asked to save.
SWEEP_S = 5.0
#: Seconds of fetches that only time out after which the bridge checks that its consumer still exists:
#: a pull from a consumer that NATS lost (a store wiped, a stream deleted) looks like an idle stream.
CONSUMER_CHECK_S = 5.0


@dataclasses.dataclass(frozen=True)
class Route:
    """Messages of `stream` (via durable `consumer`) handed to `deliver` (run in a thread).

    `accepts(msg)` is False for a message that can never be handled (it is terminated and logged);
    `deliver(msgs)` raises if they could not be delivered (they are redelivered later); `backlogged()`
    is True while the route's downstream is full (pulling pauses).
    """

    stream: str
    consumer: str
    filter_subject: str | None
    accepts: Callable[[object], bool]
    deliver: Callable[[list], None]
    backlogged: Callable[[], bool]


async def _dropped(sub: Any) -> None:
    """Unsubscribe a pull subscription whose consumer is gone (its inbox would otherwise stay)."""
    try:
        await sub.unsubscribe()
    except Exception:  # noqa: BLE001 - the connection may be down too: nothing else to release
        pass


def is_result(msg) -> bool:
    return names.job_id_from_result_subject(msg.subject) is not None


class Bridge:
    def __init__(self, js, routes: list[Route], *, sweep: Callable[[], None] | None = None,
                 task_ack_wait_s: float = BRIDGE_ACK_WAIT_S * 2, ensure_streams=None):
        self.js = js
        self.routes = routes
        self.sweep = sweep
        self.ack_wait_s = min(BRIDGE_ACK_WAIT_S, max(1.0, task_ack_wait_s / 2))
        self.ensure_streams = ensure_streams  # coroutine function: re-creates the streams NATS lost
        self.missing: dict[str, bool] = {}  # per stream: its consumer was found missing (logged once)
        self._stopping = asyncio.Event()
        self.forwarded = 0

    def stop(self) -> None:
        self._stopping.set()

    async def _subscribe(self, route: Route):
        config = ConsumerConfig(durable_name=route.consumer, filter_subject=route.filter_subject,
                                ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                                ack_wait=self.ack_wait_s, max_ack_pending=20_000)
        try:
            info = await self.js.consumer_info(route.stream, route.consumer)
            if abs((info.config.ack_wait or 0) - self.ack_wait_s) > 0.01:
                await self.js.add_consumer(route.stream, config)  # updates the ack_wait of the existing one
        except nats.js.errors.NotFoundError:
            if self.ensure_streams is not None:
                await self.ensure_streams()  # the stream itself may be gone (NATS lost its store)
            try:
                await self.js.add_consumer(route.stream, config)
                log.info("bridge created consumer %s on %s", route.consumer, route.stream)
            except nats.js.errors.BadRequestError:
                pass  # created concurrently by another worker
        sub = await self.js.pull_subscribe_bind(route.consumer, stream=route.stream,
                                                pending_bytes_limit=MAX_PENDING_BYTES)
        self._set_missing(route, False)
        log.info("bridge pulling %s via consumer %s", route.stream, route.consumer)
        return sub

    async def _consumer_missing(self, route: Route) -> bool:
        """True if the route's consumer (or its stream) no longer exists; logs it once per change."""
        try:
            info = await self.js.consumer_info(route.stream, route.consumer)
            if info.num_pending:  # messages wait, yet our fetches brought none: the subscription is dead
                log.warning("bridge: %s holds %s message(s) for %s but fetches return none; subscribing again",
                            route.stream, info.num_pending, route.consumer)
                return True
            return False
        except nats.js.errors.NotFoundError:
            pass
        try:
            waiting = (await self.js.stream_info(route.stream)).state.messages
            what = f"{route.stream} holds {waiting} unprocessed message(s) and has no consumer {route.consumer}"
        except nats.js.errors.NotFoundError:
            what = f"stream {route.stream} is gone"
        if not self.missing.get(route.stream):
            log.error("bridge: %s (NATS lost it: a wiped store, or deleted by hand); re-creating it", what)
        self._set_missing(route, True)
        return True

    def nc_connected(self) -> bool:
        """True while the NATS connection is up (a fetch that times out then only means: nothing to do)."""
        return self.js._nc.is_connected

    def _set_missing(self, route: Route, missing: bool) -> None:
        if self.missing.get(route.stream) and not missing:
            log.warning("bridge: consumer %s on %s is back", route.consumer, route.stream)
        self.missing[route.stream] = missing
        metrics().bridge_consumer_missing.labels(route.stream).set(int(missing))

    async def run(self) -> None:
        """Pull every route concurrently (an idle route's fetch timeout never delays a busy one)."""
        tasks = [self._run_route(route) for route in self.routes]
        if self.sweep is not None:
            tasks.append(self._run_sweep(self.sweep))
        await asyncio.gather(*tasks)
        log.info("bridge stopped after forwarding %s message(s)", self.forwarded)

    async def _run_route(self, route: Route) -> None:
        loop = asyncio.get_running_loop()
        sub = None
        checked = time.monotonic()
        outage = Outage(f"bridge {route.stream}", log, on_change=outage_reporter(f"bridge:{route.stream}"))
        while not self._stopping.is_set():
            try:
                if await loop.run_in_executor(None, route.backlogged):
                    await self._sleep(0.2)
                    continue
                if sub is None:
                    sub = await self._subscribe(route)
                    checked = time.monotonic()
                try:
                    msgs = await sub.fetch(FETCH_BATCH, timeout=FETCH_TIMEOUT_S)
                    outage.ok()
                except (nats.errors.TimeoutError, TimeoutError):
                    if self.nc_connected():
                        outage.ok()
                    if time.monotonic() - checked > CONSUMER_CHECK_S:
                        checked = time.monotonic()
                        if await self._consumer_missing(route):
                            await _dropped(sub)
                            sub = None
                    continue
                checked = time.monotonic()
                await self._forward(loop, route, msgs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the bridge must outlive NATS/Redis/database outages
                if sub is not None and isinstance(exc, nats.js.errors.NotFoundError
                                                  | nats.js.errors.ServiceUnavailableError):
                    try:
                        if await self._consumer_missing(route):
                            # consumer or stream lost (NATS restarted without its store): re-create
                            await _dropped(sub)
                            sub = None
                            continue
                    except Exception:  # noqa: BLE001 - NATS unreachable: retried below like any outage
                        pass
                await self._sleep(outage.failed(f"{type(exc).__name__}: {exc}"))

    async def _forward(self, loop, route: Route, msgs) -> None:
        usable = []
        for msg in msgs:
            if route.accepts(msg):
                usable.append(msg)
            else:
                log.error("bridge: dropping message on unexpected subject %.200r", msg.subject)
                await msg.term()
        if not usable:
            return
        try:
            await loop.run_in_executor(None, route.deliver, usable)
        except Exception as exc:  # noqa: BLE001
            log.warning("bridge: could not deliver %s message(s) from %s (%s: %s); they will be redelivered",
                        len(usable), route.stream, type(exc).__name__, exc)
            for msg in usable:
                await msg.nak(delay=2)
            return
        for msg in usable:
            await msg.ack()
        self.forwarded += len(usable)
        now = time.time()
        lag = metrics().bridge_lag
        for msg in usable:
            lag.observe(max(0.0, now - msg.metadata.timestamp.timestamp()))

    async def _run_sweep(self, sweep: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        outage = Outage("bridge: inbox sweep", log, on_change=outage_reporter("inbox_sweep"))
        while not self._stopping.is_set():
            await self._sleep(SWEEP_S)
            try:
                await loop.run_in_executor(None, sweep)
                outage.ok()
            except Exception as exc:  # noqa: BLE001 - an outage: the next sweep tries again
                outage.failed(f"{type(exc).__name__}: {exc}")

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass


# ---- jetpipe's two routes ---------------------------------------------------------------------------------
def bridge_routes(runtime: Runtime) -> list[Route]:
    """The bridge's two routes: results into the inbox, advisories into `process_task_advisory`."""

    def take_results(msgs: list[Msg]) -> None:
        not_acked = None
        with models.thread_connection():
            try:
                jobs = inbox.take(runtime, [inbox.Incoming.from_msg(job_id, m) for m in msgs
                                            if (job_id := names.job_id_from_result_subject(m.subject)) is not None])
            except TasksNotAcked as exc:  # taken all the same: saving goes on while the ACKs are retried
                jobs, not_acked = exc.job_ids, exc
        try:
            request_drains(runtime, jobs)
        except Exception as exc:  # noqa: BLE001 - the results are safe in the inbox; the sweep asks again
            log.warning("bridge: could not ask for jobs %s to be saved (%s); the inbox sweep will", jobs, exc)
        if not_acked is not None:
            raise not_acked  # the result messages come back, and the ACKs of their tasks are sent again

    def send_advisories(msgs) -> None:
        for msg in msgs:
            runtime.send(names.PROCESS_TASK_ADVISORY, msg.data.decode("utf-8", errors="replace"))

    def inbox_full() -> bool:
        with models.thread_connection():
            return inbox.size() > inbox.MAX_ROWS

    advisories_key = names.dramatiq_queue_key(names.RESULTS_QUEUE)
    return [
        Route(names.RESULTS_STREAM, names.RESULTS_BRIDGE_CONSUMER, names.RESULTS_SUBJECTS, is_result, take_results,
              inbox_full),
        Route(names.ADVISORIES_STREAM, names.ADVISORIES_CONSUMER, None, lambda msg: True, send_advisories,
              lambda: redis_of(runtime.broker).llen(advisories_key) > MAX_ADVISORIES_QUEUED),
    ]
