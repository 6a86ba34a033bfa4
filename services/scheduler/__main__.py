"""Run the scheduler: `python -m services.scheduler`."""

from __future__ import annotations

import asyncio
import logging
import os

from shepherd.billing.v1 import billing_pb2_grpc
from shepherd.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from libs.catalog import Pool, load_catalog
from libs.credentials import Access, AccessPolicy
from libs.gate import ServiceGate
from libs.peers import open_channel
from libs.server import Binding, main, open_redis, run_server, setup_process
from libs.tasks import supervise
from services.scheduler.admission import Admission
from services.scheduler.batcher import Batcher
from services.scheduler.cluster import Cluster, LeaderClient, MembershipProbe
from services.scheduler.config import SchedulerConfig
from services.scheduler.dispatch import Dispatcher
from services.scheduler.hosted import HostedBackend, HostedClient, HostedConfig
from services.scheduler.nodes import pools_for
from services.scheduler.placement import Placer
from services.scheduler.poolusage import PoolUsage
from services.scheduler.queue import ModelQueue
from services.scheduler.readiness import ModelsProbe
from services.scheduler.servicer import SchedulerServicer
from services.scheduler.stats import ModelStats, observe_outcomes, observe_queue_depth
from services.scheduler.triton import TritonBackend

_log = logging.getLogger("services.scheduler")


async def serve() -> None:
    config = SchedulerConfig.from_env()
    setup_process(config.telemetry)
    catalog = load_catalog(config.catalog)

    # One pooled SDK client per provider, closed at shutdown (dispatcher.close). The key is
    # read once here; without one the provider's calls answer UNAVAILABLE naming the variable.
    hosted_clients = {}
    for provider in catalog.providers.values():
        api_key = os.environ.get(provider.api_key_env, "")
        if not api_key:
            _log.warning(
                "hosted provider has no API key; its deployments will answer UNAVAILABLE",
                extra={"provider": provider.name, "env": provider.api_key_env},
            )
        hosted_clients[provider.name] = HostedClient.create(
            HostedConfig(
                base_url=provider.base_url,
                api_key=api_key,
                api_key_env=provider.api_key_env,
                provider=provider.name,
                retry=config.hosted_retry,
                breaker=config.hosted_breaker,
            )
        )

    # Scale-out (services/scheduler/cluster.py): shared queues' ownership, node slots and
    # placement through Redis. Off, none of it exists and nothing here touches Redis.
    cluster: Cluster | None = None
    leader: LeaderClient | None = None
    redis_client = None
    if config.cluster.enabled:
        redis_client = open_redis(config.cluster.redis_url, 2.0)
        cluster = Cluster(config.cluster, redis_client, catalog.models, catalog.pools)
        leader = LeaderClient(cluster, config.credentials, config.placement.load_timeout_s)

    placers: list[Placer] = []

    def placer_for(pool: Pool) -> Placer | None:
        if pool.model_control != "explicit":
            return None
        # The Triton backend (below) is made after the pools; its meters are read before an
        # unload, when the placer calls this.
        placer = Placer(
            config.placement,
            cluster,
            leader,
            settle=lambda address, model: triton.settle(address, model),
        )
        placers.append(placer)
        return placer

    pools = pools_for(
        catalog.pools,
        (d for model in catalog.models.values() for d in model.deployments),
        config.health,
        placer_for,
        cluster,
    )
    stats = {
        name: ModelStats(name, max_batch_size=model.batching.max_batch_size)
        for name, model in catalog.models.items()
    }
    # The pools' hourly figures go to billing, which keeps them (poolusage.py).
    billing = open_channel(config.billing_addr, config.credentials) if config.billing_addr else None
    usage = None
    if billing is not None:
        usage = PoolUsage(
            pools,
            catalog,
            billing_pb2_grpc.BillingServiceStub(billing),
            config.pool_usage_interval_s,
        )
    else:
        _log.warning("SHEPHERD_BILLING_ADDR is not set: the pools' hourly usage is not kept")
    triton = TritonBackend(usage)
    dispatcher = Dispatcher(
        pools,
        triton,
        HostedBackend(hosted_clients),
        stats,
        config.hosted_inflight_batches,
        cluster,
    )
    batchers = {
        name: Batcher(
            model,
            ModelQueue(name, model.queue, on_outcome=stats[name].outcome),
            dispatcher,
            stats[name],
        )
        for name, model in catalog.models.items()
    }
    observe_queue_depth(lambda: [(name, b.queue.depth) for name, b in batchers.items()])
    observe_outcomes(stats.values)
    for pool in pools.values():
        await pool.start()
    if cluster is not None:

        def lead(name: str) -> None:
            pool = pools.get(name)
            if pool is not None and pool.placement is not None:
                adoption = supervise(f"adopt:{name}", pool.adopt_for_leadership)
                adoptions.add(adoption)
                adoption.add_done_callback(adoptions.discard)

        adoptions: set[asyncio.Task[None]] = set()
        cluster.on_leadership = lead
        # A member (with its assignment known) before it serves: readiness waits for this.
        await cluster.start()
    for batcher in batchers.values():
        batcher.start()
    reporting = supervise("pool-usage", usage.run) if usage is not None else None

    async def close_scheduling() -> None:
        for batcher in batchers.values():
            await batcher.close()
        for placer in placers:
            await placer.close()
        for pool in pools.values():
            await pool.close()
        if cluster is not None and leader is not None and redis_client is not None:
            await leader.close()
            await cluster.close()  # leave: the models and leases move at once
            await redis_client.aclose()
        await dispatcher.close()
        if reporting is not None and usage is not None and billing is not None:
            reporting.cancel()
            await asyncio.gather(reporting, return_exceptions=True)
            await usage.close()  # what the last batches did
            await billing.close()

    # Operators read GetStats and GetAssignments with an admin key; only the router may queue
    # inference, and only the replicas ask each other to load (EnsureLoaded).
    access = AccessPolicy(
        config.credentials,
        {
            "/shepherd.scheduler.v1.SchedulerService/GetStats": Access.INTERNAL_OR_ADMIN,
            "/shepherd.scheduler.v1.SchedulerService/GetAssignments": Access.INTERNAL_OR_ADMIN,
        },
    )
    # The servicer shares the gate: calls multiplexed on InferMany drain with the others.
    gate = ServiceGate(access, config.server.service)
    binding = Binding(
        add=scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server,
        servicer=SchedulerServicer(
            catalog,
            Admission(catalog, batchers, dispatcher),
            batchers,
            pools,
            placers,
            config.default_timeout_s,
            triton.metering,
            cluster,
            replica_id=config.cluster.replica_id or config.server.address,
            stream_interval_s=config.stream_interval_s,
            gate=gate,
        ),
        service=scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"],
    )
    await run_server(
        config.server,
        [binding],
        cleanups=[close_scheduling],
        gate=gate,
        readiness=[
            ModelsProbe(catalog.models, dispatcher),
            *([MembershipProbe(cluster)] if cluster is not None else []),
        ],
    )


if __name__ == "__main__":
    main(serve)
