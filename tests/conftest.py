"""Fixtures: real nats-server and redis-server from the virtualenv on free ports, a fresh database per
test (SQLite always, PostgreSQL too where the server is reachable), worker and service factories."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

# The environment must not leak into tests: they configure everything explicitly.
for _key in [k for k in os.environ if k.startswith("PIPELINE_")]:
    del os.environ[_key]

import models  # noqa: E402
from pipeline.ops.devstack import DevStack  # noqa: E402
from pipeline.settings import Settings, set_settings  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("JETPIPE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _postgres_reachable() -> bool:
    try:
        import psycopg2

        psycopg2.connect(PG_ADMIN_URL, connect_timeout=2).close()
        return True
    except Exception:  # noqa: BLE001
        return False


POSTGRES = _postgres_reachable()


UNIT = PROJECT / "tests" / "unit"


def is_unit(request) -> bool:
    """True for a test under tests/unit, which must run without any server."""
    return UNIT in Path(request.node.path).parents


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """One NATS + Redis for the session (tests that kill servers make their own with `make_stack`).

    Requested by every test outside tests/unit (through `no_dead_letters`) before anything else: it must
    exist before anything imports `actors`, which builds the worker broker from the environment's Redis
    (it would otherwise be the machine's default redis://:6379).
    """
    assert "actors" not in sys.modules, "actors/ was imported before the test stack existed"
    dev = DevStack.create(tmp_path_factory.mktemp("stack")).start()
    os.environ["PIPELINE_REDIS_URL"] = dev.redis_url  # the in-process Dramatiq broker sends here
    os.environ["PIPELINE_NATS_URL"] = dev.nats_url
    yield dev
    dev.stop()


@pytest.fixture(autouse=True)
def no_dead_letters(request):
    """Nothing jetpipe does with bad input, outages or crashes ends in Dramatiq's dead-letter queue: only
    tests marked `dead_letters` (a bug or a poison message, on purpose) may leave one."""
    if is_unit(request):
        yield
        return
    stack = request.getfixturevalue("stack")
    yield
    import redis

    client = redis.Redis.from_url(stack.redis_url)
    try:
        keys = list(client.scan_iter(match="jetpipe-dramatiq:*.XQ"))
        dead = [describe_dead(body) for key in keys for body in client.hvals(key + b".msgs")]
        for key in keys:  # gone, so the next tests of this process are not failed by this one's
            client.delete(key, key + b".msgs")
    finally:
        client.close()
    if not request.node.get_closest_marker("dead_letters"):
        assert not dead, f"dead-lettered Dramatiq messages: {dead}"


def describe_dead(body: bytes) -> str:
    """A dead-lettered Dramatiq message in a few words: its actor, arguments, the error, when it was sent
    (a test that fails on another test's dead letter says whose it is)."""
    import json

    message = json.loads(body)
    options = message.get("options", {})
    return (f"{message.get('queue_name')}.{message.get('actor_name')}{tuple(message.get('args', ()))} "
            f"sent at {message.get('message_timestamp')} retries={options.get('retries')} "
            f"error={str(options.get('traceback', '')).strip().splitlines()[-1:]}")


@pytest.fixture(autouse=True)
def in_process_broker_uses_the_test_redis(request):
    """Fail loudly, never send to a Redis the test did not start."""
    yield
    if is_unit(request):
        return
    stack = request.getfixturevalue("stack")
    import dramatiq.broker

    if dramatiq.broker.global_broker is not None:
        kwargs = dramatiq.broker.global_broker.client.connection_pool.connection_kwargs
        assert kwargs.get("port") == stack.redis.port, f"in-process broker bound to {kwargs}"


@pytest.fixture
def make_stack(tmp_path):
    """Factory of private NATS + Redis stacks, for tests that stop or restart them."""
    made = []

    def make(nats_executable: str | None = None) -> DevStack:
        dev = DevStack.create(tmp_path / f"stack{len(made)}", nats_executable=nats_executable).start()
        made.append(dev)
        return dev

    yield make
    for dev in made:
        dev.stop()


@pytest.fixture
def chaos_env(make_stack, db_url, moth_pipeline, trap_images):
    """Private NATS + Redis (the test may break them), and a way to enqueue jobs through the CLI."""
    dev = make_stack()

    def settings(**overrides):
        return make_settings(db_url, dev, **overrides)

    from pipeline.infra.runtime import Runtime, set_runtime
    from pipeline.sdk import moth

    base = settings(PIPELINE_NATS_TASK_TTR=5, PIPELINE_NATS_MAX_DELIVER=5)  # headroom on a loaded 2-core box
    rt = Runtime(base, name="jetpipe-chaos-test")
    previous = set_runtime(rt)

    def enqueue(s, urls, *options: str) -> int:
        command = ["cli.py", "enqueue-job", "--pipeline", moth.SLUG, "--json", *options, *urls]
        proc = subprocess.run([sys.executable, *command], cwd=PROJECT, env=subprocess_env(s), capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["id"]

    def cli(s, *args) -> subprocess.CompletedProcess:
        env = {**subprocess_env(s), "COLUMNS": "200"}
        return subprocess.run([sys.executable, "cli.py", *args], cwd=PROJECT, env=env, capture_output=True,
                              text=True, timeout=60)

    directory, truth = trap_images
    urls = [f"file://{directory}/{name}" for name in sorted(truth)]
    yield type("ChaosEnv", (), {"dev": dev, "settings": staticmethod(settings), "base": base, "rt": rt,
                                "enqueue": staticmethod(enqueue), "cli": staticmethod(cli), "urls": urls,
                                "truth": truth})
    set_runtime(previous)
    rt.close()


@pytest.fixture
def private_runtime(make_stack, db_url, moth_pipeline):
    """(runtime, stack): a runtime on NATS and Redis servers of its own, which the test may stop."""
    from pipeline.infra.runtime import Runtime, set_runtime

    dev = make_stack()
    rt = Runtime(make_settings(db_url, dev), name="jetpipe-outage")
    previous = set_runtime(rt)
    yield rt, dev
    set_runtime(previous)
    rt.close()


@pytest.fixture(scope="session")
def pg_database():
    """A PostgreSQL database for this session (dropped at the end), or None where unreachable."""
    if not POSTGRES:
        yield None
        return
    import psycopg2

    name = f"jetpipe_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(PG_ADMIN_URL)
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    db = models.database.obj
    if db is not None and not db.is_closed():
        db.close()
    admin.cursor().execute(
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()")
    admin.cursor().execute(f"DROP DATABASE IF EXISTS {name}")
    admin.close()


def _db_params():
    return ["sqlite", pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.skipif(
        not POSTGRES, reason="PostgreSQL not reachable")])]


@pytest.fixture(params=_db_params())
def db_url(request, tmp_path, pg_database):
    """A fresh, initialised database: a SQLite file, or the session's PostgreSQL database truncated."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'pipeline.db'}"
        models.bind(url)
        models.create_schema()
    else:
        url = pg_database
        models.bind(url)
        models.create_schema()
        tables = ", ".join(m._meta.table_name for m in models.ALL_MODELS)
        models.database.execute_sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
    yield url
    db = models.database.obj
    if db is not None and not db.is_closed():
        db.close()


@pytest.fixture
def sqlite_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'pipeline.db'}"
    models.bind(url)
    models.create_schema()
    return url


def clean_servers(dev: DevStack) -> None:
    """Empty Redis and delete jetpipe's streams (and its result buckets), so every test starts from nothing."""
    import nats
    import redis

    redis.Redis.from_url(dev.redis_url).flushall()

    async def drop():
        nc = await nats.connect(dev.nats_url)
        try:
            js = nc.jetstream()
            for name in [info.config.name for info in await js.streams_info()
                         if info.config.name.startswith(("PIPELINE_", "OBJ_RESULTS_"))]:
                try:
                    await js.delete_stream(name)
                except Exception:  # noqa: BLE001 - not there yet
                    pass
        finally:
            await nc.close()

    # on a thread of its own: the browser tests' Playwright keeps an event loop running in this one
    done = concurrent.futures.ThreadPoolExecutor(1).submit(asyncio.run, drop())
    done.result(timeout=30)


def make_settings(db_url: str, dev: DevStack, **overrides) -> Settings:
    env = {"PIPELINE_DATABASE_URL": db_url, "PIPELINE_REDIS_URL": dev.redis_url, "PIPELINE_NATS_URL": dev.nats_url,
           "PIPELINE_METRICS_PORT": "0"}  # no shared :9191 between test workers; test_compose scrapes its own
    env.update({k: str(v) for k, v in overrides.items()})
    return Settings.from_env(env)


@pytest.fixture
def settings(db_url, stack):
    clean_servers(stack)
    s = make_settings(db_url, stack)
    set_settings(s)
    yield s
    set_settings(None)


@pytest.fixture
def runtime(settings):
    """The process runtime on the test's database and the session's NATS and Redis."""
    from pipeline.infra.runtime import Runtime, set_runtime

    rt = Runtime(settings, name="jetpipe-test")
    set_runtime(rt)
    yield rt
    set_runtime(None)
    rt.close()


@pytest.fixture
def moth_pipeline(db_url):
    """The moth-demo pipeline, registered for the tests' service token `svc` (tests/web_helpers.py)."""
    import json

    from pipeline.core.registry import register_pipeline
    from pipeline.schemas import decode_pipeline_spec
    from pipeline.sdk import moth

    register_pipeline(decode_pipeline_spec(json.dumps(moth.PIPELINE_SPEC).encode(), source="test"),
                      for_service="svc")
    return moth.SLUG


@pytest.fixture(scope="session")
def trap_images(tmp_path_factory):
    """50 synthetic trap images with ground truth: (directory, truth)."""
    from pipeline.sdk import moth

    directory = tmp_path_factory.mktemp("traps")
    truth = moth.generate_images(str(directory), 50, seed=11)
    return directory, truth


def subprocess_env(settings: Settings, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(settings.to_env())
    env["PIPELINE_LOG_LEVEL"] = "INFO"
    env["PYTHONFAULTHANDLER"] = "1"  # a native crash in a worker leaves its traceback in the log
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def worker_factory(tmp_path):
    """Start `dramatiq pipeline.actors` subprocesses; all are killed at teardown. Logs in tmp_path."""
    procs: list[subprocess.Popen] = []

    def start(settings: Settings, *, processes: int = 1, threads: int = 4, **env) -> subprocess.Popen:
        log = open(tmp_path / f"worker{len(procs)}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "dramatiq", "pipeline.actors", "-p", str(processes),
                                 "-t", str(threads)], cwd=PROJECT, env=subprocess_env(settings, **env),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # own group: teardown kills master and children
        procs.append(proc)
        return proc

    start.logs = lambda: "\n".join((tmp_path / f"worker{i}.log").read_text(errors="replace")
                                   for i in range(len(procs)))
    yield start
    for proc in procs:
        kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every process of its group (a dramatiq master and its worker children)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture
def service_factory():
    """Run processing services in this process (on their own loop thread); stopped at teardown."""
    from pipeline.infra.aio import LoopThread
    from pipeline.sdk.service import ProcessingService

    loop = LoopThread(name="test-service")
    running = []

    def start(settings: Settings, pipeline: str, handler, *, concurrency: int = 4, **options) -> ProcessingService:
        service = ProcessingService(pipeline, handler, nats_url=settings.nats_url, concurrency=concurrency,
                                    **options)
        running.append((service, loop.spawn(service.run())))
        return service

    yield start
    crashed = []
    for service, future in running:
        loop.loop.call_soon_threadsafe(service.stop)
        try:
            future.result(timeout=20)
        except concurrent.futures.TimeoutError:
            pass  # still finishing its tasks
        except Exception as exc:  # noqa: BLE001 - reported below, once every service is stopped
            crashed.append(f"{service.name}: {type(exc).__name__}: {exc}")
    loop.stop()
    # a service that died mid-test leaves its tasks unanswered: say so rather than let a test time out
    assert not crashed, f"processing service stopped by an exception: {crashed}"


@pytest.fixture
def services():
    """Start raw one-image-per-message services (`copies` publishes of each result); stopped at teardown.
    `start(...)` returns the Counter of deliveries per image id (how often the model ran)."""
    from collections import Counter

    from pipeline.infra.aio import LoopThread
    from tests.helpers import answer_one_box, raw_service

    loop = LoopThread(name="raw-services")
    stop = asyncio.Event()
    running = []

    def start(settings, *, copies: int = 1, pipeline: str = "moth-demo") -> Counter:
        seen: Counter = Counter()
        running.append(loop.spawn(raw_service(settings.nats_url, pipeline, stop, answer_one_box, copies=copies,
                                              seen=seen)))
        return seen

    yield start
    loop.loop.call_soon_threadsafe(stop.set)
    for future in running:
        future.result(timeout=20)
    loop.stop()


def wait_for(predicate, *, timeout_s: float = 60, interval_s: float = 0.1, message: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {message}")


#: The passwords the shipped NATS users read from the server's environment, in tests that run deploy/nats.conf.
NATS_PASSWORDS = {"JETPIPE_NATS_WORKER_PASSWORD": "w0rker-pw", "JETPIPE_NATS_OPERATOR_PASSWORD": "0perator-pw",
                  "JETPIPE_NATS_SERVICE_PASSWORD": "serv1ce-pw", "JETPIPE_NATS_LAB_B_PASSWORD": "lab-b-pw"}


@pytest.fixture
def two_teams(tmp_path):
    """nats-server with deploy/nats.conf as shipped plus a user `lab-b` for pipeline `birds`, and a Redis:
    (url of each NATS user, redis url)."""
    from pipeline.ops.devstack import Server, binary, free_port, wait_for_port
    from pipeline.ops.nats_users import service_user_block
    from tests.helpers import shipped_nats_conf

    nats_port, http_port, redis_port = free_port(), free_port(), free_port()
    conf = shipped_nats_conf(tmp_path, "nats.conf", port=nats_port, http_port=http_port)
    users = (tmp_path / "nats-users.conf").read_text()
    block = service_user_block("lab-b", ["birds"])
    (tmp_path / "nats-users.conf").write_text(users.replace("\n  ]\n}", f"\n{block}\n  ]\n}}"))
    nats = Server("nats", [binary("nats-server"), "-c", str(conf)], nats_port, tmp_path / "nats.log")
    with open(nats.log_path, "ab") as log:
        nats.proc = subprocess.Popen(nats.args, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **NATS_PASSWORDS})
    wait_for_port(nats_port, proc=nats.proc)
    redis = Server("redis", [binary("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                             "--dir", str(tmp_path)], redis_port, tmp_path / "redis.log").start()
    urls = {user: f"nats://{user}:{NATS_PASSWORDS[f'JETPIPE_NATS_{key}_PASSWORD']}@127.0.0.1:{nats_port}"
            for user, key in (("jetpipe-worker", "WORKER"), ("jetpipe-operator", "OPERATOR"),
                              ("jetpipe-service", "SERVICE"), ("lab-b", "LAB_B"))}
    yield urls, f"redis://127.0.0.1:{redis_port}/0"
    nats.stop()
    redis.stop()
