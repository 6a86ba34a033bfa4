"""The tests' OTLP receiver: deploy/local/otlp.py's real receiver, keeping what it is sent.

Services export to it exactly as they would to Jaeger's OTLP port (spans over gRPC) or a
collector's (metrics), and Triton exports its spans to its OTLP/HTTP endpoint, so a test sees
the spans a person would see in Jaeger, grouped by trace id, and the metric names and points a
dashboard would get.
"""

from __future__ import annotations

import threading
import time

from deploy.local.otlp import Metric, Span
from deploy.local.otlp import OtlpReceiver as _Receiver

ReceivedSpan = Span
ReceivedMetric = Metric


class OtlpReceiver:
    """Runs the receiver on free loopback ports and collects every span and metric."""

    def __init__(self) -> None:
        self._spans: list[Span] = []
        self._metrics: list[Metric] = []
        self._lock = threading.Lock()
        self._receiver = _Receiver(self.add, self.add_metrics)

    @property
    def endpoint(self) -> str:
        """OTLP/gRPC, for the services (OTEL_EXPORTER_OTLP_ENDPOINT)."""
        return self._receiver.grpc_endpoint

    @property
    def http_endpoint(self) -> str:
        """OTLP/HTTP base URL, for Triton (it posts to <base>/v1/traces)."""
        return self._receiver.http_endpoint

    @property
    def refused(self) -> list[str]:
        """OTLP/HTTP exports the receiver could not parse (none, when all is well)."""
        return self._receiver.refused

    def start(self) -> OtlpReceiver:
        self._receiver.start()
        return self

    def stop(self) -> None:
        self._receiver.stop()

    def add(self, spans: list[Span]) -> None:
        with self._lock:
            self._spans.extend(spans)

    def add_metrics(self, metrics: list[Metric]) -> None:
        with self._lock:
            self._metrics.extend(metrics)

    def wait_for_metrics(
        self, service: str, names: set[str], timeout_s: float = 15.0
    ) -> dict[str, list[Metric]]:
        """Wait until every named metric has arrived from `service`; returns them by name."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                found: dict[str, list[Metric]] = {}
                for metric in self._metrics:
                    if metric.service == service:
                        found.setdefault(metric.name, []).append(metric)
            if names <= set(found) or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def spans(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self._spans if s.trace_id == trace_id]

    def wait_for_trace(
        self, trace_id: str, services: set[str], names: set[str], timeout_s: float = 15.0
    ) -> list[Span]:
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
