"""libs/spans.py: lean spans read like the SDK's, follow the sampler, and end for good."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from libs.spans import LeanSpan, LeanTracerProvider

SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
NOT_SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


class _Counting(IdGenerator):
    """Ids 1, 2, 3...: the same spans get the same ids under either provider."""

    def __init__(self) -> None:
        self._next = 0

    def _id(self) -> int:
        self._next += 1
        return self._next

    def generate_span_id(self) -> int:
        return self._id()

    def generate_trace_id(self) -> int:
        return self._id()


def _provider(
    provider_class: type[TracerProvider], sampler: Sampler | None = None
) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = provider_class(sampler=sampler, id_generator=_Counting(), shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _request(provider: TracerProvider) -> None:
    """What a service does with spans while serving one request, including a failure."""
    tracer = provider.get_tracer("shepherd.test", schema_url="https://example.test/schema")
    caller = propagate.extract({"traceparent": SAMPLED})
    with tracer.start_as_current_span(
        "/shepherd.router.v1.RouterService/Chat",
        context=caller,
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc"},
        start_time=1_000,
    ) as server:
        server.set_attributes({"rpc.method": "Chat", "shepherd.tenant": "acme"})
        server.add_event("first_token", {"n": 1}, timestamp=2_000)
        with tracer.start_as_current_span(
            "scheduler.batch", links=[Link(server.get_span_context(), {"k": "v"})], start_time=3_000
        ) as batch:
            batch.update_name("scheduler.batch tiny")
            batch.end(4_000)
        with pytest.raises(ValueError):
            with tracer.start_as_current_span("fails", start_time=5_000):
                raise ValueError("bad prompt")
        server.set_status(StatusCode.OK)
        server.set_status(Status(StatusCode.ERROR, "ignored: OK is final"))
        server.end(9_000)


def _readable(span: ReadableSpan) -> dict[str, Any]:
    """Everything an exporter reads, but times set by the clock and the stack trace (which
    names the tracer's own frames)."""
    return {
        "name": span.name,
        "context": span.context,
        "parent": span.parent,
        "kind": span.kind,
        "start": span.start_time if span.name != "fails" else None,
        "end": span.end_time if span.name != "fails" else None,
        "attributes": dict(span.attributes or {}),
        "events": [
            (
                event.name,
                {k: v for k, v in (event.attributes or {}).items() if k != "exception.stacktrace"},
                event.timestamp if event.name != "exception" else None,
            )
            for event in span.events
        ],
        "links": [(link.context, dict(link.attributes or {})) for link in span.links],
        "status": (span.status.status_code, span.status.description),
        "resource": span.resource.attributes,
        "scope": span.instrumentation_scope,
        "dropped": (span.dropped_attributes, span.dropped_events, span.dropped_links),
    }


def test_lean_spans_read_like_the_sdks_spans() -> None:
    sdk, sdk_spans = _provider(TracerProvider)
    lean, lean_spans = _provider(LeanTracerProvider)

    _request(sdk)
    _request(lean)

    finished = lean_spans.get_finished_spans()
    assert all(isinstance(span, LeanSpan) for span in finished)
    expected = [_readable(span) for span in sdk_spans.get_finished_spans()]
    assert [_readable(span) for span in finished] == expected
    failed = next(span for span in finished if span.name == "fails")
    assert failed.status.description == "ValueError: bad prompt"
    assert "exception.stacktrace" in (failed.events[0].attributes or {})


def test_a_span_is_current_inside_its_block_and_gives_the_trace_to_outbound_calls() -> None:
    provider, _ = _provider(LeanTracerProvider)
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("outer") as outer:
        assert trace.get_current_span() is outer
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        context = outer.get_span_context()
        assert carrier["traceparent"] == f"00-{context.trace_id:032x}-{context.span_id:016x}-01"
    assert trace.get_current_span() is not outer


def test_a_cancellation_is_not_recorded_as_an_error() -> None:
    """OpenTelemetry's rule: only an Exception marks the span; a BaseException (the task being
    cancelled, a generator closed) ends it as it is."""
    provider, exporter = _provider(LeanTracerProvider)
    with pytest.raises(asyncio.CancelledError):
        with provider.get_tracer("t").start_as_current_span("cancelled"):
            raise asyncio.CancelledError
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.UNSET and not span.events


def test_an_ended_span_no_longer_changes() -> None:
    provider, exporter = _provider(LeanTracerProvider)
    span = provider.get_tracer("t").start_span("s", attributes={"a": 1})
    span.end()
    span.set_attribute("a", 2)
    span.set_attributes({"b": 3})
    span.add_event("late")
    span.set_status(StatusCode.ERROR)
    span.update_name("renamed")
    span.end()

    (exported,) = exporter.get_finished_spans()
    assert exported.name == "s" and dict(exported.attributes or {}) == {"a": 1}
    assert not exported.events and exported.status.status_code is StatusCode.UNSET
    assert not span.is_recording()


@pytest.mark.parametrize(
    ("sampler", "traceparent", "recorded", "sampled"),
    [
        (None, "", True, True),
        (None, SAMPLED, True, True),
        (None, NOT_SAMPLED, False, False),
        (ParentBased(ALWAYS_OFF), "", False, False),
        (ParentBased(ALWAYS_OFF), SAMPLED, True, True),
        (ALWAYS_OFF, SAMPLED, False, False),
    ],
)
def test_the_providers_sampler_decides(
    sampler: Sampler | None, traceparent: str, recorded: bool, sampled: bool
) -> None:
    """The default sampler (parent-based, always on) and any other the operator configures
    (OTEL_TRACES_SAMPLER) decide as they do for the SDK's own spans."""
    provider, exporter = _provider(LeanTracerProvider, sampler)
    context = propagate.extract({"traceparent": traceparent}) if traceparent else None
    with provider.get_tracer("t").start_as_current_span("s", context=context) as span:
        span.set_attribute("a", 1)
        child_flags = span.get_span_context().trace_flags

    assert span.is_recording() is False
    assert child_flags.sampled is sampled
    assert len(exporter.get_finished_spans()) == (1 if recorded else 0)
    if traceparent:
        assert span.get_span_context().trace_id == int(SAMPLED.split("-")[1], 16)


@pytest.mark.parametrize("make", [LeanTracerProvider, TracerProvider])
def test_a_disabled_sdk_hands_out_no_op_tracers(
    monkeypatch: pytest.MonkeyPatch, make: Callable[..., TracerProvider]
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    with make().get_tracer("t").start_as_current_span("s") as span:
        assert not span.is_recording()
