"""Histograms recorded for a fraction of the OpenTelemetry SDK's cost, exported by its readers.

Why this exists: a request records about ten histogram measurements across the services
(`rpc.server.duration` on every hop, the GenAI client and server durations, token usage, time
to first token and per output token, the scheduler's queue wait), and the SDK's record path
(a `Measurement` per call, its attributes cleaned, copied, and sorted into a key, two locks)
costs about 10 us each when warm and several times that inside a busy service. Measured by
the telemetry benchmark (bench/telemetry.py, concurrency 8): with every SDK histogram record
made a no-op, telemetry's overhead fell from about 16 % to 8 % of the mesh's CPU per request;
half of what the whole operators' view cost was these records. A record here is a frozenset
of the attributes, one dict lookup, a bisect and four additions under one lock: 1.5 us.

What stays OpenTelemetry's: the data model (`opentelemetry.sdk.metrics.export`'s
`HistogramDataPoint`, cumulative as the SDK aggregates it, with min and max), and the readers:
`PrometheusReader` and `OtlpReader` are the SDK's own Prometheus and periodic OTLP readers,
which add these histograms' points to each collection of the meter provider, under the
scope each histogram names, so a scrape reads them exactly as it read the SDK's (the same
names, units, buckets, attributes and `otel_scope_name`). What is given up: views and
exemplars (Shepherd configures neither); the SDK's 2,000 attribute sets per metric is kept.

Records are dropped until `enable(provider)` (called by libs/telemetry.setup_metrics, unless
OTEL_SDK_DISABLED), as the SDK's proxy instruments drop what is recorded before a provider
is installed. Records come from the event loop and collections from the readers' threads:
each histogram has a lock.
"""

from __future__ import annotations

import logging
import math
import threading
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from time import time_ns
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

_log = logging.getLogger(__name__)

# OpenTelemetry's default explicit bucket boundaries (the SDK's, for a histogram with none).
DEFAULT_BOUNDARIES = (
    0.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 2500.0, 5000.0, 7500.0,
    10000.0,
)  # fmt: skip
# The SDK's cardinality limit per metric, and the attribute set that takes the overflow.
MAX_ATTRIBUTE_SETS = 2000
_OVERFLOW = {"otel.metric.overflow": True}

_histograms: dict[tuple[str, str], Histogram] = {}
_registry_lock = threading.Lock()
_enabled = False


def enable(provider: MeterProvider) -> None:
    """Start keeping measurements, collected by `provider`'s readers (the readers below).

    Also counts, on `provider`, the attribute sets these histograms hold
    (`shepherd.telemetry.histogram.series`): a cardinality guard for operators, and an
    instrument of the provider's own that reports at every collection, since the SDK hands its
    readers nothing at all when none of its instruments has data (a router's only metrics are
    these histograms).
    """
    global _enabled
    _enabled = True
    provider.get_meter("shepherd.telemetry").create_observable_gauge(
        "shepherd.telemetry.histogram.series",
        callbacks=[_series],
        unit="{series}",
        description="Attribute sets held by the process's histograms (at most 2,000 each).",
    )


def _series(_options: CallbackOptions) -> list[Observation]:
    return [Observation(sum(len(h._points) for h in list(_histograms.values())))]


class _Point:
    """One attribute set's cumulative aggregation."""

    __slots__ = ("attributes", "count", "counts", "high", "low", "start_ns", "total")

    def __init__(self, attributes: Mapping[str, Any], buckets: int) -> None:
        self.attributes = dict(attributes)
        self.start_ns = time_ns()
        self.counts = [0] * buckets
        self.count = 0
        self.total = 0.0
        self.low = math.inf
        self.high = -math.inf


class Histogram:
    """A histogram instrument: `record` a non-negative value with its attributes."""

    def __init__(
        self,
        name: str,
        *,
        unit: str,
        description: str,
        scope: InstrumentationScope,
        boundaries: Sequence[float] | None = None,
    ) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self.scope = scope
        # Kept as given, as the SDK keeps them: Prometheus' `le` label prints 1 and 1.0 apart.
        self.boundaries = tuple(boundaries or DEFAULT_BOUNDARIES)
        if list(self.boundaries) != sorted(set(self.boundaries)):
            raise ValueError(f"{name}: bucket boundaries must increase: {boundaries}")
        self._points: dict[Any, _Point] = {}
        self._lock = threading.Lock()
        self._warned = False

    def record(self, amount: float, attributes: Mapping[str, Any] | None = None) -> None:
        """Add one measurement; a negative or non-finite one is dropped (as the SDK does)."""
        if not _enabled:
            return
        if not 0 <= amount < math.inf:
            if not self._warned:
                self._warned = True
                _log.warning("histogram %s dropped a measurement of %r", self.name, amount)
            return
        try:
            key = frozenset(attributes.items()) if attributes else None
        except TypeError:  # an unhashable value (a list): its text identifies the set
            key = frozenset((k, repr(v)) for k, v in attributes.items()) if attributes else None
        with self._lock:
            point = self._points.get(key)
            if point is None:
                point = self._new_point(key, attributes or {})
            point.counts[bisect_left(self.boundaries, amount)] += 1
            point.count += 1
            point.total += amount
            if amount < point.low:
                point.low = amount
            if amount > point.high:
                point.high = amount

    def _new_point(self, key: Any, attributes: Mapping[str, Any]) -> _Point:
        if len(self._points) >= MAX_ATTRIBUTE_SETS - 1:
            key, attributes = "overflow", _OVERFLOW
            if key in self._points:
                return self._points[key]
        point = self._points[key] = _Point(attributes, len(self.boundaries) + 1)
        return point

    def collect(self, now_ns: int) -> Metric | None:
        """The histogram's cumulative points now, or None before its first measurement."""
        with self._lock:
            points = [
                HistogramDataPoint(
                    attributes=dict(point.attributes),
                    start_time_unix_nano=point.start_ns,
                    time_unix_nano=now_ns,
                    count=point.count,
                    sum=point.total,
                    bucket_counts=tuple(point.counts),
                    explicit_bounds=self.boundaries,
                    min=point.low,
                    max=point.high,
                    exemplars=[],
                )
                for point in self._points.values()
            ]
        if not points:
            return None
        data = HistogramData(
            data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE
        )
        return Metric(name=self.name, description=self.description, unit=self.unit, data=data)


def histogram(
    scope: str,
    name: str,
    *,
    unit: str,
    description: str,
    boundaries: Sequence[float] | None = None,
    schema_url: str | None = None,
) -> Histogram:
    """The histogram `name` under the instrumentation scope `scope` (the one that
    `metrics.get_meter(scope, schema_url=...)` names for the SDK's instruments). Asking again
    returns the same histogram, as the SDK returns the same instrument."""
    with _registry_lock:
        found = _histograms.get((scope, name))
        if found is None:
            found = _histograms[(scope, name)] = Histogram(
                name,
                unit=unit,
                description=description,
                scope=InstrumentationScope(scope, None, schema_url),
                boundaries=boundaries,
            )
        return found


def with_histograms(data: MetricsData | None, resource: Resource) -> MetricsData | None:
    """The meter provider's collection `data` plus every histogram's points, each under its
    scope (merged into the scope's metrics when the provider has that scope too)."""
    now = time_ns()
    by_scope: dict[InstrumentationScope, list[Metric]] = {}
    for instrument in list(_histograms.values()):
        metric = instrument.collect(now)
        if metric is not None:
            by_scope.setdefault(instrument.scope, []).append(metric)
    if not by_scope:
        return data
    if data is None or not data.resource_metrics:
        data = MetricsData(resource_metrics=[ResourceMetrics(resource, [], resource.schema_url)])
    first, *rest = data.resource_metrics
    scopes: list[ScopeMetrics] = []
    for present in first.scope_metrics:
        extra = by_scope.pop(present.scope, [])
        if extra:
            present = ScopeMetrics(present.scope, [*present.metrics, *extra], present.schema_url)
        scopes.append(present)
    for scope, metrics in by_scope.items():
        scopes.append(ScopeMetrics(scope, metrics, scope.schema_url or ""))
    merged = ResourceMetrics(first.resource, scopes, first.schema_url)
    return MetricsData(resource_metrics=[merged, *rest])


class _WithHistograms(MetricReader):
    """A reader that hands on each of the provider's collections with the histograms added."""

    _resource: Resource

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        merged = with_histograms(metrics_data, self._resource)
        if merged is not None:
            # The concrete reader's own (this class is only ever mixed in before one).
            super()._receive_metrics(merged, timeout_millis, **kwargs)  # type: ignore[safe-super]


class PrometheusReader(_WithHistograms, PrometheusMetricReader):
    """OpenTelemetry's Prometheus reader, reading these histograms with the provider's metrics."""

    def __init__(self, resource: Resource) -> None:
        super().__init__()
        self._resource = resource


class OtlpReader(_WithHistograms, PeriodicExportingMetricReader):
    """OpenTelemetry's periodic OTLP reader, exporting these histograms with the provider's."""

    def __init__(self, exporter: Any, resource: Resource) -> None:
        self._resource = resource
        super().__init__(exporter)
