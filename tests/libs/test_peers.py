"""A peer channel reaches a peer that comes back within about a second."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from deploy.local.ports import free_port
from libs.credentials import Credentials
from libs.peers import open_channel

CREDENTIALS = Credentials(internal_tokens=("token-for-the-peers-test-0123456789",), admin_keys=())
# Long enough for gRPC's default reconnect backoff (1 s, x1.6 per attempt, up to 120 s) to
# have grown to several seconds: a channel left at the defaults misses the deadline below.
DOWN_S = 10.0
# What "promptly" means here: the tuned backoff reconnects within about 1 s; the rest is
# headroom for a loaded machine. The default backoff would take about 6 s.
BACK_WITHIN_S = 3.0


async def serve(port: int) -> grpc.aio.Server:
    """A real grpc.aio server (the standard health service) on `port`."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    await server.start()
    return server


async def answers(stub: health_pb2_grpc.HealthStub) -> bool:
    """One call, as a peer makes it: fails at once (no wait_for_ready) while unreachable."""
    try:
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
    except grpc.aio.AioRpcError as error:
        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        return False
    return True


async def test_a_peer_that_comes_back_is_reached_within_about_a_second() -> None:
    port = free_port()
    server = await serve(port)
    channel = open_channel(f"127.0.0.1:{port}", CREDENTIALS)
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        assert await answers(stub)
        await server.stop(None)

        # Callers keep trying while the peer is down, so the channel keeps reconnecting.
        down_until = time.monotonic() + DOWN_S
        while time.monotonic() < down_until:
            assert not await answers(stub)
            await asyncio.sleep(0.2)

        server = await serve(port)
        back_at = time.monotonic()
        while not await answers(stub):
            waited = time.monotonic() - back_at
            assert waited < BACK_WITHIN_S, f"still unreachable {waited:.1f}s after the restart"
            await asyncio.sleep(0.05)
    finally:
        await channel.close()
        await server.stop(None)
