"""Trace context from callers: what is used, and what is ignored quietly."""

from __future__ import annotations

import logging

import pytest

from libs.telemetry import child_span, server_span

VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_valid_traceparent_parents_the_span() -> None:
    with child_span("billing.record", VALID) as span:
        assert format(span.get_span_context().trace_id, "032x") == VALID.split("-")[1]


def test_an_oversized_trace_header_is_ignored_without_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found by the fuzz: OpenTelemetry logs a warning for each trace header over 512
    characters, so one caller could flood the logs by sending them on every call."""
    huge = VALID + "-" + "f" * 600
    with caplog.at_level(logging.WARNING):
        with child_span("billing.record", huge) as span:
            assert format(span.get_span_context().trace_id, "032x") != VALID.split("-")[1]
        with server_span("/shepherd.router.v1.RouterService/Chat", [("traceparent", huge)]):
            pass
    assert caplog.records == []


def test_the_process_resource_exports_like_opentelemetrys_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The resource hashed once (for the OTLP encoder's grouping) is the same resource: equal
    to, and hashed like, the one OpenTelemetry builds, with OTEL_RESOURCE_ATTRIBUTES merged,
    and a batch of spans is exported under it once."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from libs.config import TelemetryConfig
    from libs.telemetry import _resource

    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=router-0")
    resource = _resource(TelemetryConfig.from_env("router"))
    plain = Resource.create({"service.name": TelemetryConfig.from_env("router").service_name})
    assert resource == plain and hash(resource) == hash(plain)

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    for n in range(3):
        provider.get_tracer("t").start_span(f"s{n}").end()
    request = encode_spans(exporter.get_finished_spans())

    assert len(request.resource_spans) == 1
    attributes = request.resource_spans[0].resource.attributes
    exported = {kv.key: kv.value.string_value for kv in attributes}
    assert exported["service.name"] == plain.attributes["service.name"]
    assert exported["k8s.pod.name"] == "router-0"
    assert len(request.resource_spans[0].scope_spans[0].spans) == 3
