"""NATS loses its store, or someone deletes jetpipe's stream or consumer by hand, mid-job: every JetStream
object is re-created by whichever process notices first, without a restart; the job in flight and the
jobs after it end SUCCESS with exact counts; `health` tells the truth meanwhile."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys

import nats
import nats.js.errors
import pytest

from pipeline import names
from pipeline.infra.runtime import Runtime, set_runtime
from tests.conftest import PROJECT, kill_group, make_settings, subprocess_env, wait_for
from tests.test_results_in_hand import assert_exact, finished, processed

pytestmark = pytest.mark.slow


#: The machine's own nats-server, where it is installed and older than the virtualenv's (Debian's 2.9
#: answers a pull from a lost consumer with silence, where 2.15 answers 503).
SYSTEM_NATS = next((p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if shutil.os.path.exists(p)), None)
SERVERS = ["venv", pytest.param("system", marks=pytest.mark.skipif(SYSTEM_NATS is None,
                                                                     reason="no system nats-server here"))]


@pytest.fixture
def private(make_stack, db_url, moth_pipeline, services, request):
    """(settings, stack, runtime) on a NATS and Redis of their own: tasks redelivered after 2 s with room
    for redeliveries, and a health check every 2 s (it re-dispatches the tasks NATS lost)."""
    dev = make_stack(SYSTEM_NATS if getattr(request, "param", "venv") == "system" else None)
    settings = make_settings(db_url, dev, PIPELINE_NATS_TASK_TTR=2, PIPELINE_NATS_MAX_DELIVER=5,
                             PIPELINE_HEALTH_CHECK_SECONDS=2)
    rt = Runtime(settings, name="jetpipe-store-loss-test")
    previous = set_runtime(rt)
    services(settings)
    yield settings, dev, rt
    set_runtime(previous)
    rt.close()


def enqueue(settings, images: int, *, name: str, tmp_path) -> int:
    """Enqueue a job through the CLI, as an operator would (its broker is the stack's own Redis)."""
    import json

    listing = tmp_path / f"{name}.txt"
    listing.write_text("".join(f"https://example.invalid/{name}/img-{i}.jpg\n" for i in range(images)))
    proc = subprocess.run([sys.executable, "cli.py", "enqueue-job", "--pipeline", "moth-demo", "--name", name,
                           "--images-file", str(listing), "--json"], cwd=PROJECT, env=subprocess_env(settings),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["id"]


def on_nats(settings, action):
    async def run():
        nc = await nats.connect(settings.nats_url)
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(run())


@pytest.mark.parametrize("private", SERVERS, indirect=True)
def test_nats_killed_with_its_store_wiped_mid_job(private, worker_factory, tmp_path):
    # Given a job under way, results being taken and saved
    settings, dev, rt = private
    worker_factory(settings, threads=4, PIPELINE_DELAY_AT="after_validation=0.005")
    job_id = enqueue(settings, 1000, name="wiped", tmp_path=tmp_path)
    wait_for(lambda: processed(job_id) >= 300, timeout_s=60, message="30 % saved")
    # When nats-server is SIGKILLed, its store deleted, and it is started again on the same port
    dev.nats.kill()
    shutil.rmtree(dev.root / "jetstream")
    dev.nats.start()
    # Then the job in flight ends SUCCESS and exact (the tasks NATS lost are dispatched again)
    assert_exact(finished(job_id, timeout_s=120), 1000)
    # And so does a job enqueued afterwards: the results stream, its consumer and the advisories' were
    # re-created by the worker that noticed them gone
    later = enqueue(settings, 300, name="after", tmp_path=tmp_path)
    assert_exact(finished(later, timeout_s=60), 300)
    logs = worker_factory.logs()
    assert "re-creating it" in logs
    assert "within 60" not in logs  # no request waited a minute on a dead subscription


@pytest.mark.parametrize("what", ["results stream", "bridge consumer"])
def test_results_stream_or_bridge_consumer_deleted_by_hand_mid_job(private, worker_factory, what, tmp_path):
    # Given a job under way
    settings, dev, rt = private
    worker_factory(settings, threads=4, PIPELINE_DELAY_AT="after_validation=0.005")
    job_id = enqueue(settings, 800, name=what.replace(" ", "-"), tmp_path=tmp_path)
    wait_for(lambda: processed(job_id) >= 200, timeout_s=60, message="25 % saved")

    # When the results stream (with the results in it) or the bridge's consumer is deleted
    async def delete(js):
        if what == "results stream":
            await js.delete_stream(names.RESULTS_STREAM)
        else:
            await js.delete_consumer(names.RESULTS_STREAM, names.RESULTS_BRIDGE_CONSUMER)

    on_nats(settings, delete)
    # Then the worker re-creates it, and the job ends SUCCESS and exact (results deleted with the stream
    # are produced again: their tasks were never ACKed, so they are redelivered)
    assert_exact(finished(job_id, timeout_s=120), 800)
    later = enqueue(settings, 100, name="later", tmp_path=tmp_path)
    assert_exact(finished(later, timeout_s=60), 100)


def test_health_reports_a_results_stream_nobody_reads(private, worker_factory):
    # Given a worker that created the bridge's consumer, then stopped
    settings, dev, rt = private
    worker = worker_factory(settings, threads=2)

    async def bridge_consumer(js):
        try:
            return await js.consumer_info(names.RESULTS_STREAM, names.RESULTS_BRIDGE_CONSUMER)
        except nats.js.errors.NotFoundError:
            return None

    wait_for(lambda: on_nats(settings, bridge_consumer), timeout_s=30, message="the bridge consumer")
    kill_group(worker)

    # When its consumer is deleted while results wait in the stream
    async def delete_and_publish(js):
        await js.delete_consumer(names.RESULTS_STREAM, names.RESULTS_BRIDGE_CONSUMER)
        await js.publish(names.result_subject("moth-demo", 1), b'{"error": "x", "image_id": "1"}')

    on_nats(settings, delete_and_publish)
    health = subprocess.run([sys.executable, "cli.py", "health"], cwd=PROJECT, env=subprocess_env(settings),
                            capture_output=True, text=True, timeout=60)
    # Then health exits 1 and says why
    assert health.returncode == 1, health.stdout + health.stderr
    text = " ".join(health.stdout.split())
    assert "PIPELINE_RESULTS has 1 unprocessed message(s) and no consumer results-bridge" in text
    # And when a worker starts again, it re-creates the consumer and takes the message
    worker_factory(settings, threads=2)
    wait_for(lambda: subprocess.run([sys.executable, "cli.py", "health"], cwd=PROJECT, env=subprocess_env(settings),
                                    capture_output=True, text=True, timeout=60).returncode == 0, timeout_s=60,
             interval_s=1, message="health to be healthy again")
