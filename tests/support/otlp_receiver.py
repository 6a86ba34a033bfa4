"""A real OTLP/gRPC receiver for the tests, built on the opentelemetry-proto services.

Services export to it exactly as they would to Jaeger's OTLP port (spans) or a collector's
(metrics), so a test sees the spans a person would see in Jaeger, grouped by trace id, and the
metric names and points a dashboard would get.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from deploy.local.ports import free_port


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as exported, with the service that exported it."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    links: tuple[tuple[str, str], ...]  # (trace id, span id) of each link
    # (key, value) of each attribute; an array value is a tuple of its values.
    attributes: tuple[tuple[str, Any], ...] = ()

    def attribute(self, key: str) -> Any:
        """The value of one attribute, or None when the span does not have it."""
        return dict(self.attributes).get(key)


def _value(value: AnyValue) -> Any:
    """An attribute value as Python: str, int, float, bool, or a tuple for an array."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(item) for item in value.array_value.values)
    return getattr(value, kind) if kind else None


def _service_name(resource: Resource) -> str:
    """The exporting service, from the resource's service.name attribute."""
    return next((a.value.string_value for a in resource.attributes if a.key == "service.name"), "")


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            service = _service_name(resource_spans.resource)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            links=tuple((lk.trace_id.hex(), lk.span_id.hex()) for lk in span.links),
                            attributes=tuple((a.key, _value(a.value)) for a in span.attributes),
                        )
                    )
        self._receiver.add(received)
        return trace_service_pb2.ExportTraceServiceResponse()


@dataclass(frozen=True)
class ReceivedMetric:
    """One exported metric: its service, name and the attributes of each of its points."""

    service: str
    name: str
    points: tuple[dict[str, str], ...]


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(
        self,
        request: metrics_service_pb2.ExportMetricsServiceRequest,
        context: grpc.ServicerContext,
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        received = []
        for resource_metrics in request.resource_metrics:
            service = _service_name(resource_metrics.resource)
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    kind = metric.WhichOneof("data")
                    points = getattr(metric, kind).data_points if kind else []
                    received.append(
                        ReceivedMetric(
                            service=service,
                            name=metric.name,
                            points=tuple(
                                {a.key: a.value.string_value for a in point.attributes}
                                for point in points
                            ),
                        )
                    )
        self._receiver.add_metrics(received)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class OtlpReceiver:
    """Runs the receiver on a free loopback port and collects every span it is sent."""

    def __init__(self) -> None:
        self.port = free_port()
        self._spans: list[ReceivedSpan] = []
        self._metrics: list[ReceivedMetric] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
            _MetricsService(self), self._server
        )
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)

    def add(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self._spans.extend(spans)

    def add_metrics(self, metrics: list[ReceivedMetric]) -> None:
        with self._lock:
            self._metrics.extend(metrics)

    def wait_for_metrics(
        self, service: str, names: set[str], timeout_s: float = 15.0
    ) -> dict[str, list[ReceivedMetric]]:
        """Wait until every named metric has arrived from `service`; returns them by name."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                found: dict[str, list[ReceivedMetric]] = {}
                for metric in self._metrics:
                    if metric.service == service:
                        found.setdefault(metric.name, []).append(metric)
            if names <= set(found) or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def spans(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self._spans if s.trace_id == trace_id]

    def wait_for_trace(
        self, trace_id: str, services: set[str], names: set[str], timeout_s: float = 15.0
    ) -> list[ReceivedSpan]:
        """Wait until spans of `trace_id` from every service and with every name have arrived.

        Each service exports on its own schedule, and a root span ends (and is exported) after
        its children, so waiting for the services alone can return before the root is here.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.spans(trace_id)
            complete = services <= {s.service for s in spans} and names <= {s.name for s in spans}
            if complete or time.monotonic() > deadline:
                return spans
            time.sleep(0.1)
