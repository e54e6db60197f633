"""The cluster deployment across hosts, with host-level faults: seven network namespaces on one bridge (three
NATS nodes from deploy/nats-cluster.conf with the shipped users, a PostgreSQL + Redis host, two worker hosts,
a processing-service host), every process configured as the compose `cluster` profile configures it. Each
fault at about a third of a job must end the job SUCCESS exact, recovering within ack_wait + 10 s of the
fault or the heal; docs/operations.md ("Faults across hosts") records what each cost.

Root only (the tests make the namespaces); elsewhere they skip saying why."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from models import Job, JobStatus
from pipeline import names
from pipeline.infra.runtime import Runtime, set_runtime
from pipeline.ops.devstack import binary
from pipeline.ops.health import build_report
from pipeline.sdk import moth
from tests.conftest import PROJECT, make_settings, subprocess_env, wait_for
from tests.netlab import UNAVAILABLE, Host, Lab

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or ""),
    pytest.mark.skipif(not PG_BIN, reason="no PostgreSQL server binaries (/usr/lib/postgresql/*/bin)"),
]

PASSWORDS = {"JETPIPE_NATS_WORKER_PASSWORD": "lab-worker-pw", "JETPIPE_NATS_OPERATOR_PASSWORD": "lab-operator-pw",
             "JETPIPE_NATS_SERVICE_PASSWORD": "lab-service-pw", "JETPIPE_NATS_ROUTE_PASSWORD": "lab-route-pw"}
TTR = 30  # ack_wait of the lab's tasks, the compose default (seconds): the recovery bound is TTR + 10 s
IMAGES = 600
#: The lab's processing service: the reference model, slowed to a steady 40 images/s or so, one image per
#: result message, so a fault lands mid-job on any machine.
SERVICE = """
import asyncio, logging, sys, time
logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s", level=logging.INFO)
from pipeline.sdk import moth
from pipeline.sdk.service import ProcessingService
def handler(task):
    time.sleep(0.05)
    return moth.process_task(task)
asyncio.run(ProcessingService("moth-demo", handler, nats_url=sys.argv[1], concurrency=2, batch_size=1,
                              name="lab-service").run())
"""


class LabStack:
    """The seven hosts and their processes."""

    def __init__(self, lab: Lab, work: Path):
        self.lab, self.work = lab, work
        self.db = lab.add_host("db")
        self.nats = [lab.add_host(f"n{i}") for i in (1, 2, 3)]
        self.workers = [lab.add_host(f"w{i}") for i in (1, 2)]
        self.svc = lab.add_host("svc")
        self.env = {**os.environ, **PASSWORDS}
        self.database_url = f"postgresql://postgres@{self.db.address}:5432/jetpipe"
        self.redis_url = f"redis://{self.db.address}:6379/0"

    def nats_url(self, user: str) -> str:
        password = PASSWORDS[f"JETPIPE_NATS_{user.split('-')[1].upper()}_PASSWORD"]
        return ",".join(f"nats://{user}:{password}@{n.address}:4222" for n in self.nats)

    def start_database(self) -> None:
        data = Path(tempfile.mkdtemp(prefix="jetpipe-lab-pg-", dir="/tmp"))
        shutil.chown(data, "postgres", "postgres")
        data.chmod(0o700)
        self.pg_data = data
        bin_dir = PG_BIN[-1]
        subprocess.run(["runuser", "-u", "postgres", "--", f"{bin_dir}/initdb", "-D", str(data / "db"), "-A", "trust",
                        "-U", "postgres", "--no-sync"], check=True, capture_output=True, timeout=120)
        (data / "db" / "pg_hba.conf").write_text("local all all trust\nhost all all 10.213.0.0/16 trust\n")
        self.db.popen([f"{bin_dir}/postgres", "-D", str(data / "db"), "-k", str(data), "-p", "5432",
                       "-c", f"listen_addresses={self.db.address}", "-c", "fsync=off", "-c", "max_connections=200"],
                      user="postgres", log=self.work / "postgres.log")
        wait_for(lambda: self._psql("select 1").returncode == 0, timeout_s=60, message="PostgreSQL in the lab")
        assert self._psql("create database jetpipe").returncode == 0
        self.db.popen([binary("redis-server"), "--bind", self.db.address, "--port", "6379", "--save", "",
                       "--appendonly", "no", "--protected-mode", "no"], log=self.work / "redis.log")

    def _psql(self, sql: str, db: str = "postgres") -> subprocess.CompletedProcess:
        return subprocess.run(["psql", "-h", self.db.address, "-U", "postgres", "-d", db, "-Atc", sql],
                              capture_output=True, text=True, timeout=30)

    def sql(self, query: str) -> list[str]:
        """The first column of each row, as text (an observer's own connection, not jetpipe's)."""
        import psycopg2

        if getattr(self, "_observer", None) is None:
            self._observer = psycopg2.connect(self.database_url, connect_timeout=5)
            self._observer.autocommit = True
        with self._observer.cursor() as cursor:
            cursor.execute(query)
            return [str(row[0]) for row in cursor.fetchall()]

    def start_nats(self) -> None:
        conf = (PROJECT / "deploy" / "nats-cluster.conf").read_text()
        shutil.copy(PROJECT / "deploy" / "nats-users.conf", self.work / "nats-users.conf")
        for i, node in enumerate(self.nats, 1):
            text = conf.replace("0.0.0.0:4222", f"{node.address}:4222")
            text = text.replace("127.0.0.1:8222", f"{node.address}:8222")
            text = text.replace("0.0.0.0:6222", f"{node.address}:6222").replace(
                "/data/jetstream", str(self.work / f"n{i}" / "js"))
            path = self.work / f"nats-n{i}.conf"
            path.write_text(text)
            routes = ",".join(f"nats-route://jetpipe-route:{PASSWORDS['JETPIPE_NATS_ROUTE_PASSWORD']}@{o.address}:6222"
                              for o in self.nats if o is not node)
            node.popen([binary("nats-server"), "-c", str(path), "--server_name", f"nats-{i}", "--routes", routes],
                       env=self.env, log=self.work / f"nats-n{i}.log")
        for node in self.nats:
            wait_for(lambda node=node: _http_ok(f"http://{node.address}:8222/healthz?js-enabled-only=true"),
                     timeout_s=60, message=f"NATS on {node.name}")
        # a cluster still forming closes duplicate routes under the first streams and consumers (a consumer
        # made then can stay silent): start jobs once every node sees the others and a current meta leader
        wait_for(self._formed, timeout_s=60, interval_s=0.5, message="the NATS cluster to form")
        time.sleep(2)

    def _formed(self) -> bool:
        for node in self.nats:
            try:
                meta = _http_json(f"http://{node.address}:8222/jsz").get("meta_cluster") or {}
                routes = {r.get("remote_name") for r in _http_json(f"http://{node.address}:8222/routez")["routes"]}
            except OSError:
                return False
            led_here = meta.get("leader") == node.name.replace("n", "nats-")
            current = all(r.get("current") for r in meta.get("replicas") or []) if led_here else True
            if not meta.get("leader") or meta.get("cluster_size") != 3 or len(routes) < 2 or not current:
                return False
        return True

    def settings(self, **overrides):
        servers = type("Servers", (), {"redis_url": self.redis_url, "nats_url": self.nats_url("jetpipe-worker")})
        return make_settings(self.database_url, servers, PIPELINE_NATS_REPLICAS=3, PIPELINE_NATS_TASK_TTR=TTR,
                             PIPELINE_NATS_MAX_DELIVER=5, PIPELINE_STALLED_JOBS_MAX_MINUTES=0.5,
                             PIPELINE_HEALTH_CHECK_SECONDS=10, **overrides)

    def start_worker(self, host: Host, settings, **env) -> None:
        host.popen([sys.executable, "-m", "dramatiq", "pipeline.actors", "-p", "1", "-t", "8"], cwd=PROJECT,
                   env=subprocess_env(settings, PIPELINE_METRICS_PORT=0, **env), log=self.work / f"{host.name}.log")

    def start_service(self) -> None:
        self.svc.popen([sys.executable, "-c", SERVICE, self.nats_url("jetpipe-service")], cwd=PROJECT,
                       env={**subprocess_env(self.settings()), "PYTHONPATH": str(PROJECT)},
                       log=self.work / "svc.log")

    def node_of_service(self) -> Host | None:
        """The NATS node the processing service is connected to (from the nodes' connection lists)."""
        for node in self.nats:
            conns = _http_json(f"http://{node.address}:8222/connz?auth=1").get("connections") or []
            if any(c.get("name") == "lab-service" for c in conns):
                return node
        return None

    def close(self) -> None:
        if getattr(self, "_observer", None) is not None:
            self._observer.close()
        self.lab.close()
        if getattr(self, "pg_data", None):
            shutil.rmtree(self.pg_data, ignore_errors=True)


def _http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _http_ok(url: str) -> bool:
    try:
        return _http_json(url).get("status") == "ok"
    except OSError:
        return False


@pytest.fixture
def lab_stack(tmp_path, worker_id):
    number = 100 + (int(worker_id[2:]) if worker_id.startswith("gw") else 0) * 10 + os.getpid() % 10
    lab = Lab(number)
    stack = LabStack(lab, tmp_path)
    try:
        stack.start_database()
        stack.start_nats()
        settings = stack.settings()
        runtime = Runtime(settings, name="jetpipe-lab-operator")
        previous = set_runtime(runtime)
        import models

        models.create_schema()
        from pipeline.core.registry import register_pipeline
        from pipeline.schemas import decode_pipeline_spec

        register_pipeline(decode_pipeline_spec(json.dumps(moth.PIPELINE_SPEC).encode(), source="lab"))
        stack.runtime = runtime
        yield stack
        set_runtime(previous)
        runtime.close()
    finally:
        for line in _tails(tmp_path):
            print(line)
        stack.close()


def _tails(work: Path) -> list[str]:
    return [f"--- {log.name}: " + " | ".join(log.read_text(errors="replace").splitlines()[-15:])
            for log in sorted(work.glob("*.log"))]


@pytest.fixture(scope="module")
def lab_images(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lab-images")
    truth = moth.generate_images(str(directory), IMAGES, seed=21)
    return directory, truth


def enqueue(stack: LabStack, images) -> tuple[int, int]:
    """A job over the lab's images, started; (job id, expected detections)."""
    from pipeline.core.jobs import create_job, start_job

    directory, truth = images
    urls = [f"file://{directory}/{name}" for name in sorted(truth)]
    job = create_job(moth.SLUG, urls)
    start_job(stack.runtime, job)
    return job.id, sum(len(v) for v in truth.values())


def progress(job_id: int) -> int:
    return Job.get_by_id(job_id).progress["stages"]["process"]["processed"]


class Recovery:
    """When progress stopped and resumed around a fault (sampled every 0.2 s on a thread of its own, so a
    fault that takes its time does not stop the sampling)."""

    def __init__(self, job_id: int):
        self.job_id = job_id
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recovery-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import models

        while not self._stop.is_set():
            with contextlib.suppress(Exception), models.thread_connection():
                self.samples.append((time.monotonic(), progress(self.job_id)))
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def latest(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def stalls(self, since: float) -> list[tuple[float, float]]:
        """(start, end) of every time without progress after `since`, until the job's last image."""
        moved = [t for (t, p), (_, q) in itertools.pairwise(self.samples) if q > p and t >= since]
        return list(itertools.pairwise([since, *moved]))

    def longest_stall(self, since: float) -> float:
        return max((end - start for start, end in self.stalls(since)), default=0.0)

    def recovered(self, fault: float, heal: float | None = None) -> bool:
        """Every stall after `fault` ended within ack_wait + 10 s of its start, or of the `heal` (a stall
        that lasts longer and ends before the heal did not recover in time)."""
        bound = TTR + 10
        return all(end - start < bound or (heal is not None and heal <= end < heal + bound)
                   for start, end in self.stalls(fault))


def run_until_end(stack: LabStack, job_id: int, recovery: Recovery, *, fault, timeout_s: float = 240) -> Job:
    """Sample progress until the job ends; call `fault(recovery)` once a third of the job is done."""
    deadline = time.monotonic() + timeout_s
    faulted = False
    try:
        while time.monotonic() < deadline:
            job = Job.get_by_id(job_id)
            if job.status in JobStatus.TERMINAL:
                return job
            if not faulted and recovery.latest() >= IMAGES // 3:
                faulted = True
                fault(recovery)
            time.sleep(0.2)
    finally:
        recovery.stop()
    pytest.fail(f"job {job_id} did not end within {timeout_s} s (processed {progress(job_id)})")


def assert_exact(job: Job, detections: int) -> None:
    stages = job.progress["stages"]
    assert job.status == JobStatus.SUCCESS
    assert (stages["process"]["processed"], stages["process"]["failed"]) == (IMAGES, 0)
    assert stages["results"]["detections"] == detections


def end_exact_and_recovered(stack: LabStack, job_id: int, detections: int, recovery: Recovery, fault,
                            moments: dict[str, float], what: str) -> None:
    """Run the job to its end with `fault` at a third (it records "fault" and "heal" in `moments`): SUCCESS
    with exact counts, every stall over within ack_wait + 10 s of the fault or the heal; the longest printed."""
    job = run_until_end(stack, job_id, recovery, fault=fault)
    assert_exact(job, detections)
    stall = recovery.longest_stall(moments["fault"])
    print(f"across hosts: {what}: longest stall {stall:.1f} s after the fault")
    assert recovery.recovered(moments["fault"], moments["heal"])


def report_problems(stack: LabStack) -> list[str]:
    return build_report(stack.runtime.settings, stack.runtime.runner)[1]["problems"]


def test_a_worker_host_lost_inside_a_transaction_costs_seconds(lab_stack, lab_images):
    stack = lab_stack
    w1, w2 = stack.workers
    # Given a worker host whose saving transactions are slowed, so that it is easy to lose inside one
    stack.start_worker(w1, stack.runtime.settings, PIPELINE_DELAY_AT="after_db_save=0.2")
    stack.start_service()
    job_id, detections = enqueue(stack, lab_images)
    recovery = Recovery(job_id)
    moments: dict[str, float] = {}

    def lose_w1(recovery: Recovery) -> None:
        # When w1's host vanishes (link cut, then its processes gone) while it holds a transaction
        wait_for(lambda: stack.sql(
            "select count(*) from pg_locks l join pg_stat_activity a using (pid) join pg_class c on c.oid = "
            f"l.relation where a.client_addr = '{w1.address}' and a.state = 'idle in transaction' and "
            "c.relname = 'job' and l.mode = 'RowShareLock'") != ["0"],
            timeout_s=30, interval_s=0.01, message="w1 inside a transaction that holds the job's row lock")
        w1.cut()
        moments["fault"] = time.monotonic()
        w1.kill_all()
        # and the other worker host takes over: its saving needs the job row the lost session still locks
        stack.start_worker(w2, stack.runtime.settings)

    job = run_until_end(stack, job_id, recovery, fault=lose_w1)
    # Then the job ends SUCCESS exact, progress resumed within ack_wait + 10 s, and the dead session is gone
    assert_exact(job, detections)
    stall = recovery.longest_stall(moments["fault"])
    print(f"across hosts: worker host lost in a transaction: longest stall {stall:.1f} s after the fault")
    assert recovery.recovered(moments["fault"])
    # and every session of the lost host is ended by the server's keepalives (not after hours)
    wait_for(lambda: stack.sql(f"select count(*) from pg_stat_activity where client_addr = '{w1.address}'") == ["0"],
             timeout_s=30, interval_s=0.5, message="the lost host's sessions to be ended")
    print(f"across hosts: the lost host's sessions ended {time.monotonic() - moments['fault']:.1f} s after the fault")
    # And health names the worker that vanished without a clean shutdown
    problems = wait_for(lambda: [p for p in report_problems(stack) if "stopped announcing itself" in p],
                        timeout_s=60, interval_s=1, message="health to name the vanished worker")
    assert "without a clean shutdown" in problems[0]


def test_the_task_streams_leader_losing_its_link_costs_seconds(lab_stack, lab_images):
    stack = lab_stack
    for host in stack.workers:
        stack.start_worker(host, stack.runtime.settings)
    stack.start_service()
    # Given the node the service is connected to leads the tasks stream
    node = wait_for(stack.node_of_service, timeout_s=30, message="the service to connect")
    make_leader(stack, node)
    job_id, detections = enqueue(stack, lab_images)
    recovery = Recovery(job_id)
    moments: dict[str, float] = {}

    def cut_leader(recovery: Recovery) -> None:
        # When that node loses its link for 20 s
        node.cut()
        moments["fault"] = time.monotonic()
        # health is degraded meanwhile, naming the node
        moments["all_problems"] = report_problems(stack)
        moments["problems"] = [p for p in moments["all_problems"] if node.address in p]
        time.sleep(max(0.0, 20 - (time.monotonic() - moments["fault"])))
        node.heal()
        moments["heal"] = time.monotonic()

    end_exact_and_recovered(stack, job_id, detections, recovery, cut_leader, moments,
                            "tasks stream leader's link cut 20 s")
    assert moments["problems"] and "does not answer as it should" in moments["problems"][0], moments["all_problems"]


def test_a_node_cut_off_from_the_other_two_costs_seconds(lab_stack, lab_images):
    stack = lab_stack
    for host in stack.workers:
        stack.start_worker(host, stack.runtime.settings)
    stack.start_service()
    job_id, detections = enqueue(stack, lab_images)
    recovery = Recovery(job_id)
    moments: dict[str, float] = {}

    def partition(recovery: Recovery) -> None:
        # When the service's node is partitioned from the other two (they keep quorum) for 30 s
        node = stack.node_of_service()
        assert node is not None, "the service is connected to no node"
        stack.lab.partition(node, [n for n in stack.nats if n is not node])
        moments["fault"] = time.monotonic()
        moments["problems"] = wait_for(lambda: [p for p in report_problems(stack) if node.address in p],
                                       timeout_s=25, interval_s=1, message="health to name the cut-off node")
        time.sleep(max(0.0, 30 - (time.monotonic() - moments["fault"])))
        stack.lab.heal_partitions()
        moments["heal"] = time.monotonic()

    end_exact_and_recovered(stack, job_id, detections, recovery, partition, moments,
                            "service's node partitioned 30 s")
    assert "JetStream" in moments["problems"][0] or "no answer" in moments["problems"][0], moments["problems"]


def make_leader(stack: LabStack, node: Host) -> None:
    """Step the tasks stream's leader down until it is `node` (each step-down elects a peer at random); the
    stream is made first, as the pipeline's first dispatch would make it."""
    import nats
    import nats.js.errors

    stack.runtime.tasks.ensure_tasks_stream(moth.SLUG, replicas=stack.runtime.settings.nats_replicas)

    async def leader_on() -> None:
        nc = await nats.connect(stack.nats_url("jetpipe-operator").split(","), connect_timeout=3)
        try:
            js = nc.jetstream()
            for _ in range(30):
                try:
                    info = await js.stream_info(names.tasks_stream("moth-demo"))
                except nats.js.errors.NotFoundError:  # the workers have not created it yet
                    await asyncio.sleep(0.5)
                    continue
                if info.cluster.leader == f"nats-{node.name[1:]}":
                    return
                with contextlib.suppress(Exception):
                    stream = names.tasks_stream("moth-demo")
                    await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=5)
                await asyncio.sleep(1.5)
            raise AssertionError(f"could not make {node.name} the leader of {names.tasks_stream('moth-demo')}")
        finally:
            await nc.close()

    asyncio.run(leader_on())
