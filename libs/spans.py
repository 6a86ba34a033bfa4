"""Spans recorded at a fraction of the OpenTelemetry SDK's cost, exported by its own pipeline.

Why this exists: a request leaves about five spans in the mesh, and the SDK's span machinery
(a lock and bounded attributes per span, a second `ReadableSpan` copy at the end, the
processor fan-out) made spans the largest part of what telemetry costs (docs/BENCHMARKS.md,
"Telemetry"). Measured on this machine with the SDK 1.45 (`make bench-spans`: a server span
and a chat span with their attributes), the SDK spends 48 us of the event loop's CPU on the
pair when warm and 256 us after a 5 ms idle pause (what every hop sees at concurrency 1),
against 13 and 115 us here.

What stays OpenTelemetry's: the API (`opentelemetry.trace`: context, `use_span`, propagators,
`get_current_span`), the provider's sampler (OTEL_TRACES_SAMPLER is honoured) and id
generator, its span processors (`BatchSpanProcessor` queues these spans as they are) and the
OTLP exporters. `LeanSpan` is both an API `Span` and an SDK `ReadableSpan`, so whatever reads a
finished SDK span reads these.

What is given up, on purpose:
- no span limits (OTEL_SPAN_*_LIMIT): every attribute is set by Shepherd's own code, from
  values it has validated and bounded;
- no per-span lock: a span is written by the one event-loop task that owns it, and read by
  the exporter's thread only after `end()`, which also makes it immutable;
- attribute values are not cleaned at `set_attribute` time; the encoder (libs/otlp_spans.py)
  skips a value OTLP cannot carry, as the SDK's encoder does.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping, Sequence
from time import time_ns
from types import TracebackType
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.context import Context, attach, detach
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import DEFAULT_ON, Sampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.util.types import Attributes, AttributeValue

_UNSET = Status(StatusCode.UNSET)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)


class LeanSpan(trace_api.Span, ReadableSpan):
    """A recording span: the API's `Span` for the code that writes it, the SDK's `ReadableSpan`
    for the processors and exporters that read it once it has ended."""

    # Narrower than ReadableSpan's, which serve spans of any kind: a started span has both.
    _context: SpanContext
    _attributes: dict[str, Any]

    def __init__(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        links: tuple[Link, ...],
        start_time: int,
        resource: Resource,
        scope: InstrumentationScope,
        processor: SpanProcessor,
    ) -> None:
        # ReadableSpan's fields, set directly: its __init__ would build a Resource when none
        # is given, and every property reads these names.
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes = attributes
        self._events: list[Event] = []
        self._links = links
        self._start_time = start_time
        self._end_time: int | None = None
        self._status = _UNSET
        self._resource = resource
        self._instrumentation_scope = scope
        self._instrumentation_info = None
        self._processor = processor

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._end_time is None:
            self._attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        if self._end_time is None:
            self._attributes.update(attributes)

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._end_time is None:
            self._events.append(Event(name, attributes, timestamp or time_ns()))

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        if self._end_time is None and context.is_valid:
            self._links = (*self._links, Link(context, attributes))

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """The SDK's rule: OK is final, and UNSET never overwrites."""
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if not isinstance(status, Status):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """The SDK's exception event, with the same attributes."""
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        event: dict[str, AttributeValue] = {
            "exception.type": qualname if module in ("", "builtins") else f"{module}.{qualname}",
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event.update(attributes)
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is None:
            self._end_time = end_time or time_ns()
            self._processor.on_end(self)


class LeanTracer(trace_api.Tracer):
    """Starts `LeanSpan`s; sampling and ids are the provider's."""

    def __init__(
        self,
        provider: LeanTracerProvider,
        scope: InstrumentationScope,
    ) -> None:
        self._sampler: Sampler = provider.sampler
        self._ids: IdGenerator = provider.id_generator
        self._resource = provider.resource
        self._processor: SpanProcessor = provider._active_span_processor
        self._scope = scope

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace_api.Span:
        parent: SpanContext | None = trace_api.get_current_span(context).get_span_context()
        if parent is not None and parent.is_valid:
            trace_id = parent.trace_id
        else:
            parent = None
            trace_id = self._ids.generate_trace_id()
        links = tuple(link for link in links or () if link.context.is_valid)
        if self._sampler is DEFAULT_ON:
            # The default sampler's decision (parent-based, always on at the root), without
            # its three context lookups: follow the parent's flag, sample a new trace, and
            # record only what is sampled.
            sampled = parent is None or parent.trace_flags.sampled
            trace_state = parent.trace_state if parent is not None else None
            recorded = (dict(attributes) if attributes else {}) if sampled else None
        else:
            result = self._sampler.should_sample(context, trace_id, name, kind, attributes, links)
            sampled = result.decision.is_sampled()
            trace_state = result.trace_state
            recorded = dict(result.attributes) if result.decision.is_recording() else None
        span_context = SpanContext(
            trace_id,
            self._ids.generate_span_id(),
            is_remote=False,
            trace_flags=_SAMPLED if sampled else _NOT_SAMPLED,
            trace_state=trace_state,
        )
        if recorded is None:
            return trace_api.NonRecordingSpan(span_context)
        span = LeanSpan(
            name,
            span_context,
            parent,
            kind,
            recorded,
            links,
            start_time or time_ns(),
            self._resource,
            self._scope,
            self._processor,
        )
        # Processors read a started span as the SDK's; none of the SDK's own processors reads
        # anything `LeanSpan` lacks.
        self._processor.on_start(span, parent_context=context)  # type: ignore[arg-type]
        return span

    def start_as_current_span(  # type: ignore[override]  # a class, not the API's generator
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> _CurrentSpan:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        return _CurrentSpan(span, end_on_exit, record_exception, set_status_on_exception)


class _CurrentSpan:
    """`use_span` as a class: the span current inside the block, ended on the way out, and an
    exception recorded as OpenTelemetry's `use_span` records it (an `Exception`, not a
    `BaseException` such as a cancellation). A class, not a generator, because the services
    open several of these per request and a generator-based context manager costs more."""

    __slots__ = ("_end", "_record", "_set_status", "_span", "_token")

    def __init__(self, span: trace_api.Span, end: bool, record: bool, set_status: bool) -> None:
        self._span = span
        self._end = end
        self._record = record
        self._set_status = set_status
        self._token: object = None

    def __enter__(self) -> trace_api.Span:
        self._token = attach(set_span_in_context(self._span))
        return self._span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        detach(self._token)  # type: ignore[arg-type]
        span = self._span
        if isinstance(exc, Exception) and span.is_recording():
            if self._record:
                span.record_exception(exc)
            if self._set_status:
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        if self._end:
            span.end()


class LeanTracerProvider(TracerProvider):
    """The SDK's provider (processors, sampler, resource, shutdown) handing out `LeanTracer`s."""

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes = None,
    ) -> trace_api.Tracer:
        if self._disabled:
            return trace_api.NoOpTracer()
        scope = InstrumentationScope(
            instrumenting_module_name or "",
            instrumenting_library_version or "",
            schema_url,
            attributes,
        )
        return LeanTracer(self, scope)
