"""OpenTelemetry tracing and metrics, set up once per process.

Spans and metrics are exported over OTLP/gRPC (Jaeger ingests the spans natively; an
OpenTelemetry Collector or Prometheus' OTLP receiver takes the metrics) when
OTEL_EXPORTER_OTLP_ENDPOINT is set; OTEL_METRIC_EXPORT_INTERVAL (ms) sets how often metrics
go. W3C trace context travels in gRPC metadata through the
OpenTelemetry gRPC interceptors installed on every server and client channel, so one request
makes one trace across all services.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.instrumentation.grpc import filters as grpc_filters
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from libs.config import TelemetryConfig

# Health probes and reflection calls are noise in a trace store: they are never traced.
_SKIP = grpc_filters.negate(
    grpc_filters.any_of(
        grpc_filters.health_check(),
        grpc_filters.service_prefix("grpc.reflection"),
    )
)


def setup_tracing(config: TelemetryConfig) -> TracerProvider:
    """Install the global tracer provider; export spans only when an OTLP endpoint is set."""
    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
    if config.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=True)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def setup_metrics(config: TelemetryConfig) -> MeterProvider:
    """Install the global meter provider; export metrics only when an OTLP endpoint is set."""
    readers = []
    if config.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter(endpoint=config.otlp_endpoint, insecure=True)
        readers.append(PeriodicExportingMetricReader(exporter))
    provider = MeterProvider(
        resource=Resource.create({"service.name": config.service_name}), metric_readers=readers
    )
    metrics.set_meter_provider(provider)
    return provider


def server_interceptors() -> Sequence[grpc.aio.ServerInterceptor]:
    """Interceptors that continue the caller's trace in every RPC a server handles."""
    return [aio_server_interceptor(filter_=_SKIP)]


def client_interceptors() -> Sequence[grpc.aio.ClientInterceptor]:
    """Interceptors that carry the current trace to the peer in gRPC metadata."""
    return list(aio_client_interceptors(filter_=_SKIP))


def current_trace_id() -> str:
    """Return the active trace id as 32 hex digits, or "" outside a trace."""
    span_context = trace.get_current_span().get_span_context()
    return f"{span_context.trace_id:032x}" if span_context.is_valid else ""
