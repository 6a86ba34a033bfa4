"""The one server bootstrap every Shepherd service runs on.

It follows grpc's asyncio examples: build the server, register the service, add the standard
health service and reflection (so `grpcurl list` works), start, flip health to SERVING, and on
SIGTERM or SIGINT flip health to NOT_SERVING with `enter_graceful_shutdown()`, stop accepting,
let in-flight calls finish within the grace period, and only then close the clients the
service was given.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import redis.asyncio as redis
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from libs.config import ConfigError, ServerConfig, TelemetryConfig
from libs.credentials import AccessInterceptor, Credentials, token_interceptors
from libs.errors import ErrorInterceptor
from libs.logs import setup_logging
from libs.telemetry import client_interceptors, server_interceptors, setup_metrics, setup_tracing

_log = logging.getLogger(__name__)

Cleanup = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Binding:
    """One gRPC service to serve: its generated `add_*_to_server`, servicer and descriptor."""

    add: Callable[[Any, grpc.aio.Server], None]
    servicer: object
    service: ServiceDescriptor


_CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
)

# Clients reconnect every few minutes, so replicas added by an autoscaler behind a Kubernetes
# Service start receiving traffic from long-lived peer channels too. The server accepts the
# peers' 30 s keepalive pings instead of answering them with GOAWAY (too_many_pings).
_SERVER_OPTIONS = (
    ("grpc.max_connection_age_ms", 300_000),
    ("grpc.max_connection_age_grace_ms", 30_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)


def setup_process(telemetry: TelemetryConfig) -> None:
    """Set up logging, tracing and metrics before anything else is created."""
    setup_logging(telemetry.service_name, telemetry.log_level)
    setup_tracing(telemetry)
    setup_metrics(telemetry)


def open_redis(url: str, timeout_s: float, max_connections: int = 256) -> redis.Redis:
    """Create the shared Redis client with explicit timeouts on every command.

    The pool blocks (up to the timeout) when all connections are busy, instead of failing
    with "Too many connections" the moment a burst exceeds the pool.
    """
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
    return redis.Redis.from_pool(pool)


# The calls the interceptor chain of the current unary call has started (see _CancelOuter).
_STARTED: contextvars.ContextVar[list[grpc.aio.Call]] = contextvars.ContextVar("shepherd_calls")


class _CancelOuter(grpc.aio.UnaryUnaryClientInterceptor):
    """Cancels the RPC when the caller of an intercepted unary call cancels it.

    OpenTelemetry's aio client interceptor awaits the call's status inside the interceptor
    chain, so cancelling the intercepted call (the caller's task was cancelled, or
    `call.cancel()`) only interrupts that wait: without this, the RPC itself goes on, and the
    peer keeps working for a caller that has gone. The chain runs in one task, so the
    innermost interceptor hands the real call up through a context variable.
    """

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        started: list[grpc.aio.Call] = []
        reset = _STARTED.set(started)
        try:
            return await continuation(client_call_details, request)
        except asyncio.CancelledError:
            for call in started:
                call.cancel()
            raise
        finally:
            _STARTED.reset(reset)


class _CancelInner(grpc.aio.UnaryUnaryClientInterceptor):
    """Records the real call for _CancelOuter; it must be the last interceptor."""

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        call = await continuation(client_call_details, request)
        started = _STARTED.get(None)
        if started is not None:
            started.append(call)
        return call


def open_channel(address: str, credentials: Credentials) -> grpc.aio.Channel:
    """Open a traced channel to a peer service that sends the service token on every call.

    Call once at start-up and share it. Cancelling a call on it cancels the RPC.
    """
    return grpc.aio.insecure_channel(
        address,
        options=_CHANNEL_OPTIONS,
        interceptors=[
            _CancelOuter(),
            *client_interceptors(),
            *token_interceptors(credentials),
            _CancelInner(),
        ],
    )


async def run_server(
    config: ServerConfig,
    bindings: Sequence[Binding],
    cleanups: Sequence[Cleanup] = (),
    access: AccessInterceptor | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain gracefully and run `cleanups` in order.

    `access`, when given, refuses calls without the credential their method needs (the
    internal services); the router authenticates its callers' API keys itself.
    """
    guards = [access] if access is not None else []
    server = grpc.aio.server(
        interceptors=[*server_interceptors(), *guards, ErrorInterceptor()],
        options=_SERVER_OPTIONS,
    )
    service_names = []
    for binding in bindings:
        binding.add(binding.servicer, server)
        service_names.append(binding.service.full_name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            *service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    if server.add_insecure_port(config.address) == 0:
        raise OSError(f"{config.service} could not listen on {config.address}: is the port in use?")
    await server.start()
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _log.info("serving", extra={"address": config.address, "services": service_names})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    _log.info("shutting down", extra={"grace_s": config.grace_s})
    await health_servicer.enter_graceful_shutdown()
    await server.stop(config.grace_s)
    for cleanup in cleanups:
        try:
            await cleanup()
        except Exception:
            _log.exception("cleanup failed")
    _log.info("stopped")
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()  # flushes spans still buffered for the OTLP exporter


def main(serve: Callable[[], Awaitable[None]]) -> None:
    """Run a service's `serve()`; a configuration error ends it with one clear line, exit 2."""
    try:
        asyncio.run(serve())
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def outbound_timeout(context: grpc.aio.ServicerContext, cap_s: float) -> float:
    """The timeout for a call made on behalf of `context`: its remaining deadline, at most cap_s.

    Every outbound call gets an explicit deadline; when the caller gave one, the peer sees
    what is left of it, so no service works on a request its caller has given up on.
    """
    remaining = context.time_remaining()
    if remaining is None:
        return cap_s
    return max(0.0, min(cap_s, remaining))
