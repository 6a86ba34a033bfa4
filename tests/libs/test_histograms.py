"""libs/histograms.py: the same points as the SDK's histograms, through the SDK's readers."""

from __future__ import annotations

import math
import urllib.request
import uuid
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    MetricsData,
)
from opentelemetry.sdk.resources import Resource

from deploy.local.ports import free_port
from libs import histograms
from libs.metrics import serve_prometheus, stop_prometheus

BOUNDS = (0.5, 1, 2.5, 5, 10)
MEASUREMENTS: list[tuple[float, dict[str, Any]]] = [
    (0.2, {"model": "tiny", "code": 0}),
    (1, {"model": "tiny", "code": 0}),
    (7.5, {"code": 0, "model": "tiny"}),  # the same set, written in another order
    (12.0, {"model": "echo", "code": 0}),
    (3, {}),
]


@pytest.fixture(autouse=True)
def enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(histograms, "_enabled", True)


def _name() -> str:
    return f"test.histogram.{uuid.uuid4().hex[:8]}"


def _points(metric: Metric) -> dict[frozenset[Any], tuple[Any, ...]]:
    points: dict[frozenset[Any], tuple[Any, ...]] = {}
    for point in metric.data.data_points:
        assert isinstance(point, HistogramDataPoint)
        key = frozenset((point.attributes or {}).items())
        points[key] = (
            point.count,
            point.sum,
            tuple(point.bucket_counts),
            tuple(point.explicit_bounds),
            point.min,
            point.max,
        )
    return points


def test_the_points_are_the_sdks_points_for_the_same_measurements() -> None:
    name = _name()
    reader = InMemoryMetricReader()
    sdk = MeterProvider(metric_readers=[reader]).get_meter("shepherd.test")
    theirs = sdk.create_histogram(name, unit="ms", explicit_bucket_boundaries_advisory=BOUNDS)
    ours = histograms.histogram("shepherd.test", name, unit="ms", description="", boundaries=BOUNDS)

    for amount, attributes in MEASUREMENTS:
        theirs.record(amount, attributes)
        ours.record(amount, attributes)

    collected = reader.get_metrics_data()
    assert collected is not None
    (expected,) = collected.resource_metrics[0].scope_metrics[0].metrics
    mine = ours.collect(0)
    assert mine is not None and mine.name == name and mine.unit == "ms"
    assert _points(mine) == _points(expected)
    assert len(_points(mine)) == 3


def test_a_negative_or_non_finite_measurement_is_dropped() -> None:
    ours = histograms.histogram("shepherd.test", _name(), unit="s", description="")
    for amount in (-1.0, math.nan, math.inf):
        ours.record(amount)
    assert ours.collect(0) is None
    ours.record(0.0)
    metric = ours.collect(0)
    assert metric is not None and _points(metric)[frozenset()][0] == 1


def test_nothing_is_kept_before_metrics_are_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the SDK's proxy instruments drop what is recorded before a provider exists (and
    OTEL_SDK_DISABLED=true never enables them)."""
    monkeypatch.setattr(histograms, "_enabled", False)
    ours = histograms.histogram("shepherd.test", _name(), unit="s", description="")
    ours.record(1.0)
    assert ours.collect(0) is None


def test_attribute_sets_past_the_sdks_limit_go_to_the_overflow_set() -> None:
    ours = histograms.histogram("shepherd.test", _name(), unit="s", description="")
    for n in range(histograms.MAX_ATTRIBUTE_SETS + 50):
        ours.record(1.0, {"tenant": f"t{n}"})
    metric = ours.collect(0)
    assert metric is not None
    points = _points(metric)
    assert len(points) == histograms.MAX_ATTRIBUTE_SETS
    assert points[frozenset({("otel.metric.overflow", True)})][0] == 51


def test_asking_twice_gives_the_same_histogram() -> None:
    name = _name()
    first = histograms.histogram("shepherd.test", name, unit="s", description="")
    assert histograms.histogram("shepherd.test", name, unit="s", description="") is first


def test_a_scrape_shows_them_even_where_they_are_the_only_metrics() -> None:
    """Through OpenTelemetry's Prometheus reader and prometheus_client's server, with a real
    HTTP client, in a process like the router whose only metrics are these histograms (the
    SDK hands its readers nothing when none of its own instruments has data)."""
    name = _name()
    resource = Resource.create({"service.name": "router"})
    port = free_port()
    reader, server = serve_prometheus("127.0.0.1", port, resource)
    provider = MeterProvider(resource=resource, metric_readers=[reader])
    try:
        histograms.enable(provider)
        ours = histograms.histogram(
            "shepherd.test", name, unit="ms", description="d", boundaries=BOUNDS
        )
        for amount, attributes in MEASUREMENTS:
            ours.record(amount, attributes)

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    finally:
        provider.shutdown()
        stop_prometheus(server)

    prometheus = name.replace(".", "_")
    lines = [line for line in text.splitlines() if line.startswith(prometheus)]
    tiny = [line for line in lines if 'model="tiny"' in line]
    count = next(line for line in tiny if line.startswith(f"{prometheus}_milliseconds_count"))
    assert count.endswith(" 3.0") and 'otel_scope_name="shepherd.test"' in count
    bucket = next(line for line in tiny if 'le="1"' in line)
    assert bucket.startswith(f"{prometheus}_milliseconds_bucket{{") and bucket.endswith(" 2.0")
    assert any(line.startswith("shepherd_telemetry_histogram_series") for line in text.splitlines())


def test_merged_into_the_providers_collection_under_their_scopes() -> None:
    """Into the scope the provider already has (the scheduler's meter also holds observable
    counters), or a scope of their own."""
    resource = Resource.create({"service.name": "scheduler"})
    reader = InMemoryMetricReader()
    provider = MeterProvider(resource=resource, metric_readers=[reader])
    provider.get_meter("shepherd.merge").create_counter("merge.events").add(1)
    provider_data = reader.get_metrics_data()
    shared, alone = _name(), _name()
    histograms.histogram("shepherd.merge", shared, unit="s", description="").record(1.0)
    histograms.histogram("shepherd.alone", alone, unit="s", description="").record(1.0)

    merged = histograms.with_histograms(provider_data, resource)

    assert merged is not None
    (resource_metrics,) = merged.resource_metrics
    scopes = {
        scope.scope.name: [m.name for m in scope.metrics]
        for scope in resource_metrics.scope_metrics
    }
    assert "merge.events" in scopes["shepherd.merge"] and shared in scopes["shepherd.merge"]
    assert alone in scopes["shepherd.alone"]
    empty = histograms.with_histograms(MetricsData(resource_metrics=[]), resource)
    assert empty is not None and empty.resource_metrics[0].resource is resource
