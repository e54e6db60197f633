"""OpenTelemetry traces of jetpipe's work: one trace per job, from its enqueue to its last save.

Off unless configured with the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) or `OTEL_TRACES_EXPORTER=otlp|console`; `OTEL_SDK_DISABLED=true` or
`OTEL_TRACES_EXPORTER=none` turn them off again. `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER` and the `OTEL_BSP_*` batching variables mean what they mean everywhere.

How one job's spans hang together (docs/operations.md, "Traces"):
- `jetpipe.enqueue` is the job's root; its W3C `traceparent` is kept on the job row, so every later step,
  in whichever process, joins the same trace (`jetpipe.run_job`, `jetpipe.save`, `jetpipe.cleanup`);
- each `jetpipe.dispatch` round puts its `traceparent` on the task messages it publishes; a processing
  service makes its span for a task a child of it and puts its own on the result message
  (docs/processing-services.md, "Traces"); the worker's `jetpipe.take` of that message is the child of it,
  and the `jetpipe.save` of the message the child of its take.

Spans are made through the OpenTelemetry API, so where no provider is installed they cost next to nothing and
a `traceparent` passes through unchanged (a service that does not trace still hands its task's context on).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

#: The W3C trace context header, on task and result messages and on HTTP requests.
TRACEPARENT = "traceparent"
#: The instrumentation scope of every jetpipe span.
SCOPE = "jetpipe"
#: Links one span carries at most (a save of 500 result messages links to the first 32 of their takes).
MAX_LINKS = 32

_propagator = TraceContextTextMapPropagator()
#: The provider spans go to: the one `setup` or `use` installed here, else OpenTelemetry's global one (which
#: an application embedding the SDK may have configured itself).
_provider: TracerProvider | None = None


def configured(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the standard OTEL_* variables ask for traces to be exported."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(exporter or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup(service_name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Export this process's spans as the OTEL_* variables say (as `service_name` unless OTEL_SERVICE_NAME
    names it); True if it now does. Once per process; ConfigError for an exporter or protocol it cannot use."""
    global _provider
    env = os.environ if environ is None else environ
    if _provider is not None or not configured(env):
        return _provider is not None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporters = [name.strip().lower() for name in (env.get("OTEL_TRACES_EXPORTER") or "otlp").split(",")]
    resource = Resource.create({} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name})
    provider = SdkTracerProvider(resource=resource)
    for name in exporters:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    _provider = provider
    trace.set_tracer_provider(provider)  # for libraries that trace through the global API
    log.info("traces: exporting as %s through %s", resource.attributes.get(SERVICE_NAME), ", ".join(exporters))
    return True


def _exporter(name: str, env: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ConfigError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (jetpipe exports otlp or console)")
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol != "http/protobuf":
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: jetpipe exports OTLP over http/protobuf "
                          "(a collector listens for it on port 4318)")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout and compression from the OTEL_* variables


@contextlib.contextmanager
def use(provider: TracerProvider | None) -> Iterator[None]:
    """Send spans to `provider` within the block (tests: an in-memory exporter's)."""
    global _provider
    before, _provider = _provider, provider
    try:
        yield
    finally:
        _provider = before


def shutdown() -> None:
    """Export what is still buffered (a process about to exit)."""
    shut = getattr(_provider, "shutdown", None)
    if shut is not None:
        shut()


def exporting() -> bool:
    """Whether spans made here go anywhere (a provider installed here or by the application embedding jetpipe):
    a step may skip reading what only a span would use."""
    return _provider is not None or not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def tracer() -> trace.Tracer:
    return (_provider or trace.get_tracer_provider()).get_tracer(SCOPE)


def _context(traceparent: str | None) -> otel_context.Context | None:
    return _propagator.extract({TRACEPARENT: traceparent}) if traceparent else None


def first_valid(*traceparents: str | None) -> str | None:
    """The first of these that is a well-formed `traceparent` (one from a client may be anything)."""
    for value in traceparents:
        if value and trace.get_current_span(_context(value)).get_span_context().is_valid:
            return value
    return None


def _links(traceparents: Sequence[str | None]) -> list[Link]:
    links = []
    for traceparent in traceparents:
        if traceparent:
            linked = trace.get_current_span(_context(traceparent)).get_span_context()
            if linked.is_valid:
                links.append(Link(linked))
        if len(links) >= MAX_LINKS:
            break
    return links


@contextlib.contextmanager
def span(name: str, *, parent: str | None = None, attributes: Mapping[str, Any] | None = None,
         links: Sequence[str | None] = (), kind: SpanKind = SpanKind.INTERNAL) -> Iterator[Span]:
    """A span, current within the block, as the child of `parent` (a `traceparent`) if given, else of the
    current span. An exception leaving the block is recorded on it.

    Where nothing is traced (no parent, no current span, no exporter) there is no span to make: the block runs
    as it is (a step per task or per saving pays nothing for tracing that is off)."""
    if not wanted(parent):
        yield trace.INVALID_SPAN
        return
    with tracer().start_as_current_span(name, context=_context(parent), kind=kind, attributes=attributes,
                                        links=_links(links)) as current:
        yield current


def wanted(parent: str | None) -> bool:
    """Whether a span made here, as the child of `parent` (a `traceparent`, or None), would be part of a trace: a
    caller may skip what only the span would use (its attributes) when it would not."""
    return parent is not None or exporting() or in_span()


def start(name: str, *, parent: str | None = None, attributes: Mapping[str, Any] | None = None,
          kind: SpanKind = SpanKind.INTERNAL) -> Span:
    """A span the caller ends (`span.end()`), not made current: one of many open at once."""
    return tracer().start_span(name, context=_context(parent), kind=kind, attributes=attributes)


def end(spans: Sequence[Span]) -> None:
    """End spans from `start`, an exception being handled (if any) recorded on each."""
    error = sys.exc_info()[1]
    for each in spans:
        if error is not None and each.is_recording():
            each.record_exception(error)
            each.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:500]))
        each.end()


def traceparent(of: Span | None = None) -> str | None:
    """The `traceparent` of `of` (default: the current span); None where there is no trace."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(of) if of is not None else None)
    return carrier.get(TRACEPARENT)


def headers(of: Span | None = None) -> dict[str, str]:
    """`{"traceparent": ...}` of `of` (default: the current span) for a message or a request; {} if none."""
    value = traceparent(of)
    return {TRACEPARENT: value} if value else {}


def in_span() -> bool:
    """Whether the caller runs within a span of a trace (a job's step called by another one)."""
    return trace.get_current_span().get_span_context().is_valid


def ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span in hex, for log lines; None outside any trace."""
    current = trace.get_current_span().get_span_context()
    if not current.is_valid:
        return None
    return format(current.trace_id, "032x"), format(current.span_id, "016x")
