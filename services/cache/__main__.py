"""Run the cache service: `python -m services.cache`."""

from __future__ import annotations

from shepherd.cache.v1 import cache_pb2, cache_pb2_grpc

from libs.catalog import load_catalog
from libs.credentials import Access, AccessPolicy
from libs.server import Binding, main, open_redis, redis_probe, run_server, setup_process
from libs.tasks import supervise
from services.cache.config import CacheConfig
from services.cache.flights import Flights
from services.cache.servicer import CacheServicer
from services.cache.stats import CacheStats
from services.cache.store import ResponseStore


async def serve() -> None:
    config = CacheConfig.from_env()
    setup_process(config.telemetry)
    catalog = load_catalog(config.catalog)
    client = open_redis(config.redis_url, config.redis_timeout_s)
    # Flight readers block on Redis streams: their own pool, with a timeout above the block.
    blocking = open_redis(config.redis_url, 2.0, max_connections=128)
    flights = Flights(client, blocking, config.lease_ms, config.single_flight)
    stats = CacheStats(client)
    binding = Binding(
        add=cache_pb2_grpc.add_CacheServiceServicer_to_server,
        servicer=CacheServicer(
            catalog, ResponseStore(client, config.default_ttl_s), flights, stats
        ),
        service=cache_pb2.DESCRIPTOR.services_by_name["CacheService"],
    )
    stats_task = supervise("cache-stats", stats.run)

    async def close() -> None:
        stats_task.cancel()
        await stats.flush()
        await flights.close()
        await blocking.aclose()
        await client.aclose()

    await run_server(
        config.server,
        [binding],
        cleanups=[close],
        # Purge deletes answers: operators only. Stats are for operators and the router.
        access=AccessPolicy(
            config.credentials,
            {
                "/shepherd.cache.v1.CacheService/Purge": Access.ADMIN,
                "/shepherd.cache.v1.CacheService/GetStats": Access.INTERNAL_OR_ADMIN,
            },
        ),
        # The cache fails open without Redis, but a replica that can only miss is no use.
        readiness=[redis_probe(config.redis_url)],
    )


if __name__ == "__main__":
    main(serve)
