"""OpenTelemetry tracing and metrics, set up once per process, and the trace across hops.

Spans and metrics are exported over OTLP/gRPC (Jaeger ingests the spans natively; an
OpenTelemetry Collector or Prometheus' OTLP receiver takes the metrics) when
OTEL_EXPORTER_OTLP_ENDPOINT is set; OTEL_METRIC_EXPORT_INTERVAL (ms) sets how often metrics
go. W3C trace context travels in gRPC metadata, so one request makes one trace across all
services.

Why not opentelemetry-instrumentation-grpc: measured on this mesh, its aio interceptors cost
about 0.8 ms of CPU per hop (client plus server), more than the hop itself, and a client
interceptor in grpc.aio wraps every call in extra tasks. Here the server side is one span per
RPC, opened by the service gate (libs/gate.py) with its attributes set once, and the client
side is two metadata entries added to each outbound call (`trace_metadata`, used by
libs/peers.py's channel): no client span, since the peer's server span already records the
hop and its timing. The span names and attributes are the instrumentation's own
(`/package.Service/Method`, rpc.system, rpc.service, rpc.method, rpc.grpc.status_code), so
traces read the same in Jaeger.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from types import MappingProxyType
from typing import Any

import grpc
from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from libs import histograms
from libs.config import TelemetryConfig
from libs.histograms import OtlpReader
from libs.logs import bind_tenant
from libs.metrics import serve_prometheus
from libs.otlp_spans import OtlpSpanExporter
from libs.spans import LeanTracerProvider


@functools.cache
def tracer(name: str, schema_url: str | None = None) -> trace.Tracer:
    """The tracer `name`, taken the first time a span is started (after `setup_tracing`).

    A tracer taken at import time is OpenTelemetry's proxy, which wraps every span it starts
    in one more context manager on top of the SDK's (measured: 4 to 8 us a span, a fifth of a
    span's cost). Before the provider is installed, or with the SDK disabled, this is the proxy
    all the same, and spans cost next to nothing.
    """
    return trace.get_tracer(name, schema_url=schema_url)


# The codes that mean the server failed (OpenTelemetry's rule for gRPC servers): a caller's
# mistake (INVALID_ARGUMENT, NOT_FOUND, ...) leaves the server span unset, not in error.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def setup_tracing(config: TelemetryConfig) -> TracerProvider | None:
    """Install the global tracer provider; export spans only when an OTLP endpoint is set.

    With OTEL_SDK_DISABLED=true nothing is installed: OpenTelemetry's API then hands out
    non-recording spans, which cost next to nothing (the telemetry benchmark's "off").
    """
    if not config.enabled:
        return None
    if not os.environ.get("OTEL_PROPAGATORS"):
        # W3C trace context only: nothing in the mesh uses baggage, and the default composite
        # propagator parses and writes it on every hop.
        propagate.set_global_textmap(TraceContextTextMapPropagator())
    # The SDK's provider, handing out spans that cost a fraction of the SDK's (libs/spans.py).
    provider = LeanTracerProvider(resource=_resource(config))
    if config.otlp_endpoint:
        exporter: SpanExporter
        if config.otlp_protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpSpanExporter,
            )

            exporter = HttpSpanExporter(endpoint=_http_url(config.otlp_endpoint, "traces"))
        else:
            # OpenTelemetry's gRPC exporter with a faster encoder (libs/otlp_spans.py).
            exporter = OtlpSpanExporter(endpoint=config.otlp_endpoint, insecure=True)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def setup_metrics(config: TelemetryConfig) -> MeterProvider | None:
    """Install the global meter provider: Prometheus' /metrics on the service's metrics port
    (libs/metrics.py), OTLP export to the endpoint, or both (`TelemetryConfig.metrics_exporters`:
    each reader aggregates every measurement again, so only what is asked for runs).

    Raises MetricsListenError when the metrics port cannot be bound.
    """
    if not config.enabled:
        return None
    resource = _resource(config)
    readers: list[MetricReader] = []
    exporters = config.metrics_exporters
    if config.otlp_endpoint and "otlp" in exporters:
        exporter: MetricExporter
        if config.otlp_protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter as HttpMetricExporter,
            )

            exporter = HttpMetricExporter(endpoint=_http_url(config.otlp_endpoint, "metrics"))
        else:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            exporter = OTLPMetricExporter(endpoint=config.otlp_endpoint, insecure=True)
        readers.append(OtlpReader(exporter, resource))
    if config.metrics_port and "prometheus" in exporters:
        reader, _server = serve_prometheus(config.metrics_host, config.metrics_port, resource)
        readers.append(reader)
    # No exemplars unless asked for (OTEL_METRICS_EXEMPLAR_FILTER): Prometheus' text format
    # cannot carry them, and offering one on every measurement in a sampled span costs CPU on
    # every request (measured: bench/telemetry.py).
    exemplars = (
        None if os.environ.get("OTEL_METRICS_EXEMPLAR_FILTER") else AlwaysOffExemplarFilter()
    )
    provider = MeterProvider(resource=resource, metric_readers=readers, exemplar_filter=exemplars)
    histograms.enable(provider)
    metrics.set_meter_provider(provider)
    return provider


def _http_url(base: str, signal: str) -> str:
    """OTLP/HTTP's URL for a signal under the endpoint's base URL (as the spec composes it)."""
    return f"{base.rstrip('/')}/v1/{signal}"


def _resource(config: TelemetryConfig) -> Resource:
    """service.name, plus whatever OTEL_RESOURCE_ATTRIBUTES adds (k8s pod names, versions)."""
    created = Resource.create({"service.name": config.service_name})
    return _ProcessResource(dict(created.attributes), created.schema_url)


class _ProcessResource(Resource):
    """The process's resource, hashed once.

    Why: OpenTelemetry's OTLP encoder (the OTLP/HTTP exporter's; the gRPC one uses
    libs/otlp_spans.py) groups the spans of every export by resource, hashing the resource
    once per span, and `Resource.__hash__` serialises all its attributes to JSON
    each time: measured here, encoding a server span took 24.9 us with OpenTelemetry's
    Resource and 19.3 us with this one, in the exporter's thread (docs/BENCHMARKS.md,
    "Telemetry"). A process's resource never changes once built, so its hash is computed when
    it is.
    """

    def __init__(self, attributes: dict[str, Any], schema_url: str | None = None) -> None:
        super().__init__(attributes, schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def set_tenant(tenant: str) -> None:
    """Name the tenant of the request being served: on its span (`shepherd.tenant`, so
    Jaeger can search by tenant) and on every log line it writes (libs/logs.py)."""
    bind_tenant(tenant)
    trace.get_current_span().set_attribute("shepherd.tenant", tenant)


def server_span(
    method: str, metadata: Sequence[tuple[str, str | bytes]] | None
) -> AbstractContextManager[trace.Span]:
    """The span of one RPC this process serves, a child of the caller's span when it sent one.

    `method` is the full gRPC method (`/package.Service/Method`). The span is current inside
    the block, so outbound calls and logs carry its trace (the tracer's context manager,
    returned as it is).
    """
    carrier = {
        key: value
        for key, value in metadata or ()
        if isinstance(value, str) and len(value) <= MAX_TRACE_HEADER
    }
    return tracer("shepherd.grpc").start_as_current_span(
        method,
        context=propagate.extract(carrier),
        kind=SpanKind.SERVER,
        attributes=_rpc_attributes(method),
        record_exception=False,
        set_status_on_exception=False,
    )


@functools.cache
def _rpc_attributes(method: str) -> Mapping[str, str]:
    """A server span's RPC attributes, built once per method (the SDK copies them)."""
    service, _, name = method[1:].rpartition("/")
    return MappingProxyType({"rpc.system": "grpc", "rpc.service": service, "rpc.method": name})


@contextmanager
def http_server_span(method: str, route: str, headers: Mapping[str, str]) -> Iterator[trace.Span]:
    """The span of one HTTP request this process serves (the router's OpenAI-compatible edge),
    a child of the caller's span when it sent `traceparent`.

    Named and attributed as OpenTelemetry's HTTP server conventions say (`POST
    /v1/chat/completions`, http.request.method, http.route); `end_http_status` records the
    response status. Like `server_span`, oversized trace headers are ignored, not parsed.
    """
    carrier = {
        key: value
        for key in ("traceparent", "tracestate")
        if (value := headers.get(key)) is not None and len(value) <= MAX_TRACE_HEADER
    }
    with tracer("shepherd.grpc").start_as_current_span(
        f"{method} {route}",
        context=propagate.extract(carrier),
        kind=SpanKind.SERVER,
        attributes={"http.request.method": method, "http.route": route},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


def end_http_status(span: trace.Span, status: int, message: str = "") -> None:
    """Record an HTTP response's status on its server span; only a 5xx is the server's error."""
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR, f"{status}: {message}"))


# Trace context longer than this is ignored, not parsed: W3C's traceparent is 55 characters
# and tracestate at most 512, and OpenTelemetry logs a warning for every longer value it is
# given, so a caller could otherwise flood the logs with one header.
MAX_TRACE_HEADER = 512


@contextmanager
def child_span(name: str, traceparent: str) -> Iterator[trace.Span]:
    """A span under the trace `traceparent` names (or under the current span when empty).

    For work one RPC does on behalf of several requests (billing's batch of usage records):
    each request's trace shows its own part, not only the trace the batch call carried. When
    `traceparent` names the trace the current span is already in (a batch of one, sent from
    its request's trace), the current span is that part: a second span would only repeat it,
    and each span costs CPU on every request (bench/telemetry.py).
    """
    valid = traceparent and len(traceparent) <= MAX_TRACE_HEADER
    current = trace.get_current_span()
    if valid and current.is_recording() and traceparent[3:35] == _trace_hex(current):
        yield current
        return
    context = propagate.extract({"traceparent": traceparent}) if valid else None
    with tracer("shepherd.grpc").start_as_current_span(name, context=context) as span:
        yield span


def _trace_hex(span: trace.Span) -> str:
    return f"{span.get_span_context().trace_id:032x}"


def end_status(span: trace.Span, code: grpc.StatusCode, message: str = "") -> None:
    """Record how the RPC ended on its server span."""
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}"))


def sampled_trace_headers(context: Context | None = None) -> dict[str, str]:
    """The W3C trace context to send a backend that traces whatever carries one (Triton), or
    nothing when the span is not sampled: Triton ignores the sampled flag, so an unsampled
    request would leave Triton's spans alone in the trace store, and cost Triton the work."""
    span = trace.get_current_span(context)
    if not span.get_span_context().trace_flags.sampled:
        return {}
    headers: dict[str, str] = {}
    propagate.inject(headers, context=context)
    return headers


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The W3C trace context of the current span, as gRPC metadata for an outbound call."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


def current_trace_id() -> str:
    """Return the active trace id as 32 hex digits, or "" outside a trace."""
    span_context = trace.get_current_span().get_span_context()
    return f"{span_context.trace_id:032x}" if span_context.is_valid else ""
