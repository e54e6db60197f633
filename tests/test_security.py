"""Credentials in URLs work against servers that require them, and no secret ever reaches a log line,
`health` output or an error message."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from models import Job, JobStatus
from pipeline import moth
from pipeline.devstack import Server, binary, free_port
from pipeline.runtime import Runtime, set_runtime
from pipeline.schemas import decode_result
from pipeline.settings import Settings
from tests.conftest import PROJECT, subprocess_env, wait_for
from tests.helpers import fake_job, success_body

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
    from pipeline.registry import register_pipeline
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
        assert unhealthy.returncode == 2
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
