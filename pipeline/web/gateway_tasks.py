"""The HTTP gateway's hold on NATS: tasks reserved for processing services that speak HTTP, and their
results published to the results stream as a NATS service would publish them.

It keeps one long-lived pull subscription per job (the reference system subscribed, fetched and
unsubscribed per request, and every delivery in flight to the dropped inbox cost one of the task's
`max_deliver` deliveries). Fetches of one job are serialised, and a request is never handed more than it
asked for. Deliveries that reach the subscription after their request gave up (a fetch then returns them
along with its own, more than it asked for) are held and handed to the next requests first; on shutdown
whatever the gateway holds and has not handed out is released at once (NAK), while what it handed out runs
on its normal `ack_wait`. A job's subscription, and whatever it holds, is dropped once the job ends
(`keep_tidy`), so a long-running web server holds nothing of jobs long gone.

Everything here runs on the process's event loop thread (the runtime's), where its NATS connection lives.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext

from pipeline import names
from pipeline.errors import TooLarge, TransientError
from pipeline.infra import tracing
from pipeline.infra.taskqueue import NATS_FAILURES, TaskQueue, no_responders, take_waiting
from pipeline.schemas import MAX_RESULT_OBJECT_BYTES, decode_task

log = logging.getLogger(__name__)

#: Seconds a reservation waits for tasks before it answers with what it has (possibly none).
FETCH_WAIT_S = 0.5
#: Seconds to wait for the results stream to confirm a batch of published results.
PUBLISH_TIMEOUT_S = 10.0
#: Seconds between two looks for ended jobs whose subscriptions the gateway still holds.
TIDY_S = 10.0
#: Bytes of a message kept for its headers: a result larger than max_payload less this goes as an object.
HEADROOM_BYTES = 4096


@dataclass(frozen=True)
class Reserved:
    image_id: str
    image_url: str
    reply_subject: str
    task_token: str = ""  # kept by the gateway (its lease), never handed out: HTTP clients name the reply only
    trace: str | None = None  # the `traceparent` of the gateway's span handing it out

    def as_task(self) -> dict:
        """The task as the reference system hands it out: `id` and `image_id` are both the image id; and
        its `traceparent` where traces are on (docs/processing-services.md, "Traces")."""
        task = {"id": self.image_id, "image_id": self.image_id, "image_url": self.image_url,
                "reply_subject": self.reply_subject}
        if self.trace:
            task[tracing.TRACEPARENT] = self.trace
        return task


class Gateway:
    def __init__(self, queue: TaskQueue):
        self.queue = queue
        self._subs: dict[int, JetStreamContext.PullSubscription] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._held: dict[int, list] = {}  # per job: delivered, not handed out yet (beyond a request's count)
        self._closing = asyncio.Event()

    async def reserve(self, job_id: int, pipeline_slug: str, count: int) -> list[Reserved]:
        """Up to `count` of the job's tasks, each now leased to the caller for the consumer's ack_wait;
        [] when the job has no consumer (not dispatched yet, or ended)."""
        self._connected()
        lock = self._locks.setdefault(job_id, asyncio.Lock())
        async with lock:
            try:
                sub = self._subs.get(job_id) or await self._subscribe(job_id, pipeline_slug)
                if sub is None:
                    return []
                held = self._held.pop(job_id, []) + take_waiting(sub)
                late = bool(held)
                if len(held) < count:
                    try:
                        fetched = await sub.fetch(count - len(held), timeout=FETCH_WAIT_S)
                    except (nats.errors.TimeoutError, TimeoutError):
                        fetched = []
                    except BaseException:
                        self._held[job_id] = held  # still the next request's (dropped if the job ended)
                        raise
                    late |= len(fetched) > count - len(held)
                    held += fetched
                msgs, rest = held[:count], held[count:]
                if rest:
                    self._held[job_id] = rest
                if late:  # their lease ran while they waited here: it starts again as they are handed out
                    await asyncio.gather(*(msg.in_progress() for msg in msgs), return_exceptions=True)
            except (nats.js.errors.NotFoundError, nats.js.errors.ServiceUnavailableError):
                # the job's consumer was deleted (the job ended, or was canceled) under this fetch
                await self._forget(job_id)
                return []
            except NATS_FAILURES as exc:
                raise TransientError(f"task queue unavailable: {str(exc) or type(exc).__name__}") from exc
        reserved = []
        for msg in msgs:
            try:
                task = decode_task(msg.data)
            except Exception:  # noqa: BLE001 - not a task jetpipe published: never handed out
                log.error("job=%s gateway: terminating a message that is not a task", job_id)
                await msg.term()
                continue
            handing = tracing.start("jetpipe.gateway.hand_out", parent=(msg.headers or {}).get(tracing.TRACEPARENT),
                                    attributes={"jetpipe.job_id": job_id, "jetpipe.image_id": task.image_id})
            reserved.append(Reserved(task.image_id, task.image_url, msg.reply, task.task_token,
                                     tracing.traceparent(handing)))
            handing.end()
        return reserved

    def _connected(self) -> None:
        """A fetch on a connection that is down only times out: say what it is instead."""
        if not self.queue.nc.is_connected:
            raise TransientError("task queue unavailable: not connected to NATS (reconnecting)")

    async def _subscribe(self, job_id: int, pipeline_slug: str):
        try:
            sub = await self.queue.js.pull_subscribe_bind(names.job_consumer(job_id),
                                                          stream=names.tasks_stream(pipeline_slug))
        except nats.js.errors.NotFoundError:
            return None
        self._subs[job_id] = sub
        return sub

    async def _forget(self, job_id: int) -> None:
        self._held.pop(job_id, None)  # the job's consumer is gone: its deliveries no longer count
        sub = self._subs.pop(job_id, None)
        if sub is not None:
            try:
                await sub.unsubscribe()
            except NATS_FAILURES:
                pass

    async def publish_results(self, job_id: int, pipeline_slug: str,
                              results: list[tuple[str, bytes, str, str | None]]) -> list[int]:
        """Publish (reply subject, result body, task token, traceparent) to `pipeline.results.<pipeline>.<job_id>`,
        each confirmed by the results stream; their sequences in it. TransientError if it cannot be reached or
        does not confirm them all."""
        subject = names.result_subject(pipeline_slug, job_id)
        over = [reply for reply, body, _, _ in results if len(body) > MAX_RESULT_OBJECT_BYTES]
        if over:  # no retry can help
            raise TooLarge(f"{len(over)} result(s) are larger than {MAX_RESULT_OBJECT_BYTES} bytes, the most one "
                           "image may have; nothing of the request was published")
        try:
            messages = [await self._message(job_id, pipeline_slug, *result) for result in results]
            answers = await self.queue.requests.send([(subject, body, headers) for body, headers in messages],
                                                     timeout=PUBLISH_TIMEOUT_S)
        except NATS_FAILURES as exc:
            raise TransientError(f"results stream unavailable: {str(exc) or type(exc).__name__}") from exc
        seqs = []
        for answer in answers:
            if no_responders(answer):
                raise TransientError(f"results stream unavailable: no stream stores {subject}")
            ack = json.loads(answer.data or b"{}")
            if "error" in ack:
                raise TransientError(f"results stream refused a result: {ack['error'].get('description')}")
            seqs.append(int(ack.get("seq", 0)))
        return seqs

    async def _message(self, job_id: int, pipeline_slug: str, reply: str, body: bytes, token: str,
                       trace: str | None) -> tuple[bytes, dict[str, str]]:
        """The result message for one task: its result as it came, or, when that is too large for one message,
        a reference to the object it is put in (docs/processing-services.md, "Big results")."""
        headers = {names.HDR_TASK_REPLY: reply, names.HDR_TASK_TOKEN: token}
        if trace:
            headers[tracing.TRACEPARENT] = trace
        if len(body) <= self.queue.nc.max_payload - HEADROOM_BYTES:
            return body, headers
        name = f"{names.result_object_prefix(job_id)}{uuid.uuid4().hex}"
        await self.queue.put_result_object(pipeline_slug, name, body)
        headers[names.HDR_RESULT_OBJECT] = name
        reference = {"result_object": name, "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        return json.dumps(reference).encode(), headers

    async def in_progress(self, reply_subjects: list[str]) -> None:
        """+WPI: the caller still works on these tasks (their ack_wait starts again)."""
        self._connected()
        try:
            await asyncio.gather(*(self.queue.nc.publish(reply, b"+WPI") for reply in reply_subjects))
            await self.queue.confirm_sent(5)
        except NATS_FAILURES as exc:
            raise TransientError(f"task queue unavailable: {str(exc) or type(exc).__name__}") from exc

    def subscribed_jobs(self) -> list[int]:
        """The jobs the gateway holds a pull subscription for."""
        return sorted(self._subs)

    async def release(self, job_ids: Iterable[int]) -> int:
        """Drop the subscriptions of these jobs (they ended: their consumers are gone or going) and whatever
        deliveries they hold; how many it dropped."""
        dropped = 0
        for job_id in job_ids:
            if job_id not in self._subs:
                continue
            async with self._locks.setdefault(job_id, asyncio.Lock()):
                await self._forget(job_id)
            self._locks.pop(job_id, None)
            dropped += 1
        return dropped

    async def keep_tidy(self, ended_of: Callable[[list[int]], set[int]], *, every_s: float = TIDY_S) -> None:
        """Until `release_all`: every `every_s` seconds, drop the subscriptions of jobs that ended
        (`ended_of(job_ids)`, run in a thread, says which of them did)."""
        loop = asyncio.get_running_loop()
        while not self._closing.is_set():
            try:
                await asyncio.wait_for(self._closing.wait(), every_s)
                return
            except TimeoutError:
                pass
            held = self.subscribed_jobs()
            if not held:
                continue
            try:
                ended = await loop.run_in_executor(None, ended_of, held)
                if await self.release(sorted(ended)):
                    log.info("gateway: released the subscriptions of ended job(s) %s", sorted(ended)[:20])
            except Exception as exc:  # noqa: BLE001 - the database or NATS is down: look again later
                log.warning("gateway: could not release the subscriptions of ended jobs: %s", exc)

    async def release_all(self) -> int:
        """On shutdown: NAK what was delivered to the gateway and not handed out; drop the subscriptions."""
        self._closing.set()
        released = 0
        for job_id in list(self._subs):
            for msg in self._held.get(job_id, []) + take_waiting(self._subs[job_id]):
                try:
                    await msg.nak()
                    released += 1
                except NATS_FAILURES:
                    break
            await self._forget(job_id)
        return released
