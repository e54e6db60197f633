"""The results bridge: PIPELINE_RESULTS -> `process_pipeline_result` Dramatiq messages, inside each worker.

Every worker process runs one bridge on its event loop, all sharing the durable consumer `results-bridge`
(JetStream hands each result message to one of them). A result message is ACKed only after its Dramatiq
message was sent, so a crash in between re-sends it (at-least-once; handling is idempotent). The bridge
pauses pulling while the results queue holds more than `max_in_flight` messages (bounded in flight).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from pipeline import names

log = logging.getLogger(__name__)

#: Result messages pulled per fetch.
FETCH_BATCH = 200
#: Seconds one fetch waits for messages when the stream is empty.
FETCH_TIMEOUT_S = 1.0
#: Seconds JetStream waits for the bridge's ACK of a result message before redelivering it.
RESULT_ACK_WAIT_S = 60
#: Results queued in Dramatiq (not yet handled) above which the bridge stops pulling.
MAX_IN_FLIGHT = 2000


class ResultsBridge:
    """Pulls result messages and hands them to `send_batch` (sync; runs in a thread)."""

    def __init__(self, js, *, send_batch: Callable[[list[tuple[int, str, str | None]]], None],
                 queue_depth: Callable[[], int], max_in_flight: int = MAX_IN_FLIGHT):
        self.js = js
        self.send_batch = send_batch
        self.queue_depth = queue_depth
        self.max_in_flight = max_in_flight
        self._stopping = asyncio.Event()
        self.forwarded = 0

    def stop(self) -> None:
        self._stopping.set()

    async def _subscribe(self):
        config = ConsumerConfig(durable_name=names.RESULTS_BRIDGE_CONSUMER, filter_subject=names.RESULTS_SUBJECTS,
                                ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                                ack_wait=RESULT_ACK_WAIT_S, max_ack_pending=20_000)
        try:
            await self.js.consumer_info(names.RESULTS_STREAM, names.RESULTS_BRIDGE_CONSUMER)
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_consumer(names.RESULTS_STREAM, config)
            except nats.js.errors.BadRequestError:
                pass  # created concurrently by another worker
        return await self.js.pull_subscribe_bind(names.RESULTS_BRIDGE_CONSUMER, stream=names.RESULTS_STREAM)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        sub = None
        while not self._stopping.is_set():
            try:
                if sub is None:
                    sub = await self._subscribe()
                    log.info("results bridge pulling %s via consumer %s", names.RESULTS_STREAM,
                             names.RESULTS_BRIDGE_CONSUMER)
                depth = await loop.run_in_executor(None, self.queue_depth)
                if depth > self.max_in_flight:
                    await self._sleep(0.2)
                    continue
                try:
                    msgs = await sub.fetch(FETCH_BATCH, timeout=FETCH_TIMEOUT_S)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                await self._forward(loop, msgs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the bridge must outlive NATS/Redis outages
                log.warning("results bridge: %s: %s; retrying in 1 s", type(exc).__name__, exc)
                if isinstance(exc, nats.js.errors.NotFoundError):
                    sub = None  # consumer or stream lost (NATS restarted without its store): re-create
                await self._sleep(1.0)
        log.info("results bridge stopped after forwarding %s result message(s)", self.forwarded)

    async def _forward(self, loop, msgs) -> None:
        batch, ackable = [], []
        for msg in msgs:
            job_id = names.job_id_from_result_subject(msg.subject)
            if job_id is None:
                log.error("results bridge: dropping message on unexpected subject %r", msg.subject)
                await msg.term()
                continue
            reply = (msg.headers or {}).get(names.HDR_TASK_REPLY)
            batch.append((job_id, msg.data.decode("utf-8", errors="replace"), reply))
            ackable.append(msg)
        if not batch:
            return
        try:
            await loop.run_in_executor(None, self.send_batch, batch)
        except Exception as exc:  # noqa: BLE001
            log.warning("results bridge: could not enqueue %s result(s) (%s); they will be redelivered",
                        len(batch), exc)
            for msg in ackable:
                await msg.nak(delay=2)
            return
        for msg in ackable:
            await msg.ack()
        self.forwarded += len(ackable)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass
