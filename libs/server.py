"""The one server bootstrap every Shepherd service runs on.

It follows grpc's asyncio examples: build the server, register the service, add the standard
health service (libs/health.py: liveness, and readiness that follows the service's hard
dependencies, re-checked about once a second) and reflection (so `grpcurl list` works), and
start. On SIGTERM or SIGINT it drains:

1. the service gate (libs/gate.py) refuses every new call with UNAVAILABLE, "retry on
   another replica";
2. readiness turns NOT_SERVING (liveness stays SERVING), so load balancers and probes send
   new work elsewhere;
3. each call the gate had already let through is served to the end, for up to `grace_s`
   (SHEPHERD_SHUTDOWN_GRACE_S);
4. the server stops with a short grace, for a call that arrived just as the gate closed;
5. the clients the service was given are closed, in order.

A service may serve more than gRPC from the same process and event loop: an `Edge` (the
router's OpenAI-compatible HTTP edge, services/router/http_edge.py). Edges start with the
server, stop accepting when the gate closes, and drain within the same grace period.

Why not only `server.stop(grace)`: grpc stops taking calls at once and cancels the calls it
had received but not yet handed to the application, so under load calls a router had
accepted ended CANCELLED the moment SIGTERM arrived.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import redis.asyncio as redis
import uvloop
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from libs.config import ConfigError, ServerConfig, TelemetryConfig
from libs.credentials import AccessPolicy
from libs.gate import ServiceGate
from libs.health import Health, Probe, RedisProbe
from libs.logs import setup_logging
from libs.metrics import MetricsListenError
from libs.tasks import set_fatal_handler
from libs.telemetry import setup_metrics, setup_tracing

_log = logging.getLogger(__name__)

Cleanup = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Binding:
    """One gRPC service to serve: its generated `add_*_to_server`, servicer and descriptor."""

    add: Callable[[Any, grpc.aio.Server], None]
    servicer: object
    service: ServiceDescriptor


class Edge(Protocol):
    """Another front door of the service, served in the same process and event loop.

    The gRPC server and its edges share everything behind them (the router's pipeline) with
    no extra hop, and shut down together: `start` binds (raising ListenError when it cannot)
    and serves; `close` stops accepting connections and refuses new requests on open ones
    ("retry on another replica"); `drain` waits for the requests it had accepted, up to
    `timeout_s` (False if some still run then); `stop` ends whatever is left, giving a request
    that arrived just as the edge closed about as long as the gRPC server gives its calls.
    """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def drain(self, timeout_s: float) -> bool: ...

    async def stop(self) -> None: ...

    @property
    def inflight(self) -> int: ...


# Clients reconnect every few minutes, so replicas added by an autoscaler behind a Kubernetes
# Service start receiving traffic from long-lived peer channels too. The server accepts the
# peers' 30 s keepalive pings instead of answering them with GOAWAY (too_many_pings).
_SERVER_OPTIONS = (
    # One server per port: without this, gRPC sets SO_REUSEPORT, and a second service started
    # on a port in use (a second `make run`) also "comes up" and splits the traffic.
    ("grpc.so_reuseport", 0),
    ("grpc.max_connection_age_ms", 300_000),
    ("grpc.max_connection_age_grace_ms", 30_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)


def setup_process(telemetry: TelemetryConfig) -> None:
    """Set up logging, tracing and metrics (with /metrics) before anything else is created."""
    setup_logging(telemetry.service_name, telemetry.log_level)
    setup_tracing(telemetry)
    try:
        setup_metrics(telemetry)
    except MetricsListenError as error:
        service = telemetry.service_name.removeprefix("shepherd-")
        raise ListenError(
            f"{error}: is the port in use? (set SHEPHERD_{service.upper()}_METRICS_PORT to"
            " another port, or 0 to serve no /metrics)"
        ) from None
    if telemetry.enabled and telemetry.metrics_port:
        _log.info(
            "serving /metrics",
            extra={"address": f"{telemetry.metrics_host}:{telemetry.metrics_port}"},
        )


# Once the server has drained (or the grace period is over), what grpc itself still gives a
# call that arrived just as the gate closed, and an edge a request that did.
STOP_GRACE_S = 1.0


def open_redis(url: str, timeout_s: float, max_connections: int = 256) -> redis.Redis:
    """Create the shared Redis client with explicit timeouts on every command.

    The pool blocks (up to the timeout) when all connections are busy, instead of failing
    with "Too many connections" the moment a burst exceeds the pool.

    A command that fails with a connection error (a pooled connection that a Redis restart
    closed: "Connection closed by server", a reset, a refused reconnect) is sent once more,
    at once, on a fresh connection, so the first command after a restart does not fail. Only
    connection errors, never timeouts: a timed-out command may still be running on the
    server, and repeating it would double the wait. A command that did reach the server
    before its connection broke (its reply lost) may run twice, so every write through this
    client must be idempotent: SET/HSET/DEL, and Lua scripts keyed by request id. After a
    restart the command never reached the new server, so the retry is always safe there.
    redis-py's Script reloads a script the restarted server no longer has (NOSCRIPT).
    `health_check_interval` (a PING before reusing an idle connection) is not used: it costs
    a round trip on every request after a pause, and the retry covers the same case.
    """
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,)),
    )
    return redis.Redis.from_pool(pool)


def text(reply: bytes | str) -> str:
    """A Redis reply as text: our clients return bytes, redis-py's types allow either."""
    return reply.decode() if isinstance(reply, bytes) else reply


def redis_probe(url: str) -> RedisProbe:
    """A readiness probe of the Redis at `url`: PING on its own connection, 0.5 s timeout."""
    return RedisProbe(open_redis(url, 0.5, max_connections=1))


async def run_server(
    config: ServerConfig,
    bindings: Sequence[Binding],
    cleanups: Sequence[Cleanup] = (),
    access: AccessPolicy | None = None,
    readiness: Sequence[Probe] = (),
    edges: Sequence[Edge] = (),
    gate: ServiceGate | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain gracefully and run `cleanups` in order.

    `access`, when given, refuses calls without the credential their method needs (the
    internal services); the router authenticates its callers' API keys itself. Every call
    goes through the one ServiceGate (libs/gate.py): access, trace span, error mapping,
    draining. `readiness` are the service's hard dependencies (libs/health.py); the server
    closes them. A fatal background task (libs/tasks.py) stops the service like SIGTERM
    does, and then `run_server` raises ServiceFailure. `edges` are served alongside (see
    `Edge`) and drained with the gRPC calls. `gate` is the service's own ServiceGate when
    its servicer needs one too (one that multiplexes calls on a stream); else one is made.
    """
    if gate is None:
        gate = ServiceGate(access, config.service)
    server = grpc.aio.server(interceptors=[gate], options=_SERVER_OPTIONS)
    service_names = []
    for binding in bindings:
        binding.add(binding.servicer, server)
        service_names.append(binding.service.full_name)
    health = Health(service_names, readiness)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        [
            *service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    try:
        bound = server.add_insecure_port(config.address)
    except RuntimeError:  # grpc raises when it cannot bind at all
        bound = 0
    if bound == 0:
        await health.close()
        raise ListenError(
            f"{config.service} could not listen on {config.address}: is the port in use? (set"
            f" SHEPHERD_{config.service.upper()}_PORT to another port, or stop what holds it)"
        )

    stop = asyncio.Event()
    failures: list[str] = []

    def fail(reason: str) -> None:
        failures.append(reason)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    set_fatal_handler(fail)
    started: list[Edge] = []
    try:
        await health.start()
        for edge in edges:
            await edge.start()  # before gRPC: once the launcher sees SERVING, every door is open
            started.append(edge)
        await server.start()
        _log.info("serving", extra={"address": config.address, "services": service_names})
        await stop.wait()

        def inflight() -> int:
            return gate.inflight.count + sum(edge.inflight for edge in started)

        _log.info("shutting down", extra={"grace_s": config.grace_s, "calls_in_flight": inflight()})
        deadline = loop.time() + config.grace_s
        gate.close()  # first: once a probe sees NOT_SERVING, no new call gets through
        for edge in started:
            await edge.close()
        await health.shutting_down()
        drained = await asyncio.gather(
            gate.drain(config.grace_s), *(edge.drain(config.grace_s) for edge in started)
        )
        if all(drained):
            _log.info("drained")
        else:
            _log.warning(
                "grace period over with calls in flight; they are cancelled",
                extra={"calls_in_flight": inflight()},
            )
        await server.stop(max(0.0, min(STOP_GRACE_S, deadline - loop.time())))
    finally:
        for edge in reversed(started):
            try:
                await edge.stop()
            except Exception:
                _log.exception("stopping an edge failed")
        set_fatal_handler(None)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await health.close()
    for cleanup in cleanups:
        try:
            await cleanup()
        except Exception:
            _log.exception("cleanup failed")
    _log.info("stopped")
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()  # flushes spans still buffered for the OTLP exporter
    if failures:
        raise ServiceFailure(failures[0])


class ListenError(OSError):
    """The service's port cannot be bound: a start-up error with one clear line."""


class ServiceFailure(RuntimeError):
    """The service stopped itself because something it cannot work without failed."""


def main(serve: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a service's `serve()`; a configuration error ends it with one clear line, exit 2.

    The loop is uvloop's: grpc.aio and redis-py run on it unchanged, and measured on this
    mesh it cut the services' CPU per request by 10-30 % against asyncio's own loop.
    """
    try:
        uvloop.run(serve())
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except ListenError as error:
        print(f"cannot start: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except ServiceFailure as error:
        print(f"stopped: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def outbound_timeout(context: grpc.aio.ServicerContext, cap_s: float) -> float:
    """The timeout for a call made on behalf of `context`: its remaining deadline, at most cap_s.

    Every outbound call gets an explicit deadline; when the caller gave one, the peer sees
    what is left of it, so no service works on a request its caller has given up on.
    """
    remaining = context.time_remaining()
    if remaining is None:
        return cap_s
    return max(0.0, min(cap_s, remaining))
