"""The real CacheService on a grpc.aio server over a real Valkey, for the cache's own tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import redis.asyncio as redis
from shepherd.cache.v1 import cache_pb2_grpc

from deploy.local.ports import free_port
from libs.catalog import load_catalog
from libs.config import DEFAULT_CATALOG
from libs.gate import ServiceGate
from libs.server import open_redis
from services.cache.flights import Flights
from services.cache.servicer import CacheServicer
from services.cache.stats import CacheStats
from services.cache.store import ResponseStore


@asynccontextmanager
async def cache_service(
    client: redis.Redis, *, lease_ms: int = 5_000, default_ttl_s: int = 60
) -> AsyncIterator[tuple[cache_pb2_grpc.CacheServiceStub, CacheStats]]:
    """A cache service as services/cache/__main__.py builds it, and a stub to call it."""
    url = client.get_connection_kwargs()
    blocking = open_redis(f"redis://{url['host']}:{url['port']}/{url.get('db', 0)}", 2.0)
    stats = CacheStats(client)
    servicer = CacheServicer(
        load_catalog(DEFAULT_CATALOG),
        ResponseStore(client, default_ttl_s=default_ttl_s),
        Flights(client, blocking, lease_ms),
        stats,
    )
    server = grpc.aio.server(interceptors=[ServiceGate()])
    cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield cache_pb2_grpc.CacheServiceStub(channel), stats
    finally:
        await channel.close()
        await server.stop(None)
        await blocking.aclose()
