"""OpenTelemetry traces: one job's spans form one tree, from its enqueue to its last save, across every process
that works on it (the CLI that enqueues it, the worker, the gateway, the processing service)."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from dataclasses import dataclass

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from models import Job, JobStatus, Pipeline
from pipeline import names
from pipeline.infra import tracing
from pipeline.ops.devstack import free_port
from pipeline.schemas import SourceImageRef, SuccessResult
from tests.conftest import PROJECT, kill_group, subprocess_env, wait_for
from tests.helpers import dispatch, fake_job, nats_client, take_and_save
from tests.web_helpers import TOKENS, TOKENS_SETTING

#: Every kind of span one job's trace holds when its tasks go through NATS, and through the gateway.
OVER_NATS = {"jetpipe.enqueue", "jetpipe.run_job", "jetpipe.dispatch", "jetpipe.service.task", "jetpipe.take",
             "jetpipe.save", "jetpipe.cleanup"}
OVER_HTTP = OVER_NATS | {"jetpipe.gateway.hand_out", "jetpipe.gateway.result"}


@dataclass(frozen=True)
class SpanRow:
    trace: str
    span: str
    parent: str  # "" for a root
    name: str
    service: str
    job: int | None


def one_tree(spans: list[SpanRow]) -> dict[str, list[str]]:
    """Assert the spans form one tree rooted at the job's enqueue; the names of each span's children."""
    assert len({s.trace for s in spans}) == 1, "the job's spans are in more than one trace"
    ids = {s.span: s for s in spans}
    roots = [s.name for s in spans if not s.parent]
    assert roots == ["jetpipe.enqueue"], f"roots: {roots}"
    orphans = [(s.name, s.service) for s in spans if s.parent and s.parent not in ids]
    assert not orphans, f"spans whose parent is not in the trace: {orphans}"
    children: dict[str, list[str]] = {}
    for s in spans:
        if s.parent:
            children.setdefault(ids[s.parent].name, []).append(s.name)
    return children


def the_jobs_trace(spans: list[SpanRow], job_id: int) -> list[SpanRow]:
    [root] = [s for s in spans if s.name == "jetpipe.enqueue" and s.job == job_id]
    return [s for s in spans if s.trace == root.trace]


# ---- in one process: the SDK's in-memory exporter ---------------------------------------------------------
def _rows(exporter: InMemorySpanExporter) -> list[SpanRow]:
    return [SpanRow(format(s.context.trace_id, "032x"), format(s.context.span_id, "016x"),
                    format(s.parent.span_id, "016x") if s.parent else "", s.name, "test",
                    s.attributes.get("jetpipe.job_id")) for s in exporter.get_finished_spans()]


def succeed(task):
    return SuccessResult(pipeline=task.pipeline, source_images=[SourceImageRef(id=task.image_id, url=task.image_url)])


def test_one_jobs_spans_form_one_tree_from_enqueue_to_save(runtime, settings, moth_pipeline, service_factory,
                                                           monkeypatch):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with tracing.use(provider):
        # Given a job of 6 images, dispatched, served by the SDK in results of up to 3 images
        job = fake_job(moth_pipeline, 6)
        dispatch(runtime, job.id)
        service_factory(settings, moth_pipeline, succeed, batch_size=3)
        # When its results are taken and saved until it ends
        take_and_save(runtime, job.id, monkeypatch)
    assert Job.get_by_id(job.id).status == JobStatus.SUCCESS
    # Then its spans form one tree: enqueue -> run_job -> dispatch -> each task's -> take -> save; cleanup
    spans = the_jobs_trace(_rows(exporter), job.id)
    children = one_tree(spans)
    assert {s.name for s in spans} == OVER_NATS
    assert sum(s.name == "jetpipe.service.task" for s in spans) == 6
    assert set(children["jetpipe.enqueue"]) == {"jetpipe.run_job", "jetpipe.cleanup"}
    assert children["jetpipe.run_job"] == ["jetpipe.dispatch"]
    assert set(children["jetpipe.dispatch"]) == {"jetpipe.service.task"}
    assert set(children["jetpipe.service.task"]) == {"jetpipe.take"}
    assert set(children["jetpipe.take"]) <= {"jetpipe.save"} and "jetpipe.save" in children["jetpipe.take"]
    # and the stored root is the enqueue span
    [root] = [s for s in spans if s.name == "jetpipe.enqueue"]
    assert Job.get_by_id(job.id).trace_parent.startswith(f"00-{root.trace}-{root.span}-")


def test_without_traces_nothing_is_stored_and_task_messages_carry_no_trace(runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)
    assert Job.get_by_id(job.id).trace_parent is None

    async def headers() -> list[dict]:
        async with nats_client(runtime.settings.nats_url) as nc:
            js = nc.jetstream()
            return [(await js.get_msg(names.tasks_stream(moth_pipeline), seq)).headers for seq in (1, 2)]

    assert all(tracing.TRACEPARENT not in h for h in runtime.runner.run(headers(), timeout=20))


# ---- across processes: OTLP over HTTP to a receiver the test runs -------------------------------------------
class Receiver(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver (what a collector listens for on :4318/v1/traces), keeping every span."""

    def __init__(self):
        self.spans: list[SpanRow] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", free_port()), _ReceiverHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def arrived(self, job_id: int) -> tuple[set[str], list[str]]:
        """The names of the job's spans that have arrived, and those of the spans whose parent has not.

        Each process exports on its own schedule: a worker's `jetpipe.take` can arrive before the gateway's
        `jetpipe.gateway.result` it answers, so every name being there does not yet mean the tree is whole."""
        with self.lock:
            spans = list(self.spans)
        try:
            trace = the_jobs_trace(spans, job_id)
        except ValueError:  # its root has not arrived yet
            return set(), []
        ids = {s.span for s in trace}
        return {s.name for s in trace}, [s.name for s in trace if s.parent and s.parent not in ids]

    def whole(self, job_id: int) -> bool:
        """Whether the job's trace holds every kind of span, each with its parent."""
        names, waiting = self.arrived(job_id)
        return names >= OVER_HTTP and not waiting


class _ReceiverHandler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self):  # noqa: N802 - the name http.server calls
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        rows = []
        for resource in request.resource_spans:
            service = next(a.value.string_value for a in resource.resource.attributes if a.key == "service.name")
            for scope in resource.scope_spans:
                for span in scope.spans:
                    job = next((a.value.int_value for a in span.attributes if a.key == "jetpipe.job_id"), None)
                    rows.append(SpanRow(span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(), span.name,
                                        service, job))
        with self.server.lock:
            self.server.spans += rows
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def receiver():
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_jobs_trace_crosses_the_cli_the_worker_the_gateway_and_the_service(
        settings, moth_pipeline, trap_images, worker_factory, receiver, tmp_path):
    """The job's trace, exported over OTLP by four processes: the CLI that enqueues it, the worker that runs it
    and saves its results, the web server whose gateway hands its tasks out, and the service that processes
    them through that gateway."""
    Pipeline.update(registered_by="svc").where(Pipeline.slug == moth_pipeline).execute()
    images, _ = trap_images
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    port = free_port()
    env = subprocess_env(settings, PIPELINE_WEB_TOKENS=TOKENS_SETTING, PIPELINE_IMAGE_ROOTS=str(images), **otel)
    logs = open(tmp_path / "processes.log", "ab")
    procs = [subprocess.Popen([sys.executable, "cli.py", *args], cwd=PROJECT, env=env, stdout=logs,
                              stderr=subprocess.STDOUT, start_new_session=True)
             for args in (["web", "--port", str(port)],
                          ["process", "--pipeline", moth_pipeline, "--via", f"http://127.0.0.1:{port}",
                           "--token", TOKENS["svc"][1], "--batch-size", "2"])]
    try:
        worker_factory(settings, threads=2, **otel)
        # When a job of 4 images is enqueued from the command line
        enqueued = subprocess.run([sys.executable, "cli.py", "enqueue-job", "--pipeline", moth_pipeline,
                                   "--images-dir", str(images), "--limit", "4", "--json"], cwd=PROJECT, env=env,
                                  capture_output=True, text=True, timeout=60)
        assert enqueued.returncode == 0, enqueued.stderr
        job_id = json.loads(enqueued.stdout)["id"]
        wait_for(lambda: Job.get_by_id(job_id).status in JobStatus.TERMINAL, timeout_s=90,
                 message=f"job {job_id} to end ({(tmp_path / 'processes.log').read_text(errors='replace')[-2000:]})")
        assert Job.get_by_id(job_id).status == JobStatus.SUCCESS
        # Then its trace holds every step, from each process, as one tree
        # (every process's spans arrived, before the processes are killed)
        wait_for(lambda: receiver.whole(job_id), timeout_s=30,
                 message=f"the job's spans (have, and whose parent has not arrived: {receiver.arrived(job_id)})")
    finally:
        for proc in procs:
            kill_group(proc)
    with receiver.lock:
        spans = the_jobs_trace(receiver.spans, job_id)
    children = one_tree(spans)
    by_service = {}
    for s in spans:
        by_service.setdefault(s.service, set()).add(s.name)
    assert by_service["jetpipe-cli"] == {"jetpipe.enqueue"}
    assert by_service["jetpipe-web"] == {"jetpipe.gateway.hand_out", "jetpipe.gateway.result"}
    assert by_service["jetpipe-service"] == {"jetpipe.service.task"}
    assert {"jetpipe.run_job", "jetpipe.dispatch", "jetpipe.take", "jetpipe.save", "jetpipe.cleanup"} \
        <= by_service["jetpipe-worker"]
    # the path of every image: dispatch -> hand out -> the service's work -> the result -> take -> save
    assert set(children["jetpipe.dispatch"]) == {"jetpipe.gateway.hand_out"}
    assert set(children["jetpipe.gateway.hand_out"]) == {"jetpipe.service.task"}
    assert set(children["jetpipe.service.task"]) == {"jetpipe.gateway.result"}
    assert set(children["jetpipe.gateway.result"]) == {"jetpipe.take"}
    assert "jetpipe.save" in children["jetpipe.take"]
