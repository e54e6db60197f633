"""The bridge: JetStream -> Dramatiq, inside each worker process.

Two routes, each a durable pull consumer shared by every worker (JetStream hands each message to one):
- `PIPELINE_RESULTS` -> `process_pipeline_result(job_id, body, reply)`;
- `PIPELINE_ADVISORIES` (MAX_DELIVERIES and MSG_TERMINATED of tasks) -> `process_task_advisory(body)`,
  the fast path that fails a lost image within seconds.

A message is ACKed on its stream only after its Dramatiq message was sent, so a crash in between re-sends
it (at-least-once; both actors are idempotent). The bridge pauses pulling while Dramatiq's results queue
holds more than `max_in_flight` messages (bounded in flight).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from pipeline import names
from pipeline.metrics import metrics

log = logging.getLogger(__name__)

#: Messages pulled per fetch.
FETCH_BATCH = 200
#: Seconds one fetch waits for messages when the stream is empty.
FETCH_TIMEOUT_S = 0.5
#: Seconds JetStream waits for the bridge's ACK of a message before redelivering it.
BRIDGE_ACK_WAIT_S = 60
#: Results queued in Dramatiq (not yet handled) above which the bridge stops pulling.
MAX_IN_FLIGHT = 2000


@dataclasses.dataclass(frozen=True)
class Route:
    """Messages of `stream` (via durable `consumer`) become Dramatiq messages through `send_batch`.

    `to_args(msg)` gives the actor's arguments, or None for a message that can never be handled (it is
    terminated and logged).
    """

    stream: str
    consumer: str
    filter_subject: str | None
    to_args: Callable[[object], tuple | None]
    send_batch: Callable[[list[tuple]], None]


def result_args(msg) -> tuple | None:
    job_id = names.job_id_from_result_subject(msg.subject)
    if job_id is None:
        return None
    return job_id, msg.data.decode("utf-8", errors="replace"), (msg.headers or {}).get(names.HDR_TASK_REPLY)


def advisory_args(msg) -> tuple | None:
    return (msg.data.decode("utf-8", errors="replace"),)


class Bridge:
    def __init__(self, js, routes: list[Route], *, queue_depth: Callable[[], int], max_in_flight: int = MAX_IN_FLIGHT):
        self.js = js
        self.routes = routes
        self.queue_depth = queue_depth
        self.max_in_flight = max_in_flight
        self._stopping = asyncio.Event()
        self.forwarded = 0

    def stop(self) -> None:
        self._stopping.set()

    async def _subscribe(self, route: Route):
        config = ConsumerConfig(durable_name=route.consumer, filter_subject=route.filter_subject,
                                ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                                ack_wait=BRIDGE_ACK_WAIT_S, max_ack_pending=20_000)
        try:
            await self.js.consumer_info(route.stream, route.consumer)
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_consumer(route.stream, config)
            except nats.js.errors.BadRequestError:
                pass  # created concurrently by another worker
        sub = await self.js.pull_subscribe_bind(route.consumer, stream=route.stream)
        log.info("bridge pulling %s via consumer %s", route.stream, route.consumer)
        return sub

    async def run(self) -> None:
        """Pull every route concurrently (an idle route's fetch timeout never delays a busy one)."""
        await asyncio.gather(*(self._run_route(route) for route in self.routes))
        log.info("bridge stopped after forwarding %s message(s)", self.forwarded)

    async def _run_route(self, route: Route) -> None:
        loop = asyncio.get_running_loop()
        sub = None
        while not self._stopping.is_set():
            try:
                depth = await loop.run_in_executor(None, self.queue_depth)
                if depth > self.max_in_flight:
                    await self._sleep(0.2)
                    continue
                if sub is None:
                    sub = await self._subscribe(route)
                try:
                    msgs = await sub.fetch(FETCH_BATCH, timeout=FETCH_TIMEOUT_S)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                await self._forward(loop, route, msgs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the bridge must outlive NATS/Redis outages
                log.warning("bridge %s: %s: %s; retrying in 1 s", route.stream, type(exc).__name__, exc)
                if isinstance(exc, nats.js.errors.NotFoundError | nats.js.errors.ServiceUnavailableError):
                    sub = None  # consumer or stream lost (NATS restarted without its store): re-create
                await self._sleep(1.0)

    async def _forward(self, loop, route: Route, msgs) -> None:
        batch, ackable = [], []
        for msg in msgs:
            args = route.to_args(msg)
            if args is None:
                log.error("bridge: dropping message on unexpected subject %r", msg.subject)
                await msg.term()
                continue
            batch.append(args)
            ackable.append(msg)
        if not batch:
            return
        try:
            await loop.run_in_executor(None, route.send_batch, batch)
        except Exception as exc:  # noqa: BLE001
            log.warning("bridge: could not enqueue %s message(s) from %s (%s); they will be redelivered",
                        len(batch), route.stream, exc)
            for msg in ackable:
                await msg.nak(delay=2)
            return
        for msg in ackable:
            await msg.ack()
        self.forwarded += len(ackable)
        now = time.time()
        lag = metrics().bridge_lag
        for msg in ackable:
            lag.observe(max(0.0, now - msg.metadata.timestamp.timestamp()))

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass
