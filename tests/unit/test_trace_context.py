"""Traces are off unless the standard OTEL_* variables ask for them; a trace context passes through a process
that does not trace; log lines name the span they were logged in."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pipeline.errors import ConfigError
from pipeline.infra import logs, tracing

PROJECT = Path(__file__).resolve().parents[2]
PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize("env, on", [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, False),
])
def test_traces_are_exported_only_when_the_standard_variables_ask(env, on):
    assert tracing.configured(env) is on


@pytest.mark.parametrize("env, message", [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "unknown exporter 'zipkin'"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "http/protobuf"),
])
def test_an_exporter_jetpipe_cannot_use_is_named(env, message):
    with pytest.raises(ConfigError, match=message):
        tracing.setup("jetpipe-test", env)


def test_a_process_that_does_not_trace_hands_the_trace_context_on_unchanged():
    with tracing.use(None):
        assert not tracing.exporting()
        with tracing.span("jetpipe.service.task", parent=PARENT):
            assert tracing.traceparent() == PARENT
        assert tracing.traceparent() is None  # and outside any trace there is none
        assert tracing.headers() == {}


def test_a_traced_span_is_the_child_of_its_parent_and_links_the_others():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    other = "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"
    with tracing.use(provider), tracing.span("jetpipe.save", parent=PARENT, links=[other, None, "junk"]) as span:
        assert tracing.exporting()
        assert tracing.traceparent(span).startswith("00-0af7651916cd43dd8448eb211c80319c-")
    [saved] = exporter.get_finished_spans()
    assert format(saved.parent.span_id, "016x") == "b7ad6b7169203331"
    assert [format(link.context.span_id, "016x") for link in saved.links] == ["00f067aa0ba902b7"]


def test_a_failed_step_is_recorded_on_its_span():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with tracing.use(provider):
        spans = [tracing.start("jetpipe.take"), tracing.start("jetpipe.take")]
        with pytest.raises(RuntimeError):
            try:
                raise RuntimeError("database gone")
            finally:
                tracing.end(spans)
    assert [s.status.description for s in exporter.get_finished_spans()] == ["RuntimeError: database gone"] * 2


@pytest.mark.parametrize("value, valid", [(PARENT, True), ("00-abc-def-01", False), ("x\r\nInjected: 1", False),
                                          ("", False), (None, False)])
def test_only_a_well_formed_traceparent_from_a_client_is_used(value, valid):
    assert tracing.first_valid(value, None) == (PARENT if valid else None)


def test_json_log_lines_name_the_span_they_were_logged_in():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    formatter = logs.JsonFormatter()

    def line() -> dict:
        return json.loads(formatter.format(logging.LogRecord("x", logging.INFO, __file__, 1, "job=3 saved", (), None)))

    with tracing.use(provider), tracing.span("jetpipe.save") as span:
        inside = line()
    context = span.get_span_context()
    assert (inside["trace_id"], inside["span_id"]) == (format(context.trace_id, "032x"),
                                                       format(context.span_id, "016x"))
    assert "trace_id" not in line() and "span_id" not in line()


def test_the_cli_names_an_exporter_it_cannot_use_in_one_line():
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "jaeger"}
    proc = subprocess.run([sys.executable, "cli.py", "jobs"], cwd=PROJECT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: OTEL_TRACES_EXPORTER: unknown exporter 'jaeger' (jetpipe exports otlp or "
                                   "console)")
