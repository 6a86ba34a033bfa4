"""Prometheus' /metrics on every service, and the RPC metrics the service gate records.

Every service serves its metrics at `http://<SHEPHERD_HOST>:<SHEPHERD_<SERVICE>_METRICS_PORT>/metrics`
(9461 router, 9462 scheduler, 9463 cache, 9464 billing by default; 0 turns it off) in
Prometheus' text format. It is OpenTelemetry's Prometheus reader over the process's one meter
provider (plus libs/histograms.py's histograms), registered in prometheus_client's default
registry, so one scrape also returns the process' CPU, memory and garbage-collector figures.
The same instruments go out over OTLP as well when OTEL_EXPORTER_OTLP_ENDPOINT is set. The
endpoint is a small threaded HTTP server of prometheus_client's, off the event loop: a scrape
never delays a request.

Names become Prometheus names the exporter's way: dots become underscores, the unit is
appended (`s` -> `_seconds`, `ms` -> `_milliseconds`; `{...}` annotations are dropped), and
counters get `_total`. So `gen_ai.server.time_to_first_token` (s) is scraped as
`gen_ai_server_time_to_first_token_seconds_bucket`.

Cardinality stays bounded: attributes are methods the server registered, status codes,
models and deployments from the catalog, tenants, and outcomes from fixed sets; never request
ids, keys or prompts. Each metric is also capped at 2,000 attribute sets (the SDK's limit,
kept by libs/histograms.py).

RPC metrics follow the RPC semantic conventions as OpenTelemetry's gRPC instrumentation
emits them (semconv v1.37.0 and before): `rpc.server.duration` in milliseconds, with
`rpc.system`, `rpc.service`, `rpc.method` and `rpc.grpc.status_code`, the same attributes
as the SERVER spans (libs/telemetry.py). Its count by status code is requests by status.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

import grpc
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource

from libs.histograms import PrometheusReader, histogram

RPC_SERVER_DURATION = "rpc.server.duration"
RPC_BUCKETS_MS = (
    0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000,
)  # fmt: skip


class MetricsListenError(OSError):
    """The /metrics port cannot be bound."""


def serve_prometheus(host: str, port: int, resource: Resource) -> tuple[MetricReader, WSGIServer]:
    """A Prometheus reader for the meter provider (and libs/histograms.py's histograms), and
    the HTTP server that serves it."""
    from prometheus_client import start_http_server

    try:
        server, _thread = start_http_server(port, addr=host)
    except OSError as error:
        raise MetricsListenError(f"cannot serve /metrics on {host}:{port} ({error})") from None
    return PrometheusReader(resource), server


def stop_prometheus(server: WSGIServer) -> None:
    """Stop the /metrics server (tests and clean shutdowns)."""
    threading.Thread(target=server.shutdown, daemon=True).start()
    server.server_close()


class RpcMetrics:
    """`rpc.server.duration` per method and status code, for the gate (libs/gate.py).

    The attribute dictionaries are built once per (method, code) and reused, so a call costs
    one histogram record.
    """

    def __init__(self) -> None:
        self._duration = histogram(
            "shepherd.rpc",
            RPC_SERVER_DURATION,
            unit="ms",
            description="Measures the duration of inbound RPC.",
            boundaries=RPC_BUCKETS_MS,
        )
        self._attributes: dict[tuple[str, grpc.StatusCode], dict[str, str | int]] = {}

    def record(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """One call of `method` (`/package.Service/Method`) ended with `code` after `seconds`."""
        attributes = self._attributes.get((method, code))
        if attributes is None:
            service, _, name = method[1:].rpartition("/")
            attributes = self._attributes[(method, code)] = {
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": name,
                "rpc.grpc.status_code": code.value[0],
            }
        self._duration.record(seconds * 1000.0, attributes)
