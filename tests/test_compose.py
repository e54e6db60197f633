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

from pipeline.ops.devstack import Server, binary, free_port
from pipeline.sdk import moth
from pipeline.settings import OPTIONS
from tests.conftest import POSTGRES, PROJECT, kill_group, wait_for
from tests.helpers import shipped_nats_conf

COMPOSE = yaml.safe_load((PROJECT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def expand(value: str) -> str:
    """A compose value with its `${VAR:?why}` references (secrets compose refuses to start without) replaced
    by this test's values, and its `${VAR:-default}` references by their defaults."""
    value = re.sub(r"\$\{([A-Z_]+):\?[^}]*\}", lambda m: SECRET_VALUES[m.group(1)], str(value))
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


#: What `make secrets` would put in .env, for this test.
SECRET_VALUES = {name: f"test-{name.lower().replace('_', '-')}" for name in (
    "JETPIPE_NATS_WORKER_PASSWORD", "JETPIPE_NATS_OPERATOR_PASSWORD", "JETPIPE_NATS_SERVICE_PASSWORD",
    "JETPIPE_NATS_ROUTE_PASSWORD", "JETPIPE_REDIS_PASSWORD", "JETPIPE_POSTGRES_PASSWORD", "JETPIPE_GRAFANA_PASSWORD")}


def enabled(profile: str) -> set[str]:
    """The services `docker compose --profile <profile> up` starts: those without a profile, and its own."""
    return {name for name, service in SERVICES.items() if profile in service.get("profiles", [profile])}


def nats_users(service: str) -> list[tuple[str, str]]:
    """(user, host) of every server in the service's PIPELINE_NATS_URL."""
    url = expand(SERVICES[service]["environment"]["PIPELINE_NATS_URL"])
    return [(part.split("//")[1].split(":")[0], part.split("@")[1].split(":")[0]) for part in url.split(",")]


CLUSTER_NODES = ["nats-1", "nats-2", "nats-3"]


def test_compose_declares_the_whole_stack_in_two_topologies():
    # plain `docker compose up` is the single-node stack (.env picks its profile); --profile cluster the other
    assert "COMPOSE_PROFILES=single" in (PROJECT / ".env").read_text().splitlines()
    assert enabled("single") == {"nats", "redis", "postgres", "init", "worker", "service"}
    assert enabled("cluster") == {*CLUSTER_NODES, "redis", "postgres", "init", "cluster-worker", "cluster-service"}
    assert SERVICES["cli"]["profiles"] == ["tools"]
    for worker in ("worker", "cluster-worker"):
        assert SERVICES[worker]["command"][:2] == ["dramatiq", "pipeline.actors"]
        assert SERVICES[worker]["restart"] == "unless-stopped"  # the dramatiq master exits when a child dies
    for service in ("service", "cluster-service"):
        assert SERVICES[service]["command"][:3] == ["python", "cli.py", "process"]
    assert "--appendonly" in SERVICES["redis"]["command"]
    for name in ("nats", *CLUSTER_NODES, "redis", "postgres"):
        assert "healthcheck" in SERVICES[name]
    for name in ("nats", *CLUSTER_NODES):
        assert re.match(r"nats:2\.(1\d|[2-9]\d)", SERVICES[name]["image"])  # >= 2.10
        # nothing published beyond this machine, and the monitoring port (connections, subjects) not at all
        assert all(port.startswith("127.0.0.1:") and port.endswith(":4222") for port in SERVICES[name]["ports"])
    # NATS: a user per role, on every server of the service's topology
    assert {name: set(nats_users(name)) for name in ("worker", "service", "cli", "init")} == {
        "worker": {("jetpipe-worker", "nats")}, "service": {("jetpipe-service", "nats")},
        "cli": {("jetpipe-operator", "nats")}, "init": {("jetpipe-operator", "nats")}}
    assert nats_users("cluster-worker") == [("jetpipe-worker", node) for node in CLUSTER_NODES]
    assert nats_users("cluster-service") == [("jetpipe-service", node) for node in CLUSTER_NODES]


def test_the_cluster_profile_is_three_routed_nodes_with_r3_streams_and_two_workers():
    host_ports, volumes = set(), set()
    for node in CLUSTER_NODES:
        spec = SERVICES[node]
        command = [expand(part) for part in spec["command"]]
        assert command[command.index("--server_name") + 1] == node
        assert command[command.index("-c") + 1] == "/etc/nats/nats-cluster.conf"
        routes = command[command.index("--routes") + 1].split(",")
        assert [route.rsplit("@", 1)[1] for route in routes] == [f"{n}:6222" for n in CLUSTER_NODES]
        assert all(route.startswith("nats-route://jetpipe-route:test-jetpipe-nats-route-password@")
                   for route in routes)
        assert spec["networks"]["default"]["aliases"] == ["nats"]  # so the cli service finds the cluster
        host_ports |= {port.rsplit(":", 1)[0] for port in spec["ports"]}
        volumes |= {v for v in spec["volumes"] if v.endswith(":/data")}
        assert "JETPIPE_NATS_ROUTE_PASSWORD" in spec["environment"]
    assert len(host_ports) == 3 and len(volumes) == 3  # each node its own client port and its own store
    worker = SERVICES["cluster-worker"]
    assert worker["deploy"]["replicas"] == 2
    assert worker["environment"]["PIPELINE_NATS_REPLICAS"] == "3"
    assert set(CLUSTER_NODES) <= set(worker["depends_on"])
    conf = (PROJECT / "deploy" / "nats-cluster.conf").read_text()
    assert "no_advertise: true" in conf and "$JETPIPE_NATS_ROUTE_PASSWORD" in conf
    for shipped in ("nats.conf", "nats-cluster.conf"):  # monitoring answers the node's own host only
        assert "http: 127.0.0.1:8222" in (PROJECT / "deploy" / shipped).read_text()
    assert "include ./nats-users.conf" in conf and "include ./nats-users.conf" in (
        PROJECT / "deploy" / "nats.conf").read_text()


def test_the_monitoring_profile_adds_prometheus_and_grafana_to_either_stack():
    assert enabled("monitoring") - enabled("single") == {"prometheus", "grafana"}
    for service in ("prometheus", "grafana"):
        assert all(port.startswith("127.0.0.1:") for port in SERVICES[service]["ports"])
        for volume in SERVICES[service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (PROJECT / source).exists(), f"{service} mounts {source}, which is not in the repository"
    # Prometheus scrapes both stacks' workers on their metrics port, under the job name the alert rules name
    scrape = yaml.safe_load((PROJECT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    [job] = scrape["scrape_configs"]
    assert job["job_name"] == "jetpipe-workers" and 'up{job="jetpipe-workers"}' in \
        (PROJECT / "deploy" / "prometheus" / "jetpipe-alerts.yml").read_text()
    [sd] = job["dns_sd_configs"]
    assert set(sd["names"]) == {"worker", "cluster-worker"}
    assert sd["port"] == int(SERVICES["worker"]["environment"]["PIPELINE_METRICS_PORT"])
    assert scrape["rule_files"] == ["/etc/prometheus/jetpipe-alerts.yml"]
    # Grafana: no default password, the dashboard provisioned from the repository
    assert "JETPIPE_GRAFANA_PASSWORD:?" in SERVICES["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    provider = yaml.safe_load((PROJECT / "deploy/grafana/provisioning/dashboards/jetpipe.yml").read_text())
    assert any(v.endswith(provider["providers"][0]["options"]["path"] + "/jetpipe-dashboard.json:ro")
               for v in SERVICES["grafana"]["volumes"])


def test_compose_environment_names_are_real_settings():
    known = {o.env for o in OPTIONS.values()}
    for name in ("init", "worker", "cli", "cluster-worker"):
        env = SERVICES[name]["environment"]
        assert set(env) <= known, set(env) - known
        assert {"PIPELINE_DATABASE_URL", "PIPELINE_REDIS_URL", "PIPELINE_NATS_URL"} <= set(env)
    for name in ("service", "cluster-service"):  # a processing service gets NATS and nothing else
        assert set(SERVICES[name]["environment"]) == {"PIPELINE_NATS_URL"}
    defaults = {o.env: o.default for o in OPTIONS.values()}
    for worker in ("worker", "cluster-worker"):
        for key, value in SERVICES[worker]["environment"].items():
            if key == "PIPELINE_METRICS_HOST":
                assert value == "0.0.0.0"  # a container's port is reached from outside it
            elif key == "PIPELINE_NATS_REPLICAS":
                assert (worker, value) == ("cluster-worker", "3")
            elif not key.endswith("_URL"):
                assert float(value) == float(defaults[key]), key  # documented defaults, spelled out


def test_docker_compose_accepts_the_file():
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed here")
    for args, profile in (([], "single"), (["--profile", "cluster"], "cluster")):
        proc = subprocess.run([docker, "compose", *args, "config", "--services"], cwd=PROJECT,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert set(proc.stdout.split()) == enabled(profile)


def start_nats(topology: str, tmp_path) -> tuple[list[Server], dict[str, int], int]:
    """The topology's NATS servers, from their compose commands and shipped configs on loopback ports:
    (servers, client port per compose host name, monitoring port of the first)."""
    nodes = ["nats"] if topology == "single" else CLUSTER_NODES
    ports = {node: (free_port(), free_port(), free_port()) for node in nodes}  # client, monitoring, route
    env = {**os.environ, **{k: expand(v) for k, v in SERVICES[nodes[0]]["environment"].items()}}
    servers = []
    for node, (port, http_port, route_port) in ports.items():
        command = [binary("nats-server"), *(expand(part) for part in SERVICES[node]["command"])]
        shipped = command[command.index("-c") + 1]
        command[command.index(shipped)] = str(shipped_nats_conf(
            tmp_path / node, shipped.rsplit("/", 1)[1], port=port, http_port=http_port, route_port=route_port))
        if "--routes" in command:
            at = command.index("--routes") + 1
            for other, (_, _, other_route) in ports.items():
                command[at] = command[at].replace(f"@{other}:6222", f"@127.0.0.1:{other_route}")
        servers.append(Server(node, command, port, tmp_path / node / "nats.log", env=env).start())
    client_ports = {node: port for node, (port, _, _) in ports.items()}
    client_ports.setdefault("nats", client_ports[nodes[0]])  # the cluster nodes' shared alias
    return servers, client_ports, ports[nodes[0]][1]


def jetstream_ready(http_port: int) -> dict | None:
    """The monitoring endpoint's /jsz with stream configs, once JetStream has a meta leader."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/jsz?streams=true&config=true", timeout=5) as r:
            jsz = json.loads(r.read())
    except OSError:
        return None
    return jsz if jsz.get("meta_cluster", {}).get("leader") or "meta_cluster" not in jsz else None


@pytest.mark.slow
@pytest.mark.skipif(not POSTGRES, reason="PostgreSQL not reachable")
@pytest.mark.parametrize("topology", ["single", "cluster"])
def test_the_compose_commands_run_a_job_outside_docker(topology, tmp_path, pg_database, trap_images):
    # Given the topology's compose services started from their own commands, with local ports and paths
    worker_name, service_name = ("worker", "service") if topology == "single" else (
        "cluster-worker", "cluster-service")
    servers, nats_ports, nats_http_port = start_nats(topology, tmp_path)
    redis_port = free_port()
    redis_cmd = [binary("redis-server"), *(expand(part) for part in SERVICES["redis"]["command"][1:]), "--port",
                 str(redis_port),
                 "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    servers.append(Server("redis", redis_cmd, redis_port, tmp_path / "redis.log").start())
    workers = SERVICES[worker_name].get("deploy", {}).get("replicas", 1)
    metrics_ports = [free_port() for _ in range(workers)]

    def env_of(service: str, metrics_port: int = 0) -> dict:
        """The compose service's environment, pointed at this test's servers (its NATS user kept)."""
        env = {k: expand(v) for k, v in SERVICES[service]["environment"].items()}
        nats_url = env["PIPELINE_NATS_URL"]
        for host, port in nats_ports.items():
            nats_url = nats_url.replace(f"@{host}:4222", f"@127.0.0.1:{port}")
        local = {"PIPELINE_DATABASE_URL": pg_database,  # (the local PostgreSQL has no password: trust)
                 "PIPELINE_REDIS_URL": env.get("PIPELINE_REDIS_URL", "").replace("@redis:", "@127.0.0.1:").replace(
                     ":6379/", f":{redis_port}/")}
        return {**env, **{k: v for k, v in local.items() if k in env}, "PIPELINE_METRICS_PORT": str(metrics_port),
                "PIPELINE_NATS_URL": nats_url, "PATH": f"{sys.prefix}/bin:/usr/bin:/bin"}

    def start(service: str, env: dict, n: int) -> subprocess.Popen:
        log = open(tmp_path / f"{service}-{n}.log", "ab")
        return subprocess.Popen(
            [c.replace("python", sys.executable, 1) if c == "python" else c for c in SERVICES[service]["command"]],
            cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    env = env_of("cli")
    procs = []
    try:
        # the servers honour the config file: JetStream syncs every write (and the cluster elected a leader)
        jsz = wait_for(lambda: jetstream_ready(nats_http_port), timeout_s=30, message="JetStream to be ready")
        assert jsz["config"]["sync_always"] is True
        init = subprocess.run(SERVICES["init"]["command"], cwd=PROJECT, env=env_of("init"), capture_output=True,
                              text=True, timeout=120)
        assert init.returncode == 0, init.stderr
        # each as its own NATS user; the workers as many as the compose file runs
        procs += [start(worker_name, env_of(worker_name, port), n) for n, port in enumerate(metrics_ports)]
        procs.append(start(service_name, env_of(service_name), 0))
        # When a job is enqueued through the CLI
        directory, truth = trap_images
        urls = [f"file://{directory}/{n}" for n in sorted(truth)[:20]]
        # (--no-reuse: both topologies run on one database, and the second would reuse the first one's results)
        enqueue = subprocess.run([sys.executable, "cli.py", "enqueue-job", "--pipeline", moth.SLUG, "--json",
                                  "--no-reuse", *urls],
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
        # and every stream has the topology's replicas
        streams = {s["name"]: s["config"]["num_replicas"]
                   for account in jetstream_ready(nats_http_port)["account_details"] for s in account["stream_detail"]}
        assert set(streams.values()) == {1 if topology == "single" else 3} and len(streams) == 4, streams  # (and
        # the pipeline's bucket for big results, OBJ_RESULTS_moth-demo)
        # and the workers' metrics endpoints show the job's images between them (each serves them from a process
        # of its own, which may still be starting when a 20-image job is already over)
        processed = re.compile(r'jetpipe_images_total\{outcome="processed",pipeline="moth-demo"\} ([\d.]+)')

        def expositions() -> list[str] | None:
            found = []
            for port in metrics_ports:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                        found.append(response.read().decode())
                except OSError:
                    return None
            counted = sum(float(m.group(1)) for e in found for m in processed.finditer(e))
            return found if counted == 20 else None

        wait_for(expositions, timeout_s=30, interval_s=0.5, message="the workers' metrics to count 20 images")
        exposed = expositions() or []
        assert "jetpipe_result_handling_seconds_count" in "".join(exposed)
        # and the same ports answer the orchestrator's probes
        for port in metrics_ports:
            for probe, expected_body in (("healthz", {"status": "alive"}),
                                         ("readyz", {"ready": True, "database": "ok", "redis": "ok", "nats": "ok"})):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/{probe}", timeout=10) as response:
                    assert (response.status, json.loads(response.read())) == (200, expected_body)
    finally:
        for proc in procs:
            kill_group(proc)
        for server in servers:
            server.stop()
        time.sleep(0.1)


def test_compose_has_no_default_password_and_make_secrets_makes_each_once(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_secrets", PROJECT / "deploy" / "make_secrets.py")
    make_secrets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_secrets)
    text = (PROJECT / "docker-compose.yml").read_text()
    # every secret compose reads has no default (compose refuses to start without it), and make secrets knows it
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    assert required == set(make_secrets.SECRETS) == set(SECRET_VALUES)
    assert not re.search(r"\$\{[A-Z_]*PASSWORD:-", text) and "change-me" not in text
    assert "change-me" not in "".join(p.read_text() for p in (PROJECT / "deploy").glob("*.conf"))
    # Redis and PostgreSQL have passwords; the URLs every jetpipe process gets carry them
    assert "--requirepass" in SERVICES["redis"]["command"]
    env = SERVICES["worker"]["environment"]
    assert "${JETPIPE_REDIS_PASSWORD:?" in env["PIPELINE_REDIS_URL"]
    assert "${JETPIPE_POSTGRES_PASSWORD:?" in env["PIPELINE_DATABASE_URL"]
    # make secrets: adds what is missing, URL-safe, keeps what is set, twice changes nothing
    dotenv = tmp_path / ".env"
    dotenv.write_text("COMPOSE_PROFILES=single\nJETPIPE_REDIS_PASSWORD=mine")
    assert "JETPIPE_REDIS_PASSWORD" not in make_secrets.add_missing(dotenv)
    first = dotenv.read_text()
    assert make_secrets.add_missing(dotenv) == [] and dotenv.read_text() == first
    values = dict(line.split("=", 1) for line in first.splitlines() if "=" in line)
    assert values["COMPOSE_PROFILES"] == "single" and values["JETPIPE_REDIS_PASSWORD"] == "mine"
    assert all(len(values[name]) >= 32 and re.fullmatch(r"[\w-]+", values[name]) for name in make_secrets.SECRETS
               if name != "JETPIPE_REDIS_PASSWORD")
