"""Credentials in URLs work against servers that require them, and no secret ever reaches a log line,
`health` output or an error message."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from models import Job, JobStatus
from pipeline.infra.runtime import Runtime, set_runtime
from pipeline.ops.devstack import Server, binary, free_port
from pipeline.schemas import decode_result
from pipeline.sdk import moth
from pipeline.settings import Settings
from tests.conftest import PROJECT, subprocess_env, wait_for
from tests.helpers import fake_job, settings_on, shipped_nats_conf, success_body

NATS_SECRET, REDIS_SECRET, PG_SECRET = "s3cret-nats-pw", "s3cret-redis-pw", "s3cret-pg-pw"


@pytest.fixture
def secured(tmp_path):
    """nats-server with user/password and redis-server with requirepass."""
    nats_port, redis_port = free_port(), free_port()
    servers = [
        Server("nats", [binary("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(nats_port), "-sd",
                        str(tmp_path / "js"), "--user", "alice", "--pass", NATS_SECRET], nats_port,
               tmp_path / "nats.log").start(),
        Server("redis", [binary("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                         "--requirepass", REDIS_SECRET, "--dir", str(tmp_path)], redis_port,
               tmp_path / "redis.log").start(),
    ]
    yield f"nats://alice:{NATS_SECRET}@127.0.0.1:{nats_port}", f"redis://:{REDIS_SECRET}@127.0.0.1:{redis_port}/0"
    for server in servers:
        server.stop()


def no_secret(*texts: str) -> None:
    for text in texts:
        for secret in (NATS_SECRET, REDIS_SECRET, PG_SECRET, "WRONG-pw"):
            assert secret not in text


def cli(settings_env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", *args], cwd=PROJECT, env={**settings_env, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_authenticated_servers_run_a_job_and_nothing_logs_a_secret(secured, sqlite_url, worker_factory,
                                                                    service_factory):
    nats_url, redis_url = secured
    settings = Settings.from_env({"PIPELINE_DATABASE_URL": sqlite_url, "PIPELINE_NATS_URL": nats_url,
                                  "PIPELINE_REDIS_URL": redis_url, "PIPELINE_METRICS_PORT": "0"})
    from pipeline.core.registry import register_pipeline
    from pipeline.schemas import decode_pipeline_spec

    register_pipeline(decode_pipeline_spec(json.dumps(moth.PIPELINE_SPEC).encode(), source="test"))
    worker_factory(settings)
    service_factory(settings, moth.SLUG, lambda task: decode_result(success_body(task, boxes=1)))
    runtime = Runtime(settings)
    previous = set_runtime(runtime)
    try:
        job = fake_job(moth.SLUG, 5)
        from actors.run_job import execute

        execute(runtime, job.id)  # dispatch through the authenticated NATS, state in the authenticated Redis
        job = wait_for(lambda: (j := Job.get_by_id(job.id)).status in JobStatus.TERMINAL and j, timeout_s=60,
                       message="job to finish")
        assert job.status == JobStatus.SUCCESS
        env = subprocess_env(settings)
        healthy = cli(env, "health", "--json")
        assert healthy.returncode == 0, healthy.stdout
        report = json.loads(healthy.stdout)
        assert report["dependencies"]["nats"]["url"] == nats_url.replace(NATS_SECRET, "***")
        wrong = {**env, "PIPELINE_NATS_URL": nats_url.replace(NATS_SECRET, "WRONG-pw"),
                 "PIPELINE_REDIS_URL": redis_url.replace(REDIS_SECRET, "WRONG-pw")}
        unhealthy = cli(wrong, "health")
        assert unhealthy.returncode == 3
        no_secret(healthy.stdout, healthy.stderr, unhealthy.stdout, unhealthy.stderr, worker_factory.logs())
        assert "***" in worker_factory.logs()  # the worker did log its URLs, masked
    finally:
        set_runtime(previous)
        runtime.close()


def test_enqueueing_with_a_wrong_redis_password_fails_without_leaking_it(secured, db_url, moth_pipeline):
    nats_url, redis_url = secured
    proc = cli({"PIPELINE_DATABASE_URL": db_url, "PIPELINE_NATS_URL": nats_url, "PATH": "/usr/bin:/bin",
                "PIPELINE_REDIS_URL": redis_url.replace(REDIS_SECRET, "WRONG-pw")},
               "enqueue-job", "--pipeline", "moth-demo", "file:///a.png")
    assert proc.returncode == 3 and "could not queue the job" in proc.stderr
    no_secret(proc.stdout, proc.stderr)
    assert Job.select().count() == 0


def test_an_unreachable_database_url_error_hides_its_password():
    proc = cli({"PIPELINE_DATABASE_URL": f"postgresql://app:{PG_SECRET}@127.0.0.1:1/jobs?connect_timeout=2",
                "PATH": "/usr/bin:/bin"}, "status", "1")
    assert proc.returncode == 3 and proc.stderr.startswith("error: database unavailable")
    no_secret(proc.stdout, proc.stderr)


def test_missing_credential_files_are_a_clear_error(tmp_path):
    proc = cli({"PIPELINE_NATS_CREDS": str(tmp_path / "nope.creds"), "PATH": "/usr/bin:/bin"}, "jobs")
    assert proc.returncode == 1
    assert "PIPELINE_NATS_CREDS: no such file" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
def locked_down(tmp_path):
    """nats-server running deploy/nats.conf as shipped (ports and store moved to this test), passwords from
    its environment, and a Redis: (url of each NATS user, redis url)."""
    import os

    nats_port, http_port, redis_port = free_port(), free_port(), free_port()
    conf = shipped_nats_conf(tmp_path, "nats.conf", port=nats_port, http_port=http_port)
    passwords = {"worker": "w0rker-pw", "operator": "0perator-pw", "service": "serv1ce-pw"}
    env = {**os.environ, **{f"JETPIPE_NATS_{role.upper()}_PASSWORD": pw for role, pw in passwords.items()}}
    nats = Server("nats", [binary("nats-server"), "-c", str(conf)], nats_port, tmp_path / "nats.log")
    nats.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(nats.log_path, "ab") as log:
        nats.proc = subprocess.Popen(nats.args, stdout=log, stderr=subprocess.STDOUT, env=env)
    from pipeline.ops.devstack import wait_for_port

    wait_for_port(nats_port, proc=nats.proc)
    redis = Server("redis", [binary("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                             "--dir", str(tmp_path)], redis_port, tmp_path / "redis.log").start()
    urls = {role: f"nats://jetpipe-{role}:{pw}@127.0.0.1:{nats_port}" for role, pw in passwords.items()}
    yield urls, f"redis://127.0.0.1:{redis_port}/0"
    nats.stop()
    redis.stop()


@pytest.mark.slow
def test_the_shipped_nats_configuration_runs_a_job_and_services_cannot_do_harm(
        locked_down, sqlite_url, worker_factory, service_factory):
    import asyncio

    import nats as nats_py

    from pipeline import names

    urls, redis_url = locked_down

    def settings_as(role: str) -> Settings:
        return settings_on(sqlite_url, urls[role], redis_url)

    from pipeline.core.registry import register_pipeline
    from pipeline.schemas import decode_pipeline_spec

    register_pipeline(decode_pipeline_spec(json.dumps(moth.PIPELINE_SPEC).encode(), source="test"))
    # Given a worker, a processing service and an operator, each as its own NATS user
    worker_factory(settings_as("worker"))
    service_factory(settings_as("service"), moth.SLUG, lambda task: decode_result(success_body(task, boxes=1)))
    runtime = Runtime(settings_as("operator"))
    previous = set_runtime(runtime)
    try:
        # When a job runs, it ends SUCCESS
        from actors.run_job import execute

        job = fake_job(moth.SLUG, 5)
        execute(runtime, job.id)
        job = wait_for(lambda: (j := Job.get_by_id(job.id)).status in JobStatus.TERMINAL and j, timeout_s=60,
                       message="job to finish")
        assert job.status == JobStatus.SUCCESS

        # Then the service user can do no harm: forge an advisory, delete a stream, read results or jetpipe's
        # own replies
        async def as_service(traffic):
            seen, refused = [], []

            async def record(msg):
                seen.append(msg.subject)

            async def errors(exc):
                refused.append(str(exc))

            nc = await nats_py.connect(urls["service"], error_cb=errors, max_reconnect_attempts=1)
            for subject in ("pipeline.results.>", "_INBOX_jetpipe.>", "$JS.EVENT.>"):
                await nc.subscribe(subject, cb=record)
            await nc.publish(f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{names.tasks_stream('moth-demo')}.job-1",
                             json.dumps({"type": "io.nats.jetstream.advisory.v1.max_deliver",
                                         "stream": names.tasks_stream("moth-demo"), "consumer": "job-1",
                                         "stream_seq": 1}).encode())
            try:
                await nc.jetstream().delete_stream(names.tasks_stream("moth-demo"))
            except Exception:  # noqa: BLE001 - denied: a timeout or an error, either way nothing deleted
                pass
            await traffic()  # results and jetpipe replies go by while the service listens
            await nc.flush()
            await asyncio.sleep(0.5)
            await nc.close()
            assert any("permissions violation" in r.lower() for r in refused), refused
            return seen

        async def observe(during):
            from pipeline.infra.taskqueue import TaskQueue

            queue = await TaskQueue.connect(urls["operator"])  # as jetpipe's processes connect
            nc, js = queue.nc, queue.js
            before = (await js.stream_info(names.ADVISORIES_STREAM)).state.messages

            async def traffic():
                await js.publish(names.result_subject("moth-demo", 999), b"{}")
                await js.stream_info(names.RESULTS_STREAM)

            seen = await during(traffic)
            after = (await js.stream_info(names.ADVISORIES_STREAM)).state.messages
            tasks_stream = await js.stream_info(names.tasks_stream("moth-demo"))
            await js.purge_stream(names.RESULTS_STREAM)
            await nc.close()
            return before, after, tasks_stream, seen

        before, after, tasks_stream, seen = asyncio.run(observe(as_service))
        assert after == before  # the forged advisory was refused: nothing captured
        assert tasks_stream.config.name == names.tasks_stream("moth-demo")  # not deleted
        assert seen == []  # no results, no jetpipe replies, no advisories read
    finally:
        set_runtime(previous)
        runtime.close()


def test_urls_inside_text_are_masked_where_jetpipe_stores_or_logs_them(runtime, moth_pipeline, caplog):
    # Given a processing service that fails an image with an error naming its presigned URL
    from models import JobImage, JobLog
    from pipeline.settings import redact_text
    from tests.helpers import dispatch, error_body, fake_job, handle_result_message, pull_tasks

    url = "https://b.s3.amazonaws.com/a.jpg?X-Amz-Signature=abc123secret&X-Amz-Expires=60"
    assert redact_text(f"cannot read {url}: 403") == ("cannot read https://b.s3.amazonaws.com/a.jpg?"
                                                      "X-Amz-Signature=***&X-Amz-Expires=60: 403")
    job = fake_job(moth_pipeline, 1)
    dispatch(runtime, job.id)
    [(task, reply)] = pull_tasks(runtime, job.id, 1)
    with caplog.at_level("INFO"):
        handle_result_message(runtime, job.id, error_body(task.image_id, f"ImageUnreadable: cannot read {url}"), reply,
                              task.task_token)
    # Then the signature is in neither the image's reason, the job log nor a log line
    assert "abc123secret" not in JobImage.get(JobImage.image == int(task.image_id)).error
    assert "X-Amz-Signature=***" in JobImage.get(JobImage.image == int(task.image_id)).error
    assert all("abc123secret" not in r.message for r in JobLog.select())
    assert "abc123secret" not in caplog.text
