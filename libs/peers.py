"""Channels to peer services: every call carries the service token and the current trace.

Why not client interceptors: grpc.aio runs each client interceptor as a task of its own
around every call, and awaiting the call's status inside one also stopped a caller's
cancellation from reaching the RPC. Measured on this mesh, the three it took (trace, token,
cancellation) cost more CPU than the call. Here the channel hands the generated stubs
multicallables that add two things to the call's metadata and otherwise call grpc directly,
so cancelling a call (or the task awaiting it) cancels the RPC, and the peer stops working
for a caller that has gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from libs.credentials import Credentials
from libs.telemetry import trace_metadata

Metadata = Sequence[tuple[str, str | bytes]]

# Reconnect within half a second of a peer coming back, so that recovery, health poll
# included, stays within a second. gRPC's defaults (first retry after 1 s, then x1.6 up to
# 120 s, each attempt given at least 20 s) leave a channel whose peer was down for a minute
# waiting up to two more minutes, answering UNAVAILABLE all along. Attempts every 0.1 s
# growing to 0.5 s (plus gRPC's 20 % jitter) cost a peer that is down two refused TCP
# connects a second per channel; an attempt is given at least 1 s to connect, ample inside a
# cluster. The scheduler's Triton clients use the same (services/scheduler/nodes.py).
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 1_000),
    ("grpc.max_reconnect_backoff_ms", 500),
)
_CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    *RECONNECT_OPTIONS,
)


class _WithMetadata:
    """A multicallable that adds the token and trace context to each call's metadata."""

    __slots__ = ("_call", "_fixed")

    def __init__(self, call: Any, fixed: tuple[tuple[str, str], ...]) -> None:
        self._call = call
        self._fixed = fixed

    def __call__(
        self, request: Any = None, *, metadata: Metadata | None = None, **kwargs: Any
    ) -> Any:
        extra = (*self._fixed, *trace_metadata())
        return self._call(request, metadata=(*metadata, *extra) if metadata else extra, **kwargs)


class PeerChannel:
    """A grpc.aio channel whose stubs send the service token and trace on every call.

    Pass it where a generated stub wants a channel: `SchedulerServiceStub(peer)`. Create one
    per peer at start-up, share it, and `close()` it at shutdown.
    """

    def __init__(self, channel: grpc.aio.Channel, credentials: Credentials) -> None:
        self.channel = channel
        self._fixed = credentials.outbound_metadata()

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _WithMetadata(self.channel.unary_unary(method, *args, **kwargs), self._fixed)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _WithMetadata(self.channel.unary_stream(method, *args, **kwargs), self._fixed)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _WithMetadata(self.channel.stream_unary(method, *args, **kwargs), self._fixed)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _WithMetadata(self.channel.stream_stream(method, *args, **kwargs), self._fixed)

    async def channel_ready(self) -> None:
        await self.channel.channel_ready()

    async def close(self, grace: float | None = None) -> None:
        await self.channel.close(grace)

    async def __aenter__(self) -> PeerChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def open_channel(address: str, credentials: Credentials) -> PeerChannel:
    """Open a channel to a peer service; call once at start-up and share it."""
    return PeerChannel(grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS), credentials)
