"""docker-compose.yml is checked against the code, and its services are brought up from the same
commands outside Docker (the venv's nats-server and redis-server, the local PostgreSQL) to run a job."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from pipeline import moth
from pipeline.devstack import Server, binary, free_port, wait_for_port
from pipeline.settings import OPTIONS
from tests.conftest import POSTGRES, PROJECT, kill_group, wait_for

COMPOSE = yaml.safe_load((PROJECT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def expand(value: str) -> str:
    """A compose value with its `${VAR:-default}` references replaced by their defaults."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def test_compose_declares_the_whole_stack():
    assert {"nats", "redis", "postgres", "init", "worker", "service"} <= set(SERVICES)
    assert SERVICES["worker"]["command"][:2] == ["dramatiq", "pipeline.actors"]
    assert SERVICES["worker"]["restart"] == "unless-stopped"  # the dramatiq master exits when a child dies
    assert SERVICES["service"]["command"][:3] == ["python", "cli.py", "process"]
    assert "--appendonly" in SERVICES["redis"]["command"]
    assert re.match(r"nats:2\.(1\d|[2-9]\d)", SERVICES["nats"]["image"])  # >= 2.10
    for name in ("nats", "redis", "postgres"):
        assert "healthcheck" in SERVICES[name]
    # NATS: a user per role, and nothing published beyond this machine
    assert all(port.startswith("127.0.0.1:") for port in SERVICES["nats"]["ports"])
    users = {name: expand(SERVICES[name]["environment"]["PIPELINE_NATS_URL"]).split("//")[1].split(":")[0]
             for name in ("worker", "service", "cli", "init")}
    assert users == {"worker": "jetpipe-worker", "service": "jetpipe-service", "cli": "jetpipe-operator",
                     "init": "jetpipe-operator"}


def test_compose_environment_names_are_real_settings():
    known = {o.env for o in OPTIONS.values()}
    for name in ("init", "worker", "service", "cli"):
        env = SERVICES[name]["environment"]
        assert set(env) <= known, set(env) - known
        assert {"PIPELINE_DATABASE_URL", "PIPELINE_REDIS_URL", "PIPELINE_NATS_URL"} <= set(env)
    defaults = {o.env: o.default for o in OPTIONS.values()}
    for key, value in SERVICES["worker"]["environment"].items():
        if key == "PIPELINE_METRICS_HOST":
            assert value == "0.0.0.0"  # a container's port is reached from outside it
        elif not key.endswith("_URL"):
            assert float(value) == float(defaults[key]), key  # documented defaults, spelled out


def test_docker_compose_accepts_the_file():
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed here")
    proc = subprocess.run([docker, "compose", "-f", str(PROJECT / "docker-compose.yml"), "config", "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not POSTGRES, reason="PostgreSQL not reachable")
def test_the_compose_commands_run_a_job_outside_docker(tmp_path, pg_database, trap_images):
    # Given the compose services started from their own commands, with local ports and paths
    nats_port, http_port = free_port(), free_port()
    conf = (PROJECT / "deploy" / "nats.conf").read_text()
    conf = conf.replace("0.0.0.0:4222", f"127.0.0.1:{nats_port}").replace("0.0.0.0:8222", f"127.0.0.1:{http_port}")
    conf = conf.replace("/data/jetstream", str(tmp_path / "jetstream"))
    (tmp_path / "nats.conf").write_text(conf)
    nats_cmd = [binary("nats-server"), *SERVICES["nats"]["command"]]
    nats_cmd[nats_cmd.index("/etc/nats/nats.conf")] = str(tmp_path / "nats.conf")
    redis_port = free_port()
    redis_cmd = [binary("redis-server"), *SERVICES["redis"]["command"][1:], "--port", str(redis_port),
                 "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    nats_env = {**os.environ, **{k: expand(v) for k, v in SERVICES["nats"]["environment"].items()}}
    nats = Server("nats", nats_cmd, nats_port, tmp_path / "nats.log")
    with open(nats.log_path, "ab") as log:
        nats.proc = subprocess.Popen(nats_cmd, stdout=log, stderr=subprocess.STDOUT, env=nats_env)
    wait_for_port(nats_port, proc=nats.proc)
    servers = [nats, Server("redis", redis_cmd, redis_port, tmp_path / "redis.log").start()]
    metrics_port = free_port()

    def env_of(service: str) -> dict:
        """The compose service's environment, pointed at this test's servers (its NATS user kept)."""
        env = {k: expand(v) for k, v in SERVICES[service]["environment"].items()}
        return {**env, "PIPELINE_METRICS_PORT": str(metrics_port), "PIPELINE_DATABASE_URL": pg_database,
                "PIPELINE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                "PIPELINE_NATS_URL": env["PIPELINE_NATS_URL"].replace("@nats:4222", f"@127.0.0.1:{nats_port}"),
                "PATH": f"{sys.prefix}/bin:/usr/bin:/bin"}

    env = env_of("cli")
    procs = []
    try:
        # the server honours the config file: JetStream syncs every write
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/varz", timeout=5) as response:
            varz = json.loads(response.read())
        assert varz["jetstream"]["config"]["sync_always"] is True
        init = subprocess.run(SERVICES["init"]["command"], cwd=PROJECT, env=env_of("init"), capture_output=True,
                              text=True, timeout=120)
        assert init.returncode == 0, init.stderr
        for name in ("worker", "service"):  # each as its own NATS user
            log = open(tmp_path / f"{name}.log", "ab")
            procs.append(subprocess.Popen(
                [c.replace("python", sys.executable, 1) if c == "python" else c for c in SERVICES[name]["command"]],
                cwd=PROJECT, env=env_of(name), stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        # When a job is enqueued through the CLI
        directory, truth = trap_images
        urls = [f"file://{directory}/{n}" for n in sorted(truth)[:20]]
        enqueue = subprocess.run([sys.executable, "cli.py", "enqueue-job", "--pipeline", moth.SLUG, "--json", *urls],
                                 cwd=PROJECT, env=env, capture_output=True, text=True, timeout=60)
        assert enqueue.returncode == 0, enqueue.stderr
        job_id = json.loads(enqueue.stdout)["id"]

        # Then it ends SUCCESS with the ground truth's detections
        def status():
            out = subprocess.run([sys.executable, "cli.py", "status", str(job_id), "--json"], cwd=PROJECT, env=env,
                                 capture_output=True, text=True, timeout=60)
            data = json.loads(out.stdout)
            return data if data["status"] in ("SUCCESS", "FAILURE", "REVOKED") else None

        final = wait_for(status, timeout_s=90, interval_s=0.5, message="the job to finish")
        expected = sum(len(truth[u.rsplit("/", 1)[1]]) for u in urls)
        assert (final["status"], final["detections"], final["processed"]) == ("SUCCESS", expected, 20)
        # and the workers' metrics endpoint shows the job's images
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            exposition = response.read().decode()
        assert 'jetpipe_images_total{outcome="processed",pipeline="moth-demo"} 20.0' in exposition
        assert "jetpipe_result_handling_seconds_count" in exposition
        assert 'dramatiq_messages_total{actor_name="process_pipeline_result",queue_name="results"}' in exposition
        # and the same port answers the orchestrator's probes
        for probe, expected_body in (("healthz", {"status": "alive"}),
                                     ("readyz", {"ready": True, "database": "ok", "redis": "ok", "nats": "ok"})):
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/{probe}", timeout=10) as response:
                assert (response.status, json.loads(response.read())) == (200, expected_body)
    finally:
        for proc in procs:
            kill_group(proc)
        for server in servers:
            server.stop()
        time.sleep(0.1)
