"""Chaos tools for operators and tests: break things on purpose, on a stack you own.

`cli.py chaos ...` wraps these. Each one names what it destroys; docs/chaos-scenarios.md says what
jetpipe does about it and which automated test proves it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import nats.errors
import nats.js.errors
import redis

from pipeline import names
from pipeline.taskqueue import TaskQueue


def flush_redis(url: str) -> None:
    """FLUSHALL: every job's state and every queued Dramatiq message are gone."""
    redis.Redis.from_url(url).flushall()


async def flush_nats(url: str, **security) -> list[str]:
    """Delete jetpipe's three streams (tasks, results, advisories and every consumer on them)."""
    queue = await TaskQueue.connect(url, name="jetpipe-chaos", **security)
    deleted = []
    try:
        for stream in (names.TASKS_STREAM, names.RESULTS_STREAM, names.ADVISORIES_STREAM):
            try:
                await queue.js.delete_stream(stream)
                deleted.append(stream)
            except nats.js.errors.NotFoundError:
                pass
    finally:
        await queue.close()
    return deleted


async def exhaust_max_deliver(url: str, job_id: int, image_ids: set[str], *, pipeline: str | None = None,
                              max_deliver: int = 2, ack_wait_s: float = 30.0, timeout_s: float = 600,
                              **security) -> dict:
    """Drive the tasks of `image_ids` through max_deliver without ACK; return the consumer's counters.

    Other tasks fetched on the way are NAKed at once (each NAK uses one of that task's deliveries). With
    `pipeline` given, the streams and the job consumer are created first if missing (`--ensure-stream`).
    A last pull after the final ack_wait makes the server emit MAX_DELIVERIES (it decides on a pull).
    """
    queue = await TaskQueue.connect(url, name="jetpipe-chaos", **security)
    try:
        if pipeline:
            await queue.ensure_streams()
            await queue.ensure_job_consumer(job_id, pipeline, max_deliver=max_deliver, ack_wait_s=ack_wait_s)
        info = await queue.js.consumer_info(names.TASKS_STREAM, names.job_consumer(job_id))
        max_deliver, ack_wait_s = info.config.max_deliver, info.config.ack_wait
        sub = await queue.js.pull_subscribe_bind(names.job_consumer(job_id), stream=names.TASKS_STREAM)
        deliveries = {i: 0 for i in image_ids}
        nakked = 0
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                msgs = await sub.fetch(100, timeout=1)
            except (nats.errors.TimeoutError, TimeoutError):
                msgs = []
            for msg in msgs:
                image = (msg.headers or {}).get(names.HDR_IMAGE_ID)
                if image in deliveries:
                    deliveries[image] = msg.metadata.num_delivered
                else:
                    await msg.nak()
                    nakked += 1
            if all(n >= max_deliver for n in deliveries.values()):
                await asyncio.sleep(ack_wait_s + 0.5)
                try:  # the pull that lets the server notice the give-up and send the advisories
                    await sub.fetch(1, timeout=1)
                except (nats.errors.TimeoutError, TimeoutError):
                    pass
                break
        state = await queue.consumer_state(job_id)
        return {"deliveries": deliveries, "non_target_naks": nakked, "num_pending": state.num_pending,
                "num_ack_pending": state.num_ack_pending, "num_redelivered": state.num_redelivered}
    finally:
        await queue.close()


def worker_pids(master: int | None = None) -> list[int]:
    """Pids of Dramatiq worker processes of `dramatiq pipeline.actors` (children, not the master);
    only those of one master process if `master` is given."""
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if b"pipeline.actors" in cmd and any(b"dramatiq" in part for part in cmd):
            procs[int(entry)] = ppid
    return sorted(pid for pid, ppid in procs.items() if ppid in procs and master in (None, ppid))


def kill_worker(master: int | None = None) -> int | None:
    """SIGKILL one Dramatiq worker process (of `master`, if given); returns its pid (None if none runs)."""
    pids = worker_pids(master)
    if not pids:
        return None
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]
