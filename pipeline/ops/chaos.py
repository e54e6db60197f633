"""Chaos tools for operators and tests: break things on purpose, on a stack you own.

`cli.py chaos ...` wraps these. Each one names what it destroys; docs/chaos-scenarios.md says what
jetpipe does about it and which automated test proves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from typing import Any

import nats.errors
import nats.js.errors
import redis

from pipeline import names
from pipeline.errors import UserInputError
from pipeline.infra.taskqueue import TaskQueue
from pipeline.ops.devstack import processes
from pipeline.schemas import Task


def flush_redis(url: str) -> None:
    """FLUSHALL: every job's state and every queued Dramatiq message are gone."""
    redis.Redis.from_url(url).flushall()


async def flush_nats(url: str, *, creds: str = "", tls_ca: str = "") -> list[str]:
    """Delete jetpipe's streams (every pipeline's tasks and result bucket, results, advisories and every consumer
    on them)."""
    queue = await TaskQueue.connect(url, name="jetpipe-chaos", creds=creds, tls_ca=tls_ca)
    deleted = []
    try:
        slugs = await queue.task_stream_pipelines()
        tasks = [names.tasks_stream(slug) for slug in slugs] + [f"OBJ_{names.result_objects_bucket(s)}" for s in slugs]
        for stream in (*tasks, names.RESULTS_STREAM, names.ADVISORIES_STREAM):
            try:
                await queue.js.delete_stream(stream)
                deleted.append(stream)
            except nats.js.errors.NotFoundError:
                pass
    finally:
        await queue.close()
    return deleted


class ChaosRefused(UserInputError):
    """The chaos tool would have to touch tasks it was not asked to break."""


async def _next_undelivered(queue: TaskQueue, stream: str, subject: str, after_seq: int, count: int) -> list[str]:
    """Image ids of the next `count` tasks on `subject` after stream sequence `after_seq`, in the order the
    consumer will deliver them, read without delivering anything."""
    images: list[str] = []
    seq = after_seq + 1
    while len(images) < count:
        try:
            msg = await queue.js.get_msg(stream, seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            break
        images.append((msg.headers or {}).get(names.HDR_IMAGE_ID, "?"))
        seq = (msg.seq or seq) + 1
    return images


async def _empty_pull(queue: TaskQueue, stream: str, job_id: int) -> None:
    """A pull request that can take no message (max_bytes 1) but makes the server look at the consumer's
    redeliveries: it notices the give-up and publishes the MAX_DELIVERIES advisories. (A plain pull would
    be handed the next task.)"""
    inbox = queue.nc.new_inbox()
    answered = asyncio.Event()

    async def answer(msg) -> None:
        answered.set()

    sub = await queue.nc.subscribe(inbox, cb=answer)
    try:
        await queue.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{names.job_consumer(job_id)}",
                               json.dumps({"batch": 1, "max_bytes": 1, "expires": 500_000_000}).encode(),
                               reply=inbox)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(answered.wait(), 1)
    finally:
        await sub.unsubscribe()


async def exhaust_max_deliver(url: str, job_id: int, image_ids: set[str], *, pipeline: str | None = None,
                              max_deliver: int = 2, ack_wait_s: float = 30.0, timeout_s: float = 600,
                              creds: str = "", tls_ca: str = "") -> dict[str, Any]:
    """Drive the tasks of `image_ids` through max_deliver without ACK; return the consumer's counters.

    Every other task of the job is left untouched: nothing is fetched but the targets. So the targets must
    be the next tasks the job's consumer would deliver, with nothing waiting for redelivery; otherwise this
    refuses (ChaosRefused) before fetching anything. A job that has no tasks yet gets one task per target
    published here (the body a dispatch would publish, with `chaos:` URLs). With `pipeline` given, the
    streams and the job consumer are created first if missing (`--ensure-stream`). A last, empty pull after
    the final ack_wait makes the server emit MAX_DELIVERIES (it decides on a pull).
    """
    queue = await TaskQueue.connect(url, name="jetpipe-chaos", creds=creds, tls_ca=tls_ca)
    try:
        if pipeline:
            await queue.ensure_streams()
            await queue.ensure_tasks_stream(pipeline)
            await queue.ensure_job_consumer(job_id, pipeline, max_deliver=max_deliver, ack_wait_s=ack_wait_s)
        else:
            found = [c for c in await queue.job_consumers() if c.job_id == job_id]
            if not found:
                raise ChaosRefused(f"job {job_id} has no consumer on any tasks stream (not dispatched, or ended)")
            pipeline = found[0].pipeline
        stream = names.tasks_stream(pipeline)
        info = await queue.js.consumer_info(stream, names.job_consumer(job_id))
        max_deliver, ack_wait_s = info.config.max_deliver, info.config.ack_wait
        subject = info.config.filter_subject
        published = []
        if info.num_pending == 0 and info.num_ack_pending == 0:
            tasks = [Task(job_id=job_id, image_id=i, image_url=f"chaos://image/{i}", pipeline=pipeline)
                     for i in sorted(image_ids)]
            await queue.publish_tasks(tasks)
            published = sorted(image_ids)
        elif info.num_ack_pending:
            raise ChaosRefused(f"job {job_id} has {info.num_ack_pending} task(s) delivered and not yet ACKed; "
                               "they would be redelivered to this tool first: try again when none are")
        else:
            upcoming = await _next_undelivered(queue, stream, subject, info.delivered.stream_seq, len(image_ids))
            if set(upcoming) != image_ids:
                raise ChaosRefused(f"the next {len(image_ids)} task(s) of job {job_id} are for images "
                                   f"{','.join(upcoming) or 'none'}, not {','.join(sorted(image_ids))}: "
                                   "exhausting the targets would deliver other tasks too")
        sub = await queue.js.pull_subscribe_bind(names.job_consumer(job_id), stream=stream)
        deliveries = dict.fromkeys(image_ids, 0)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            # One pull per round for exactly the targets still due: a pull is handed any task that is
            # available, so the next round waits until their ack_wait has run out and they are the ones
            # available again (JetStream redelivers before it delivers anything new).
            due = sum(1 for n in deliveries.values() if n < max_deliver)
            try:
                msgs = await sub.fetch(due, timeout=1)
            except (nats.errors.TimeoutError, TimeoutError):
                msgs = []
            for msg in msgs:
                deliveries[(msg.headers or {}).get(names.HDR_IMAGE_ID, "?")] = msg.metadata.num_delivered
            await asyncio.sleep(ack_wait_s + 0.5)
            if all(n >= max_deliver for n in deliveries.values()):
                await _empty_pull(queue, stream, job_id)
                break
        state = await queue.consumer_state(job_id, pipeline)
        return {"deliveries": deliveries, "published": published, "num_pending": state.num_pending,
                "num_ack_pending": state.num_ack_pending, "num_redelivered": state.num_redelivered}
    finally:
        await queue.close()


def worker_pids(master: int | None = None) -> list[int]:
    """Pids of Dramatiq worker processes of `dramatiq pipeline.actors` (children, not the master);
    only those of one master process if `master` is given."""
    procs = {pid: ppid for pid, ppid, cmd in processes()
             if b"pipeline.actors" in cmd and any(b"dramatiq" in part for part in cmd)}
    return sorted(pid for pid, ppid in procs.items() if ppid in procs and master in (None, ppid))


def kill_worker(master: int | None = None) -> int | None:
    """SIGKILL one Dramatiq worker process (of `master`, if given); returns its pid (None if none runs)."""
    pids = worker_pids(master)
    if not pids:
        return None
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]
