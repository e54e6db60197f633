"""jetpipe on a 3-node JetStream cluster with R3 streams: a node lost mid-job, leader included, costs no
image. Three real nats-server processes on loopback ports with routes, each with its own store."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from models import Job, JobStatus
from pipeline import names
from pipeline.infra.runtime import Runtime, set_runtime
from pipeline.ops.devstack import NatsCluster
from pipeline.sdk import moth
from tests.conftest import POSTGRES, make_settings, wait_for

pytestmark = pytest.mark.slow
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def cluster(tmp_path):
    nodes = NatsCluster.create(tmp_path / "cluster").start()
    yield nodes
    nodes.stop()


@pytest.fixture
def on_cluster(cluster, db_url, stack, moth_pipeline):
    """Settings and a runtime on the cluster (R3 streams, short ack_wait), the session's Redis."""
    redis.Redis.from_url(stack.redis_url).flushall()
    settings = make_settings(db_url, type("Servers", (), {"redis_url": stack.redis_url, "nats_url": cluster.url}),
                             PIPELINE_NATS_REPLICAS=3, PIPELINE_NATS_TASK_TTR=5, PIPELINE_NATS_MAX_DELIVER=5)
    runtime = Runtime(settings, name="jetpipe-cluster-test")
    previous = set_runtime(runtime)
    yield settings, runtime
    set_runtime(previous)
    runtime.close()


def stream_leader(runtime, stream: str) -> str:
    js = runtime.tasks.queue.js  # (connected here: not from a coroutine on the runtime's own loop)

    async def info():
        return await js.stream_info(stream)

    return runtime.runner.run(info(), timeout=20).cluster.leader


def assert_exact(job_id: int, names_: list[str], truth: dict) -> None:
    """The job ended SUCCESS with every image processed once and the ground truth's detections."""
    done = wait_for(lambda: (j := Job.get_by_id(job_id)).status in JobStatus.TERMINAL and j, timeout_s=120,
                    message="the job to finish")
    stages = done.progress["stages"]
    assert done.status == JobStatus.SUCCESS
    assert (stages["process"]["processed"], stages["process"]["failed"]) == (len(names_), 0)
    assert stages["results"]["detections"] == sum(len(truth[n]) for n in names_)


def _answers(fn, *args):
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - (this test's own connection may still be moving to another node)
        return None


def slow_moth(task):
    time.sleep(0.03)
    return moth.process_task(task)


@SQLITE_ONLY
def test_streams_are_r3_and_a_job_survives_its_stream_leader_sigkilled_at_30_percent(
        cluster, on_cluster, trap_images, worker_factory, service_factory):
    settings, runtime = on_cluster
    worker_factory(settings)
    service_factory(settings, moth.SLUG, slow_moth, concurrency=2)
    directory, truth = trap_images
    from pipeline.core.jobs import create_job, start_job

    names_ = sorted(truth)[:50]
    job = create_job(moth.SLUG, [f"file://{directory}/{n}" for n in names_])
    start_job(runtime, job)
    wait_for(lambda: Job.get_by_id(job.id).progress["stages"]["process"].get("processed", 0) >= 15, timeout_s=60,
             message="30 % of the job")
    # every stream jetpipe made has three replicas
    js = runtime.tasks.queue.js

    async def replicas():
        return [(await js.stream_info(s)).config.num_replicas
                for s in (names.tasks_stream("moth-demo"), names.RESULTS_STREAM, names.ADVISORIES_STREAM)]

    assert runtime.runner.run(replicas(), timeout=20) == [3, 3, 3]
    leader = stream_leader(runtime, names.tasks_stream("moth-demo"))
    [node] = [n for n in cluster.nodes if n.name == f"nats-{leader}"]
    node.kill()  # SIGKILL
    killed_at = time.monotonic()
    assert_exact(job.id, names_, truth)
    recovery_s = time.monotonic() - killed_at
    new_leader = wait_for(lambda: _answers(stream_leader, runtime, names.tasks_stream("moth-demo")), timeout_s=60,
                          message="this test's own connection to find the cluster again")
    assert new_leader != leader
    print(f"kill of stream leader {leader} -> SUCCESS in {recovery_s:.1f} s (new leader {new_leader})")


@SQLITE_ONLY
def test_a_rolling_restart_of_every_node_during_a_job_costs_no_image(
        cluster, on_cluster, trap_images, worker_factory, service_factory):
    settings, runtime = on_cluster
    worker_factory(settings)
    slower = lambda task: (time.sleep(0.4), moth.process_task(task))[1]  # noqa: E731 - the job outlasts the restarts
    service_factory(settings, moth.SLUG, slower, concurrency=2)
    directory, truth = trap_images
    from pipeline.core.jobs import create_job, start_job

    names_ = sorted(truth)
    job = create_job(moth.SLUG, [f"file://{directory}/{n}" for n in names_])
    start_job(runtime, job)
    wait_for(lambda: Job.get_by_id(job.id).progress["stages"]["process"].get("processed", 0) >= 5, timeout_s=60,
             message="the job to be under way")
    started = time.monotonic()
    for node in cluster.nodes:  # one at a time, as an operator upgrading the cluster would
        assert Job.get_by_id(job.id).status == JobStatus.STARTED  # (the restarts happen while it runs)
        node.restart()
        cluster.wait_for_jetstream()
    assert_exact(job.id, names_, truth)
    print(f"rolling restart of 3 nodes, then SUCCESS {time.monotonic() - started:.1f} s after it began")


@SQLITE_ONLY
def test_existing_r1_streams_are_raised_to_r3_at_startup_and_kept_by_a_process_without_the_setting(
        cluster, on_cluster, stack):
    settings, runtime = on_cluster
    from pipeline.infra.taskqueue import TaskQueue
    # a CLI on a laptop: the same servers, PIPELINE_NATS_REPLICAS not set
    unset = make_settings(settings.database_url, type("Servers", (), {"redis_url": stack.redis_url,
                                                                      "nats_url": cluster.url}))
    assert unset.stream_options()["replicas"] is None

    async def replicas(queue) -> list[int]:
        return [(await queue.js.stream_info(s)).config.num_replicas
                for s in (names.tasks_stream("moth-demo"), names.RESULTS_STREAM, names.ADVISORIES_STREAM)]

    async def make_r1_then_r3_then_unset():
        queue = await TaskQueue.connect(cluster.url)
        try:
            await queue.ensure_streams(replicas=1)
            await queue.ensure_tasks_stream("moth-demo", replicas=1)  # as its first job's dispatch makes it
            before = await replicas(queue)
            await queue.ensure_streams(**settings.stream_options())
            raised = await replicas(queue)
            await queue.ensure_streams(**unset.stream_options())
            return before, raised, await replicas(queue)
        finally:
            await queue.close()

    assert asyncio.run(make_r1_then_r3_then_unset()) == ([1, 1, 1], [3, 3, 3], [3, 3, 3])


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.skipif(
    not POSTGRES, reason="PostgreSQL not reachable"))], indirect=True)
def test_workers_connected_to_different_nodes_on_postgresql_run_a_job_exactly(
        cluster, on_cluster, trap_images, worker_factory, service_factory):
    settings, runtime = on_cluster
    for node_url in cluster.urls:  # one worker process per node, each knowing only its own node
        worker_factory(settings, PIPELINE_NATS_URL=node_url, PIPELINE_METRICS_PORT=0)
    service_factory(settings.with_overrides(nats_url=cluster.urls[0]), moth.SLUG, slow_moth, concurrency=4)
    directory, truth = trap_images
    from pipeline.core.jobs import create_job, start_job

    names_ = sorted(truth)
    job = create_job(moth.SLUG, [f"file://{directory}/{n}" for n in names_])
    start_job(runtime, job)
    assert_exact(job.id, names_, truth)
