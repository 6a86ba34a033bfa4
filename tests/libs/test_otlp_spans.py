"""libs/otlp_spans.py: the OTLP bytes written by hand are the library's bytes, and they arrive."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import propagate
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as library_encode
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from deploy.local.otlp import OtlpReceiver, Span
from libs.otlp_spans import OtlpSpanExporter, encode_spans
from libs.spans import LeanTracerProvider

REMOTE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _every_kind_of_span(provider: TracerProvider) -> None:
    """Spans using every field OTLP has: each attribute type, events, links, a remote parent
    with trace state, statuses, kinds, an empty name, and two instrumentation scopes."""
    grpc_tracer = provider.get_tracer("shepherd.grpc")
    genai = provider.get_tracer("shepherd.router", "1.2", "https://opentelemetry.io/schemas/1.37.0")
    caller = propagate.extract({"traceparent": REMOTE, "tracestate": "vendor=blue,other=1"})
    attributes: dict[str, Any] = {
        "text": "grpc",
        "empty": "",
        "unicode": "phở",
        "yes": True,
        "no": False,
        "zero": 0,
        "negative": -5,
        "large": 2**62,
        "ratio": 0.25,
        "words": ["a", "b"],
        "numbers": (1, 2, 3),
    }
    with grpc_tracer.start_as_current_span(
        "/shepherd.router.v1.RouterService/Chat",
        context=caller,
        kind=SpanKind.SERVER,
        attributes=attributes,
    ) as server:
        server.add_event("first_token", {"shepherd.ttft_ms": 3.5})
        server.add_event("plain")
        for kind in (SpanKind.CLIENT, SpanKind.PRODUCER, SpanKind.CONSUMER):
            with genai.start_as_current_span(f"child {kind.name}", kind=kind):
                pass
        with genai.start_as_current_span(
            "chat shepherd-echo", links=[Link(server.get_span_context(), {"why": "batch"})]
        ) as chat:
            chat.set_attribute("gen_ai.usage.input_tokens", 7)
            chat.set_status(Status(StatusCode.ERROR, "UNAVAILABLE: node down"))
        server.set_status(StatusCode.OK)
    with grpc_tracer.start_as_current_span("") as root:
        root.set_attribute("raw", b"\x00\xff")


def _finished(provider: TracerProvider) -> list[ReadableSpan]:
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _every_kind_of_span(provider)
    return list(exporter.get_finished_spans())


@pytest.mark.parametrize("provider_class", [TracerProvider, LeanTracerProvider])
def test_the_bytes_are_the_librarys_bytes(provider_class: type[TracerProvider]) -> None:
    """Byte for byte what opentelemetry-exporter-otlp writes for the same spans, from the SDK's
    spans and from Shepherd's lean ones."""
    spans = _finished(provider_class(resource=Resource.create({"service.name": "router"})))
    assert len(spans) == 6

    ours = encode_spans(spans)

    assert ours == library_encode(spans).SerializeToString()
    request = ExportTraceServiceRequest.FromString(ours)
    scopes = request.resource_spans[0].scope_spans
    assert [scope.scope.name for scope in scopes] == ["shepherd.router", "shepherd.grpc"]


def test_spans_of_two_resources_are_grouped_as_the_library_groups_them() -> None:
    spans = _finished(LeanTracerProvider(resource=Resource.create({"service.name": "router"})))
    spans += _finished(LeanTracerProvider(resource=Resource.create({"service.name": "billing"})))
    mixed = [span for pair in zip(spans[:6], spans[6:], strict=True) for span in pair]

    ours = encode_spans(mixed)

    assert ours == library_encode(mixed).SerializeToString()
    assert len(ExportTraceServiceRequest.FromString(ours).resource_spans) == 2


def test_a_value_otlp_cannot_carry_is_left_out_and_logged_like_the_library_does(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Lean spans do not clean attributes when they are set; the encoder drops what OTLP has
    no type for (an int past int64, an object) and keeps the rest of the span."""
    exporter = InMemorySpanExporter()
    provider = LeanTracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span("s") as span:
        span.set_attribute("kept", "yes")
        span.set_attribute("too_big", 2**70)
        span.set_attribute("an_object", object())  # type: ignore[arg-type]
    spans = list(exporter.get_finished_spans())

    with caplog.at_level(logging.ERROR, logger="libs.otlp_spans"):
        ours = encode_spans(spans)

    exported = ExportTraceServiceRequest.FromString(ours).resource_spans[0].scope_spans[0]
    assert [kv.key for kv in exported.spans[0].attributes] == ["kept"]
    assert ours == library_encode(spans).SerializeToString()
    assert {"too_big", "an_object"} <= {r.getMessage().split()[2] for r in caplog.records}


@pytest.fixture
def receiver() -> Iterator[tuple[OtlpReceiver, list[Span]]]:
    received: list[Span] = []
    otlp = OtlpReceiver(received.extend).start()
    try:
        yield otlp, received
    finally:
        otlp.stop()


def test_the_exporter_delivers_the_spans_to_a_real_otlp_receiver(
    receiver: tuple[OtlpReceiver, list[Span]],
) -> None:
    otlp, received = receiver
    provider = LeanTracerProvider(resource=Resource.create({"service.name": "router"}))
    exporter = OtlpSpanExporter(endpoint=otlp.grpc_endpoint, insecure=True, timeout=5)
    spans = _finished(provider)

    assert exporter.export(spans) is SpanExportResult.SUCCESS
    deadline = time.monotonic() + 5
    while len(received) < len(spans) and time.monotonic() < deadline:
        time.sleep(0.02)
    exporter.shutdown()

    by_name = {span.name: span for span in received}
    assert len(by_name) == len(spans)
    server = by_name["/shepherd.router.v1.RouterService/Chat"]
    assert server.service == "router"
    assert server.kind == "server"
    assert server.trace_id == REMOTE.split("-")[1]
    assert server.parent_span_id == REMOTE.split("-")[2]
    assert server.attributes["numbers"] == [1, 2, 3]
    chat = by_name["chat shepherd-echo"]
    assert chat.parent_span_id == server.span_id
    assert chat.links == ((server.trace_id, server.span_id),)
    assert chat.attribute("gen_ai.usage.input_tokens") == 7
