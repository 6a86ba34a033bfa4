"""Asking a service's standard health service what an operator or a probe would see."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def status(address: str, name: str = "") -> int | None:
    """The status of health name `name` at `address`; None when it cannot be asked."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=name), timeout=2
            )
        except grpc.aio.AioRpcError:
            return None
        return int(response.status)


async def wait_for(address: str, name: str, wanted: int, timeout_s: float = 30.0) -> None:
    """Poll until `name` reports `wanted` (generous deadline: a loaded machine is slow)."""
    deadline = time.monotonic() + timeout_s
    seen = None
    while (seen := await status(address, name)) != wanted:
        assert time.monotonic() < deadline, (
            f"health {name!r} at {address} is {seen}, never became {wanted}"
        )
        await asyncio.sleep(0.1)
