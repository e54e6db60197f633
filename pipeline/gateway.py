"""The HTTP gateway's hold on NATS: tasks reserved for processing services that speak HTTP, and their
results published to the results stream as a NATS service would publish them.

It keeps one long-lived pull subscription per job (the reference system subscribed, fetched and
unsubscribed per request, and every delivery in flight to the dropped inbox cost one of the task's
`max_deliver` deliveries). Fetches of one job are serialised, and a request is never handed more than it
asked for. Deliveries that reach the subscription after their request gave up (a fetch then returns them
along with its own, more than it asked for) are held and handed to the next requests first; on shutdown
whatever the gateway holds and has not handed out is released at once (NAK), while what it handed out runs
on its normal `ack_wait`.

Everything here runs on the process's event loop thread (the runtime's), where its NATS connection lives.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

import nats.errors
import nats.js.errors

from pipeline import names
from pipeline.errors import TransientError
from pipeline.schemas import decode_task
from pipeline.taskqueue import NATS_FAILURES, TaskQueue, no_responders, take_waiting

log = logging.getLogger(__name__)

#: Seconds a reservation waits for tasks before it answers with what it has (possibly none).
FETCH_WAIT_S = 0.5
#: Seconds to wait for the results stream to confirm a batch of published results.
PUBLISH_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Reserved:
    image_id: str
    image_url: str
    reply_subject: str

    def as_task(self) -> dict:
        """The task as the reference system hands it out: `id` and `image_id` are both the image id."""
        return {"id": self.image_id, "image_id": self.image_id, "image_url": self.image_url,
                "reply_subject": self.reply_subject}


class Gateway:
    def __init__(self, queue: TaskQueue):
        self.queue = queue
        self._subs: dict[int, object] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._held: dict[int, list] = {}  # per job: delivered, not handed out yet (beyond a request's count)

    async def reserve(self, job_id: int, count: int) -> list[Reserved]:
        """Up to `count` of the job's tasks, each now leased to the caller for the consumer's ack_wait;
        [] when the job has no consumer (not dispatched yet, or ended)."""
        self._connected()
        lock = self._locks.setdefault(job_id, asyncio.Lock())
        async with lock:
            try:
                sub = self._subs.get(job_id) or await self._subscribe(job_id)
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
            reserved.append(Reserved(task.image_id, task.image_url, msg.reply))
        return reserved

    def _connected(self) -> None:
        """A fetch on a connection that is down only times out: say what it is instead."""
        if not self.queue.nc.is_connected:
            raise TransientError("task queue unavailable: not connected to NATS (reconnecting)")

    async def _subscribe(self, job_id: int):
        try:
            sub = await self.queue.js.pull_subscribe_bind(names.job_consumer(job_id), stream=names.TASKS_STREAM)
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

    async def publish_results(self, job_id: int, results: list[tuple[str, bytes]]) -> None:
        """Publish (reply subject, result body) pairs to `pipeline.results.<job_id>`, each confirmed by
        the results stream; TransientError if it cannot be reached or does not confirm them all."""
        subject = names.result_subject(job_id)
        try:
            answers = await self.queue.requests.send(
                [(subject, body, {names.HDR_TASK_REPLY: reply}) for reply, body in results], timeout=PUBLISH_TIMEOUT_S)
        except NATS_FAILURES as exc:
            raise TransientError(f"results stream unavailable: {str(exc) or type(exc).__name__}") from exc
        for answer in answers:
            if no_responders(answer):
                raise TransientError(f"results stream unavailable: no stream stores {subject}")
            ack = json.loads(answer.data or b"{}")
            if "error" in ack:
                raise TransientError(f"results stream refused a result: {ack['error'].get('description')}")

    async def in_progress(self, reply_subjects: list[str]) -> None:
        """+WPI: the caller still works on these tasks (their ack_wait starts again)."""
        self._connected()
        try:
            await asyncio.gather(*(self.queue.nc.publish(reply, b"+WPI") for reply in reply_subjects))
            await self.queue.nc.flush(timeout=5)
        except NATS_FAILURES as exc:
            raise TransientError(f"task queue unavailable: {str(exc) or type(exc).__name__}") from exc

    async def release_all(self) -> int:
        """On shutdown: NAK what was delivered to the gateway and not handed out; drop the subscriptions."""
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
