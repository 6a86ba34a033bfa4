"""A real OTLP receiver: traces and metrics over gRPC and over HTTP (protobuf or JSON).

Why both transports: Shepherd's services export OTLP over gRPC (port 4317 in Jaeger and the
Collector), but Triton's OpenTelemetry tracer speaks only OTLP over HTTP (port 4318,
`POST /v1/traces`), and it sends JSON (`application/json`, ids in hex) where the Python
exporters send protobuf (`application/x-protobuf`). This receiver takes all of them, so a
request's trace (the services' spans and Triton's) can be seen without Jaeger: the local
trace collector (deploy/local/traces.py, which `make run` starts) and the tests
(tests/support/otlp_receiver.py) are built on it, and it is built on the opentelemetry-proto
service definitions, as Jaeger's receiver is.

Received spans are handed to a callback as `Span` values; metrics to another, as `Metric`.
"""

from __future__ import annotations

import base64
import gzip
import json
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from deploy.local.ports import LOCALHOST, free_ports

# OTLP span kinds (opentelemetry.proto.trace.v1.Span.SpanKind), by number.
KINDS = {0: "", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
# OTLP status codes (Status.StatusCode), by number.
STATUSES = {0: "", 1: "ok", 2: "error"}


@dataclass(frozen=True)
class Span:
    """One span as exported, with the service that exported it."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str = ""
    start_ns: int = 0
    end_ns: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)
    links: tuple[tuple[str, str], ...] = ()  # (trace id, span id) of each link
    status: str = ""  # "", "ok" or "error"
    status_message: str = ""
    events: tuple[tuple[str, int], ...] = ()  # (name, time ns)

    def attribute(self, key: str) -> Any:
        """One attribute's value, None when the span has none; an array is a tuple."""
        value = self.attributes.get(key)
        return tuple(value) if isinstance(value, list) else value

    @property
    def duration_ms(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e6

    def to_json(self) -> str:
        """One line of the span store (deploy/local/traces.py)."""
        return json.dumps(
            {
                "service": self.service,
                "name": self.name,
                "trace_id": self.trace_id,
                "span_id": self.span_id,
                "parent_span_id": self.parent_span_id,
                "kind": self.kind,
                "start_ns": self.start_ns,
                "end_ns": self.end_ns,
                "attributes": self.attributes,
                "links": self.links,
                "status": self.status,
                "status_message": self.status_message,
                "events": self.events,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, line: str) -> Span:
        data = json.loads(line)
        data["links"] = tuple(tuple(link) for link in data.get("links", ()))
        data["events"] = tuple(tuple(event) for event in data.get("events", ()))
        return cls(**data)


@dataclass(frozen=True)
class Metric:
    """One exported metric: its service, name and the attributes of each of its points."""

    service: str
    name: str
    points: tuple[dict[str, str], ...]


def value_of(value: AnyValue) -> Any:
    """An OTLP attribute value as plain Python."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value_of(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def attributes_of(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {pair.key: value_of(pair.value) for pair in pairs}


def service_name(resource: Resource) -> str:
    """The exporting service, from the resource's service.name attribute."""
    return next((a.value.string_value for a in resource.attributes if a.key == "service.name"), "")


def spans_of(request: trace_service_pb2.ExportTraceServiceRequest) -> list[Span]:
    received = []
    for resource_spans in request.resource_spans:
        service = service_name(resource_spans.resource)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                received.append(
                    Span(
                        service=service,
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        kind=KINDS.get(span.kind, ""),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes=attributes_of(span.attributes),
                        links=tuple((lk.trace_id.hex(), lk.span_id.hex()) for lk in span.links),
                        status=STATUSES.get(span.status.code, ""),
                        status_message=span.status.message,
                        events=tuple((e.name, e.time_unix_nano) for e in span.events),
                    )
                )
    return received


def metrics_of(request: metrics_service_pb2.ExportMetricsServiceRequest) -> list[Metric]:
    received = []
    for resource_metrics in request.resource_metrics:
        service = service_name(resource_metrics.resource)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                kind = metric.WhichOneof("data")
                points = getattr(metric, kind).data_points if kind else []
                received.append(
                    Metric(
                        service=service,
                        name=metric.name,
                        points=tuple(
                            {a.key: str(value_of(a.value)) for a in point.attributes}
                            for point in points
                        ),
                    )
                )
    return received


# OTLP/JSON writes trace and span ids as hex; protobuf's JSON mapping expects base64 for bytes.
_ID_FIELDS = frozenset({"traceId", "spanId", "parentSpanId"})


def _ids_to_base64(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            key: (
                base64.b64encode(bytes.fromhex(value)).decode()
                if key in _ID_FIELDS and isinstance(value, str)
                else _ids_to_base64(value)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_ids_to_base64(item) for item in node]
    return node


def parse_otlp(body: bytes, content_type: str, message: Message) -> None:
    """Fill `message` from an OTLP/HTTP body, protobuf or JSON (raises ValueError if bad)."""
    try:
        if content_type.split(";")[0].strip().lower() == "application/json":
            json_format.ParseDict(
                _ids_to_base64(json.loads(body)), message, ignore_unknown_fields=True
            )
        else:
            message.ParseFromString(body)
    except (DecodeError, json_format.ParseError, ValueError) as error:
        raise ValueError(f"not an OTLP {type(message).__name__}: {error}") from None


SpanSink = Callable[[list[Span]], None]
MetricSink = Callable[[list[Metric]], None]


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: SpanSink) -> None:
        self._sink = sink

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._sink(spans_of(request))
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, sink: MetricSink) -> None:
        self._sink = sink

    def Export(
        self,
        request: metrics_service_pb2.ExportMetricsServiceRequest,
        context: grpc.ServicerContext,
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        self._sink(metrics_of(request))
        return metrics_service_pb2.ExportMetricsServiceResponse()


def _http_handler(
    spans: SpanSink, metrics: MetricSink, refused: list[str]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        """POST /v1/traces and /v1/metrics, as OTLP/HTTP defines them."""

        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if (self.headers.get("Content-Encoding") or "").lower() == "gzip":
                body = gzip.decompress(body)
            content_type = self.headers.get("Content-Type") or "application/x-protobuf"
            request: Message
            response: Message
            try:
                if self.path == "/v1/traces":
                    request = trace_service_pb2.ExportTraceServiceRequest()
                    parse_otlp(body, content_type, request)
                    spans(spans_of(request))
                    response = trace_service_pb2.ExportTraceServiceResponse()
                elif self.path == "/v1/metrics":
                    request = metrics_service_pb2.ExportMetricsServiceRequest()
                    parse_otlp(body, content_type, request)
                    metrics(metrics_of(request))
                    response = metrics_service_pb2.ExportMetricsServiceResponse()
                else:
                    self._answer(404, "text/plain", b"only /v1/traces and /v1/metrics\n")
                    return
            except ValueError as error:
                refused.append(f"{self.path}: {error}")
                print(f"refused an OTLP export to {self.path}: {error}", file=sys.stderr)
                self._answer(400, "text/plain", f"{error}\n".encode())
                return
            if content_type.startswith("application/json"):
                self._answer(200, "application/json", json_format.MessageToJson(response).encode())
            else:
                self._answer(200, "application/x-protobuf", response.SerializeToString())

        def _answer(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per export would drown the collector's own output

    return Handler


class OtlpReceiver:
    """OTLP over gRPC on `grpc_port` and over HTTP on `http_port` (free ports when 0)."""

    def __init__(
        self,
        spans: SpanSink,
        metrics: MetricSink | None = None,
        *,
        host: str = LOCALHOST,
        grpc_port: int = 0,
        http_port: int = 0,
    ) -> None:
        spare = iter(free_ports(2, host))
        self.host = host
        self.grpc_port = grpc_port or next(spare)
        self.http_port = http_port or next(spare)
        metric_sink: MetricSink = metrics if metrics is not None else (lambda _metrics: None)
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(spans), self._grpc)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
            _MetricsService(metric_sink), self._grpc
        )
        if self._grpc.add_insecure_port(f"{host}:{self.grpc_port}") == 0:
            raise OSError(f"cannot receive OTLP/gRPC on {host}:{self.grpc_port}: port in use?")
        # Exports refused as malformed (400), for tests and the collector's log.
        self.refused: list[str] = []
        self._http = ThreadingHTTPServer(
            (host, self.http_port), _http_handler(spans, metric_sink, self.refused)
        )
        self._http.daemon_threads = True
        self._http_thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def grpc_endpoint(self) -> str:
        """What OTEL_EXPORTER_OTLP_ENDPOINT is set to for the services."""
        return f"http://{self.host}:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """The OTLP/HTTP base URL; traces go to <base>/v1/traces (Triton's exporter)."""
        return f"http://{self.host}:{self.http_port}"

    def start(self) -> OtlpReceiver:
        self._grpc.start()
        self._http_thread.start()
        return self

    def stop(self) -> None:
        self._grpc.stop(grace=None)
        self._http.shutdown()
        self._http.server_close()
