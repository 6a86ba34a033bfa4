"""Run the cache service: `python -m services.cache`."""

from __future__ import annotations

from shepherd.cache.v1 import cache_pb2, cache_pb2_grpc

from libs.catalog import load_catalog
from libs.credentials import AccessPolicy
from libs.server import Binding, main, open_redis, redis_probe, run_server, setup_process
from services.cache.config import CacheConfig
from services.cache.servicer import CacheServicer
from services.cache.store import ResponseStore


async def serve() -> None:
    config = CacheConfig.from_env()
    setup_process(config.telemetry)
    catalog = load_catalog(config.catalog)
    client = open_redis(config.redis_url, config.redis_timeout_s)
    binding = Binding(
        add=cache_pb2_grpc.add_CacheServiceServicer_to_server,
        servicer=CacheServicer(catalog, ResponseStore(client, config.default_ttl_s)),
        service=cache_pb2.DESCRIPTOR.services_by_name["CacheService"],
    )
    await run_server(
        config.server,
        [binding],
        cleanups=[client.aclose],
        access=AccessPolicy(config.credentials),
        # The cache fails open without Redis, but a replica that can only miss is no use.
        readiness=[redis_probe(config.redis_url)],
    )


if __name__ == "__main__":
    main(serve)
