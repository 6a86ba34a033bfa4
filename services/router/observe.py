"""What one chat leaves behind for operators: a GenAI span, GenAI client metrics, an access line.

The chat pipeline (pipeline.py) is wrapped by `ChatObserver.observe`, so every transport that
runs it (gRPC Chat and ChatStream, an HTTP edge) gets the same three, once per request:

* a CLIENT span `chat {requested model}` (OpenTelemetry's GenAI conventions, libs/genai.py),
  current while the pipeline runs, so the cache, scheduler and billing hops are its children.
  It carries the request's parameters, the response model, usage, finish reason and where the
  answer ran (gen_ai.*), plus Shepherd's own: request id, cost, cache hit, placement, TTFT;
* the client metrics `gen_ai.client.operation.duration` and `gen_ai.client.token.usage`.
  Their model attribute is the catalog's name for the model, never the caller's raw string
  (an unknown name is `_OTHER`), so a caller cannot grow the metric's label sets;
* one JSON access line at INFO on logger `shepherd.access`: method, status, latency, model,
  tokens, cost, cache_hit and placement, with the trace id and tenant every line carries
  (libs/logs.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from libs import genai
from libs.catalog import Catalog, Model
from libs.errors import ShepherdError
from libs.telemetry import tracer

if TYPE_CHECKING:
    from services.router.pipeline import ChatEvent, ChatLike, Ending

_access = logging.getLogger("shepherd.access")


_duration = genai.histogram("shepherd.router", genai.CLIENT_OPERATION_DURATION)
_tokens = genai.histogram("shepherd.router", genai.CLIENT_TOKEN_USAGE)
# The requested model on the span, cut to this length (it is the caller's string).
_MAX_MODEL_CHARS = 128
_OTHER = "_OTHER"  # error.type's and an unknown model's fallback value, as the conventions say


class ChatObserver:
    """Observes chats through the pipeline: see the module docstring."""

    def __init__(self, catalog: Catalog) -> None:
        from services.router.pipeline import Text  # the pipeline imports this module

        self._text = Text
        self._catalog = catalog
        self._providers = genai.deployment_providers(
            d for model in catalog.models.values() for d in model.deployments
        )

    def _model(self, name: str) -> Model | None:
        canonical = self._catalog.aliases.get(name.strip().lower())
        return self._catalog.models.get(canonical) if canonical else None

    async def observe(
        self,
        events: AsyncIterator[ChatEvent],
        request: ChatLike,
        method: str,
        operation: str = genai.OPERATION_CHAT,
    ) -> AsyncIterator[ChatEvent]:
        """Yield the pipeline's `events` unchanged, inside the chat's span; see the module."""
        started = time.perf_counter()
        model = self._model(request.model)
        requested = request.model[:_MAX_MODEL_CHARS]
        attributes: dict[str, Any] = {
            genai.OPERATION_NAME: operation,
            genai.REQUEST_MODEL: requested,
        }
        params = request.params  # as the caller sent them: 0 means the default
        if params.max_tokens:
            attributes[genai.REQUEST_MAX_TOKENS] = params.max_tokens
        attributes[genai.REQUEST_TEMPERATURE] = params.temperature
        if params.top_p:
            attributes[genai.REQUEST_TOP_P] = params.top_p
        if params.HasField("seed"):
            attributes[genai.REQUEST_SEED] = params.seed
        span = tracer("shepherd.router", genai.SCHEMA_URL).start_span(
            genai.chat_span_name(requested, operation), kind=SpanKind.CLIENT, attributes=attributes
        )
        ending: Ending | None = None
        first_token_s: float | None = None
        code = grpc.StatusCode.OK
        error_type = ""
        try:
            with trace.use_span(span, end_on_exit=False):
                async for event in events:
                    if isinstance(event, self._text):
                        if first_token_s is None and event.text:
                            first_token_s = time.perf_counter() - started
                    else:
                        ending = event
                    yield event
        except ShepherdError as error:
            code, error_type = error.code, error.code.name
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code, error_type = grpc.StatusCode.CANCELLED, grpc.StatusCode.CANCELLED.name
            raise
        except Exception as error:
            code, error_type = grpc.StatusCode.INTERNAL, type(error).__name__
            raise
        finally:
            self._finish(
                span,
                method,
                operation,
                model,
                requested,
                ending,
                code,
                error_type,
                started,
                first_token_s,
            )

    def _finish(
        self,
        span: trace.Span,
        method: str,
        operation: str,
        model: Model | None,
        requested: str,
        ending: Ending | None,
        code: grpc.StatusCode,
        error_type: str,
        started: float,
        first_token_s: float | None,
    ) -> None:
        seconds = time.perf_counter() - started
        if ending is not None and ending.placement.deployment:
            provider = genai.provider_of(ending.placement, self._providers)
        elif model is not None:
            primary = model.deployments[0]
            provider = genai.PROVIDER_TRITON if primary.kind == "triton" else primary.provider
        else:
            provider = genai.PROVIDER_UNPLACED
        metric_attributes: dict[str, Any] = {
            genai.OPERATION_NAME: operation,
            genai.PROVIDER_NAME: provider,
            genai.REQUEST_MODEL: model.name if model is not None else _OTHER,
        }
        span.set_attribute(genai.PROVIDER_NAME, provider)
        line: dict[str, Any] = {
            "method": method,
            "status": code.name,
            "latency_ms": round(seconds * 1000.0, 3),
            "model": model.name if model is not None else requested,
        }
        if ending is not None:
            usage, placement = ending.usage, ending.placement
            response_model = placement.backend_model or ending.model
            finish = genai.FINISH_REASONS.get(ending.finish_reason, "unknown")
            metric_attributes[genai.RESPONSE_MODEL] = response_model
            span_attributes: dict[str, Any] = {
                genai.RESPONSE_MODEL: response_model,
                genai.RESPONSE_FINISH_REASONS: (finish,),
                genai.USAGE_INPUT_TOKENS: usage.prompt_tokens,
                genai.USAGE_OUTPUT_TOKENS: usage.completion_tokens,
                "shepherd.request_id": ending.request_id,
                "shepherd.cost.nano_usd": ending.cost.nano_usd,
                "shepherd.cache_hit": ending.cache_hit,
                "shepherd.placement.deployment": placement.deployment,
            }
            if ending.coalesced:
                span_attributes["shepherd.coalesced"] = True
            if placement.spilled_over:
                span_attributes["shepherd.placement.spilled_over"] = True
            span.set_attributes(span_attributes)
            line.update(
                request_id=ending.request_id,
                finish_reason=finish,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cost_nano_usd=ending.cost.nano_usd,
                cache_hit=ending.cache_hit,
                placement=placement.deployment,
                node=placement.node,
            )
            if usage.prompt_tokens or usage.completion_tokens:
                input_attributes = {**metric_attributes, genai.TOKEN_TYPE: genai.TOKEN_INPUT}
                output_attributes = {**metric_attributes, genai.TOKEN_TYPE: genai.TOKEN_OUTPUT}
                _tokens.record(usage.prompt_tokens, input_attributes)
                _tokens.record(usage.completion_tokens, output_attributes)
        if first_token_s is not None:
            span.set_attribute("shepherd.ttft_ms", round(first_token_s * 1000.0, 3))
        if error_type:
            metric_attributes[genai.ERROR_TYPE] = error_type
            span.set_attribute(genai.ERROR_TYPE, error_type)
            span.set_status(Status(StatusCode.ERROR, code.name))
        _duration.record(seconds, metric_attributes)
        span.end()
        _access.info("access", extra=line)
