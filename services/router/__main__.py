"""Run the router: `python -m services.router`."""

from __future__ import annotations

from shepherd.billing.v1 import billing_pb2_grpc
from shepherd.cache.v1 import cache_pb2_grpc
from shepherd.router.v1 import router_pb2, router_pb2_grpc

from libs.accounts import Accounts
from libs.apikeys import KeyStore
from libs.catalog import load_catalog
from libs.peers import open_channel
from libs.server import Binding, main, open_redis, redis_probe, run_server, setup_process
from services.router.auth import Authenticator
from services.router.config import RouterConfig
from services.router.embeddings import EmbedPipeline
from services.router.http_edge import HttpEdge
from services.router.pipeline import ChatPipeline
from services.router.quota import Quota
from services.router.schedulers import SchedulerDirectory
from services.router.servicer import RouterServicer
from services.router.spool import UsageSpool
from services.router.usage import UsageRecorder


async def serve() -> None:
    config = RouterConfig.from_env()
    setup_process(config.telemetry)
    catalog = load_catalog(config.catalog)
    redis_client = open_redis(config.redis_url, 2.0)
    channels = [
        open_channel(address, config.credentials)
        for address in (config.cache_addr, config.billing_addr)
    ]
    cache, billing = channels
    # The scheduler replica that owns each model (Redis membership when scale-out is on).
    schedulers = SchedulerDirectory(
        config.scheduler_addr,
        config.credentials,
        redis_client if config.scheduler_cluster else None,
        config.scheduler_cluster,
        multiplex=config.multiplex,
    )
    await schedulers.start()
    authenticator = Authenticator(KeyStore(redis_client), config.key_cache_s)
    billing_stub = billing_pb2_grpc.BillingServiceStub(billing)
    usage = UsageRecorder(billing_stub)
    spool = UsageSpool(config.spool_dir, billing_stub, max_records=config.spool_max_records)
    spool.open()  # what a previous run left is replayed first
    spool.start()
    pipeline = ChatPipeline(
        config,
        catalog,
        authenticator,
        Quota(Accounts(redis_client), config.quota),
        schedulers,
        cache_pb2_grpc.CacheServiceStub(cache),
        usage,
        spool,
    )
    embed = EmbedPipeline.beside(pipeline)
    servicer = RouterServicer(
        config, catalog, authenticator, pipeline, billing_stub, embeddings=embed
    )
    # The OpenAI-compatible HTTP edge: the same pipelines, on the same event loop.
    edges = (
        [HttpEdge(config.server.host, config.http_port, pipeline, catalog, authenticator, embed)]
        if config.http_port
        else []
    )

    async def close_spool() -> None:
        await spool.close(timeout_s=config.server.grace_s)

    async def close_channels() -> None:
        for channel in channels:
            await channel.close()
        await schedulers.close()

    binding = Binding(
        add=router_pb2_grpc.add_RouterServiceServicer_to_server,
        servicer=servicer,
        service=router_pb2.DESCRIPTOR.services_by_name["RouterService"],
    )
    await run_server(
        config.server,
        [binding],
        # Usage in flight goes to billing (or the spool) before the channels close.
        cleanups=[usage.close, close_spool, close_channels, redis_client.aclose],
        # API keys, budgets and rate limits are in Redis: without it no call can be admitted.
        readiness=[redis_probe(config.redis_url)],
        edges=edges,
    )


if __name__ == "__main__":
    main(serve)
