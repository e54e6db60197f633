"""A NATS connection whose link is cut and heals, through a TCP proxy that holds traffic as a cut link does
(nothing arrives until the heal, then everything at once): nats-py 2.16's flush-with-timeout bug, and
jetpipe's round trip and watch, which do not fall for it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time

import nats
import nats.errors
import pytest

from models import Job, JobStatus
from pipeline.core.jobs import create_job, start_job
from pipeline.infra.aio import LoopThread
from pipeline.infra.natswatch import ConnectionWatch, round_trip
from pipeline.infra.runtime import Runtime, set_runtime
from pipeline.infra.taskqueue import TaskQueue
from pipeline.schemas import decode_result
from pipeline.sdk import moth
from tests.conftest import make_settings, wait_for
from tests.helpers import answer_one_box


class HoldingProxy:
    """TCP proxy to `target_port`. `hold()` stops forwarding in both directions and keeps the bytes, and new
    connections wait, as behind a cut link; `release()` delivers what was held and carries on."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.open = asyncio.Event()
        self.open.set()
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> HoldingProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def hold(self) -> None:
        self.open.clear()

    def release(self) -> None:
        self.open.set()

    async def _serve(self, reader, writer) -> None:
        await self.open.wait()
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer),
                             return_exceptions=True)

    async def _pipe(self, reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                await self.open.wait()
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def stop(self) -> None:
        self.server.close()


@pytest.fixture
def proxied(stack):
    """(loop, proxy) with the proxy in front of the session's NATS."""
    loop = LoopThread(name="liveness-test")
    proxy = loop.run(HoldingProxy(stack.nats.port).start(), timeout=10)
    yield loop, proxy
    proxy.release()
    loop.run(proxy.stop(), timeout=10)
    loop.stop()


async def delivered(nc, subject: str) -> bool:
    """True if a message published on this connection comes back to its own subscription."""
    sub = await nc.subscribe(subject)
    try:
        await nc.publish(subject, b"ping")
        await sub.next_msg(timeout=2)
        return True
    except (nats.errors.TimeoutError, TimeoutError):
        return False
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def test_nats_py_loses_its_read_loop_when_a_timed_out_flush_is_answered_late(proxied):
    """The upstream bug jetpipe works around (nats-py 2.16.0): flush(timeout) cancels its PONG future on
    timeout; the late PONG is then set on the cancelled future, the read loop dies of InvalidStateError, and
    the client still says it is connected. If this test fails, nats-py fixed it: natswatch.py can say so."""
    loop, proxy = proxied

    async def scenario():
        nc = await nats.connect(f"nats://127.0.0.1:{proxy.port}", ping_interval=600, allow_reconnect=False)
        try:
            proxy.hold()
            with pytest.raises(nats.errors.TimeoutError):
                await nc.flush(timeout=0.5)
            proxy.release()
            await asyncio.sleep(0.5)
            return nc.is_connected, nc._reading_task.done(), await delivered(nc, "liveness.bug")
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 2)

    connected, read_loop_dead, works = loop.run(scenario(), timeout=30)
    assert (connected, read_loop_dead, works) == (True, True, False)


def test_the_round_trip_survives_a_late_answer_and_says_when_the_link_is_cut(proxied):
    loop, proxy = proxied

    async def scenario():
        nc = await nats.connect(f"nats://127.0.0.1:{proxy.port}", ping_interval=600)
        try:
            healthy = await round_trip(nc, 1)
            proxy.hold()
            cut = await round_trip(nc, 0.5)
            proxy.release()
            await asyncio.sleep(0.5)  # the late answer arrives and is dropped
            return healthy, cut, await round_trip(nc, 1), await delivered(nc, "liveness.round-trip")
        finally:
            await nc.close()

    healthy, cut, after, works = loop.run(scenario(), timeout=30)
    assert (healthy, cut, after, works) == (None, "no answer within 0.5 s", None, True)


def test_the_watch_replaces_a_connection_the_client_still_calls_connected(proxied):
    """A link cut for 4 s: the client itself would notice after 30 s and more (ping_interval × pings); the
    watch moves the connection within seconds of the heal, and a connection whose read loop a late PONG
    killed (the bug above) is replaced the same way."""
    loop, proxy = proxied

    async def scenario():
        queue = await TaskQueue.connect(f"nats://127.0.0.1:{proxy.port}", name="liveness", watch=False)
        watch = ConnectionWatch(queue.nc, name="liveness", every_s=0.5, timeout_s=0.5, strikes=2)
        watching = asyncio.ensure_future(watch.run())
        try:
            proxy.hold()
            with contextlib.suppress(nats.errors.TimeoutError):
                await queue.nc.flush(timeout=0.3)  # the bug's trigger, as a library user might pull it
            await asyncio.sleep(4)
            proxy.release()
            healed = asyncio.get_running_loop().time()
            while not await delivered(queue.nc, "liveness.watch"):
                assert asyncio.get_running_loop().time() - healed < 10, "not replaced within 10 s of the heal"
            return watch.moved, asyncio.get_running_loop().time() - healed
        finally:
            watch.stop()
            await watching
            await queue.close()

    moved, recovered_s = loop.run(scenario(), timeout=60)
    assert moved >= 1 and recovered_s < 10


def test_a_worker_that_starts_before_jetstream_is_ready_starts_its_bridge_once_it_is(
        make_stack, db_url, moth_pipeline, worker_factory, service_factory):
    """A worker started while its NATS answers but has no JetStream (a cluster still electing, a server
    started without it) used to lose its results bridge for good (the start raised once, nobody retried)."""
    dev = make_stack()
    settings = make_settings(db_url, dev)
    js_args = dev.nats.args
    plain = dataclasses.replace(dev.nats, args=[a for a in js_args if a != "-js"])
    dev.nats.stop()
    plain.start()  # NATS without JetStream on the same port
    worker_factory(settings, threads=2)
    time.sleep(4)  # the worker tries, and fails, to start its bridge
    plain.stop()
    dev.nats.start()  # JetStream is back
    runtime = Runtime(settings, name="jetpipe-liveness")
    previous = set_runtime(runtime)
    try:
        service_factory(settings, moth.SLUG, lambda task: decode_result(json.dumps(answer_one_box(
            {"image_id": task.image_id, "image_url": task.image_url, "pipeline": task.pipeline})).encode()))
        job = create_job(moth.SLUG, [f"file:///nowhere/{i}.png" for i in range(5)])
        start_job(runtime, job)
        done = wait_for(lambda: (j := Job.get_by_id(job.id)).status in JobStatus.TERMINAL and j, timeout_s=60,
                        message="the job to end through the late bridge")
        assert (done.status, done.progress["stages"]["process"]["processed"]) == (JobStatus.SUCCESS, 5)
        assert "the results bridge cannot start" in worker_factory.logs()
    finally:
        set_runtime(previous)
        runtime.close()
