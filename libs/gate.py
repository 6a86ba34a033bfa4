"""The one server interceptor every Shepherd service runs: access, trace span and errors.

Why one, and why it caches: grpc.aio runs each server interceptor as its own coroutine on
every call, and each wrapping layer adds another coroutine around the servicer. Measured on
this mesh, the three interceptors this replaces (OpenTelemetry's, the access check and the
error mapping) cost more CPU per call than the call itself. Here the servicer's handler is
wrapped once per method and reused, and each call pays for one dictionary lookup, the access
check on its metadata, one span, and one wrapper around the servicer.

For every method but health and reflection (which stay open and untraced, so probes and
`grpcurl list` need no secrets and leave no noise in the trace store):
1. the call is refused, before any servicer code runs, when its metadata lacks the credential
   the AccessPolicy says the method needs;
2. the call runs inside a SERVER span that continues the caller's trace (libs/telemetry.py);
3. a ShepherdError becomes its status and rich details, and anything else INTERNAL with a
   trace id (libs/errors.py), so no servicer needs try/except boilerplate;
4. its duration is recorded by method and status code (`rpc.server.duration`,
   libs/metrics.py), so /metrics shows every method's requests, errors and latency.

The gate also drains the server on shutdown (libs/server.py): it counts the calls in flight,
and once `close()` is called it refuses every new call with UNAVAILABLE ("retry on another
replica", which clients and the router's retry policy treat as retryable) while the calls it
had already let through run to the end; `drain()` waits for them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc

from libs.credentials import OPEN_PREFIXES, AccessPolicy
from libs.errors import ShepherdError, abort
from libs.metrics import RpcMetrics
from libs.telemetry import end_status, server_span

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]
Unary = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
Streaming = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]


class InFlight:
    """How many calls are running, and a way to wait until none is."""

    __slots__ = ("_idle", "count")

    def __init__(self) -> None:
        self.count = 0
        self._idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0 and self._idle is not None:
            self._idle.set()

    async def idle(self) -> None:
        """Return once no call is running."""
        while self.count:
            self._idle = asyncio.Event()
            await self._idle.wait()


class ServiceGate(grpc.aio.ServerInterceptor):
    """Access, tracing and error mapping for every call, in one layer (see the module doc)."""

    def __init__(self, policy: AccessPolicy | None = None, service: str = "the service") -> None:
        self._policy = policy
        self._service = service
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self.inflight = InFlight()
        self._rpc = RpcMetrics()
        self._closed = False

    def close(self) -> None:
        """Refuse every new call from now on (health and reflection stay open)."""
        self._closed = True

    @property
    def closed(self) -> bool:
        """Whether the service is draining: a call multiplexed on an open stream (the
        scheduler's InferMany) is refused as a new call would be, and counted in `inflight`
        while it runs, so `drain` waits for it too."""
        return self._closed

    @property
    def refusal(self) -> str:
        """What a call refused while draining is told."""
        return f"{self._service} is shutting down: retry on another replica"

    def record(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Record the duration of a call multiplexed on a stream, as the gate records a call."""
        self._rpc.record(method, code, seconds)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every call let through has ended; False if some still run at timeout_s."""
        try:
            await asyncio.wait_for(self.inflight.idle(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            found = await continuation(handler_call_details)
            if found is None or method.startswith(OPEN_PREFIXES):
                return found
            handler = self._handlers[method] = _wrap(found, method, self.inflight, self._rpc)
        if self._closed:
            self._rpc.record(method, grpc.StatusCode.UNAVAILABLE, 0.0)
            return refusal_handler(handler, grpc.StatusCode.UNAVAILABLE, self.refusal)
        if self._policy is not None:
            access = self._policy.access(method)
            if access is not None:
                refusal = self._policy.refusal(
                    access,
                    handler_call_details.invocation_metadata,
                )
                if refusal is not None:
                    self._rpc.record(method, refusal[0], 0.0)
                    return refusal_handler(handler, *refusal)
        return handler


def _failure_code(context: grpc.aio.ServicerContext, error: Exception) -> grpc.StatusCode:
    """The status a call that raised `error` ends with (as libs/errors.abort maps it)."""
    if isinstance(error, ShepherdError):
        return error.code
    if isinstance(error, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.INTERNAL


async def _fail(
    context: grpc.aio.ServicerContext,
    error: Exception,
    method: str,
    span: Any,
    code: grpc.StatusCode,
) -> NoReturn:
    """Record how the call failed on its span, then end it with the matching status."""
    if isinstance(error, ShepherdError):
        end_status(span, code, error.message)
    elif isinstance(error, grpc.aio.AbortError):
        end_status(span, code, context.details() or "")
    else:
        end_status(span, code, type(error).__name__)
    await abort(context, error, method)


def _single(behavior: Unary, method: str, inflight: InFlight, rpc: RpcMetrics) -> Unary:
    """A servicer method that answers once, run in a span, its errors mapped, counted, and its
    duration recorded by status code."""

    async def single(request: Any, context: grpc.aio.ServicerContext) -> Any:
        inflight.enter()
        started = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN
        try:
            with server_span(method, context.invocation_metadata()) as span:
                try:
                    response = await behavior(request, context)
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    end_status(span, code)
                    raise
                except Exception as error:
                    code = _failure_code(context, error)
                    await _fail(context, error, method, span, code)
                code = context.code() or grpc.StatusCode.OK
                end_status(span, code)
                return response
        finally:
            inflight.leave()
            rpc.record(method, code, time.perf_counter() - started)

    return single


def _wrap(
    handler: grpc.RpcMethodHandler, method: str, inflight: InFlight, rpc: RpcMetrics
) -> grpc.RpcMethodHandler:
    """`handler` with its servicer run inside a span and its errors mapped to statuses,
    counted in `inflight` while it runs, and its duration recorded by status code."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _single(handler.unary_unary, method, inflight, rpc), **kwargs
        )
    if handler.unary_stream is not None:
        stream: Streaming = handler.unary_stream

        async def unary_stream(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            inflight.enter()
            started = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            try:
                with server_span(method, context.invocation_metadata()) as span:
                    try:
                        async for response in stream(request, context):
                            yield response
                    except (asyncio.CancelledError, GeneratorExit):
                        code = grpc.StatusCode.CANCELLED
                        end_status(span, code)
                        raise
                    except Exception as error:
                        code = _failure_code(context, error)
                        await _fail(context, error, method, span, code)
                    code = context.code() or grpc.StatusCode.OK
                    end_status(span, code)
            finally:
                inflight.leave()
                rpc.record(method, code, time.perf_counter() - started)

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
    if handler.stream_unary is not None:
        # CacheService/Publish (a leader streams its text for its followers): the request is
        # an iterator, the answer one message, so it is wrapped as a unary call is.
        return grpc.stream_unary_rpc_method_handler(
            _single(handler.stream_unary, method, inflight, rpc), **kwargs
        )
    # A bidirectional stream (SchedulerService/InferMany) carries many requests: its servicer
    # gives each its own span, status and duration (services/scheduler/multiplex.py).
    return handler


def refusal_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses every call with `code`."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises; this makes the function a generator

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **kwargs)
