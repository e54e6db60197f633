"""The structure holds: the core never imports its actors, importing it builds no broker, states are typed,
outages are told apart from bugs in one place, and a waiting actor thread can be interrupted."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import peewee
import pytest
import redis

PROJECT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "models", "actors")


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every jetpipe module `path` imports, at the top or inside a function (`from pipeline import names`
    counts as pipeline.names)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in PACKAGES:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (PROJECT / package).rglob("*.py")]
    graph = {module_name(p): imports_of(p) for p in files}
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_the_core_never_imports_actors_and_models_never_imports_pipeline():
    graph = import_graph()
    offenders = {m: sorted(d for d in deps if d.split(".")[0] == "actors") for m, deps in graph.items()
                 if m.split(".")[0] in ("pipeline", "models") and m != "pipeline.actors"}
    assert not {m: d for m, d in offenders.items() if d}
    upward = {m: sorted(d for d in deps if d.split(".")[0] == "pipeline") for m, deps in graph.items()
              if m.split(".")[0] == "models"}
    assert not {m: d for m, d in upward.items() if d}


#: pipeline's layers, lowest first: a module may import its own layer and those before it, never one after.
#: `pipeline/*.py` is the shared vocabulary (names, settings, errors, schemas); `pipeline.actors` is the worker's
#: entry module, above them all.
LAYERS = ("vocabulary", "infra", "core", "sdk", "worker", "ops", "web")


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "pipeline" or module == "pipeline.actors":
        return None
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "vocabulary"


def upward_imports(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    found = {}
    for module, deps in graph.items():
        here = layer_of(module)
        if here is None:
            continue
        above = [d for d in deps if d == "pipeline.actors" or d.split(".")[0] == "actors"
                 or (layer_of(d) is not None and LAYERS.index(layer_of(d)) > LAYERS.index(here))]
        if above:
            found[module] = sorted(above)
    return found


def test_every_module_of_pipeline_sits_in_one_of_its_layers():
    assert {layer_of(m) for m in import_graph()} - {None} == set(LAYERS)
    stray = [p for p in (PROJECT / "pipeline").iterdir() if p.is_dir() and (p / "__init__.py").exists()
             and p.name not in LAYERS]
    assert not stray


def test_no_layer_imports_a_higher_one():
    assert upward_imports(import_graph()) == {}


def test_the_layer_rule_catches_an_upward_import():
    graph = {"pipeline.core.jobs": {"pipeline.web.api", "pipeline.names"}, "pipeline.web.api": {"pipeline.core.jobs"},
             "pipeline.names": set(), "pipeline.infra.aio": {"pipeline.actors"}}
    assert upward_imports(graph) == {"pipeline.core.jobs": ["pipeline.web.api"],
                                     "pipeline.infra.aio": ["pipeline.actors"]}


def test_there_is_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def run_python(code: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "dramatiq_", "PROMETHEUS"))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, env={**clean, **env}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_importing_the_core_builds_no_broker_and_writes_no_environment():
    modules = sorted(m for m in import_graph() if m.split(".")[0] in ("pipeline", "models") and m != "pipeline.actors")
    out = run_python(f"""
import importlib, json, os
before = dict(os.environ)
for name in {modules!r}:
    importlib.import_module(name)
import dramatiq.broker
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({{"broker": dramatiq.broker.global_broker is not None, "changed": changed}}))
""")
    assert json.loads(out) == {"broker": False, "changed": []}


def test_the_worker_module_declares_each_actor_on_the_queue_the_core_sends_to():
    out = run_python("""
import json
import pipeline.actors as worker
import dramatiq.broker
assert dramatiq.broker.global_broker is worker.broker
print(json.dumps({name: worker.broker.get_actor(name).queue_name for name in worker.broker.get_declared_actors()}))
""", PIPELINE_REDIS_URL="redis://127.0.0.1:1/0", PIPELINE_METRICS_PORT="0")  # never connected: declaring only
    from pipeline import names

    assert json.loads(out) == names.ACTOR_QUEUES


def test_statuses_are_typed_and_their_groups_cover_them():
    from enum import StrEnum

    from models import DispatchMode, ImageStatus, JobStatus

    assert all(issubclass(kind, StrEnum) for kind in (JobStatus, DispatchMode, ImageStatus))
    assert set(JobStatus.RUNNING) | set(JobStatus.TERMINAL) == set(JobStatus) == set(JobStatus.ALL)
    assert not set(JobStatus.RUNNING) & set(JobStatus.TERMINAL)
    assert "SUCCESS" in JobStatus.TERMINAL and JobStatus.SUCCESS in JobStatus.TERMINAL
    assert set(DispatchMode.ALL) == set(DispatchMode)
    assert f"{JobStatus.STARTED}" == "STARTED" and json.dumps(DispatchMode.INTERNAL) == '"internal"'


@pytest.mark.parametrize("exc, outage", [
    (peewee.OperationalError("database is locked"), True),
    (peewee.InterfaceError("connection already closed"), True),
    (sqlite3.OperationalError("database is locked"), True),  # a batch insert goes straight to the driver
    (redis.ConnectionError("Connection refused"), True),
    (ConnectionRefusedError(), True),
    (ValueError("a bug"), False),
    (KeyError("a bug"), False),
    (peewee.IntegrityError("bad data"), False),
])
def test_one_policy_tells_outages_from_bugs(exc, outage):
    from pipeline.core.retry import is_outage, retry_outages
    from pipeline.errors import BadResult, StateMissing, TransientError

    assert is_outage(exc) is outage
    assert is_outage(TransientError("nats down")) and is_outage(StateMissing())
    assert not is_outage(BadResult("malformed"))
    retry_when = retry_outages(3)
    assert retry_when(2, exc) is outage and not retry_when(3, exc)


def test_a_database_without_tables_is_schema_missing_not_an_outage(tmp_path):
    import models
    from models import Job, SchemaMissing, is_transient
    from pipeline.core.retry import is_outage

    models.bind(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        expected = r"not initialised \(no such table: job\): run `python cli.py init-db`"
        with pytest.raises(SchemaMissing, match=expected) as raised:
            Job.select().count()
        assert not is_transient(raised.value) and not is_outage(raised.value)
    finally:
        models.database.obj.close()


def test_an_unsupported_database_url_is_a_clear_error():
    import models

    with pytest.raises(models.DatabaseURLError, match="unsupported database URL scheme 'mysql'"):
        models.bind("mysql://db/jobs")


def test_an_interrupt_of_the_waiting_thread_cancels_the_coroutine():
    """What a Dramatiq time limit or worker shutdown does to an actor waiting on NATS."""
    from dramatiq.middleware.time_limit import TimeLimitExceeded
    from dramatiq.threading import raise_thread_exception

    from pipeline.infra.aio import LoopThread

    runner = LoopThread(name="interrupt-test")
    cancelled = threading.Event()
    outcome = []

    async def slow_nats_call():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def actor():
        try:
            runner.run(slow_nats_call(), timeout=60)
        except TimeLimitExceeded:
            outcome.append("interrupted")

    thread = threading.Thread(target=actor)
    try:
        thread.start()
        time.sleep(0.3)
        started = time.monotonic()
        raise_thread_exception(thread.ident, TimeLimitExceeded)
        thread.join(5)
        assert outcome == ["interrupted"] and time.monotonic() - started < 1.0
        assert cancelled.wait(2), "the coroutine kept running after its caller was interrupted"
    finally:
        runner.stop()


def test_a_coroutines_own_timeout_is_not_mistaken_for_the_waits():
    from pipeline.infra.aio import LoopThread

    runner = LoopThread(name="timeout-test")

    async def raises_its_own():
        raise TimeoutError("nats: request timed out")

    async def slow():
        await asyncio.sleep(5)

    try:
        with pytest.raises(TimeoutError, match="nats: request timed out"):
            runner.run(raises_its_own(), timeout=10)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="did not finish within 0.3 s"):
            runner.run(slow(), timeout=0.3)
        assert time.monotonic() - started < 1.0
    finally:
        runner.stop()
