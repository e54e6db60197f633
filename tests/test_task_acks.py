"""ACKing the tasks whose results were taken (pipeline/core/inbox.py): `TaskQueue.ack_many` asks the server to
confirm only the last ACK to each consumer, relying on NATS keeping one connection's messages in order and on a
consumer processing its ACKs in order. When it returns, every ACK it sent has been processed, on one server and
on a 3-node cluster whatever node the client is connected to; ACKs to a consumer that is gone (its job ended) and
the same ACK named twice change nothing."""

from __future__ import annotations

import asyncio

import nats.js.api
import pytest

from pipeline.infra.taskqueue import TaskQueue
from pipeline.ops.devstack import NatsCluster

TASKS = 1_500  # per consumer


async def ack_everything_then_count_pending(url: str, stream: str, replicas: int) -> dict[str, int]:
    queue = await TaskQueue.connect(url, name="ack-test")
    try:
        js = queue.js
        await js.add_stream(name=stream, subjects=[f"{stream}.>"], retention="workqueue", num_replicas=replicas)
        replies = []
        # three consumers (three jobs), their ACKs interleaved in one call; the third's job ends first
        for consumer in ("a", "b", "gone"):
            for base in range(0, TASKS, 500):
                await asyncio.gather(*(js.publish(f"{stream}.{consumer}", b"task") for _ in range(base, base + 500)))
            sub = await js.pull_subscribe(f"{stream}.{consumer}", durable=consumer, stream=stream,
                                          config=nats.js.api.ConsumerConfig(max_ack_pending=10 * TASKS))
            got = []
            while len(got) < TASKS:
                got += await sub.fetch(TASKS - len(got), timeout=5)
            replies.append([m.reply for m in got])
        await js.delete_consumer(stream, "gone")  # its ACKs (its last one too) reach no consumer now
        acks = [r for triple in zip(*replies, strict=True) for r in triple]
        # (the same task named twice, as two results of one image in one batch would: ACKed once)
        await queue.ack_many(acks + acks[:10] + acks[-2:-1])
        # no wait: the confirmation of each consumer's last ACK came after every ACK before it was processed
        return {c: (await js.consumer_info(stream, c)).num_ack_pending for c in ("a", "b")}
    finally:
        await queue.close()


def test_when_ack_many_returns_every_ack_it_sent_was_processed(stack):
    assert asyncio.run(ack_everything_then_count_pending(stack.nats_url, "ACKS1", 1)) == {"a": 0, "b": 0}


@pytest.mark.slow
def test_when_ack_many_returns_every_ack_it_sent_was_processed_on_a_cluster(tmp_path):
    cluster = NatsCluster.create(tmp_path / "cluster").start()
    try:
        for n, url in enumerate(cluster.urls):  # the consumers' leader is one node: the others route the ACKs
            assert asyncio.run(ack_everything_then_count_pending(url, f"ACKS3_{n}", 3)) == {"a": 0, "b": 0}
    finally:
        cluster.stop()
