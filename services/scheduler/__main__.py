"""Run the scheduler: `python -m services.scheduler`."""

from __future__ import annotations

import logging
import os

from shepherd.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from libs.catalog import load_catalog
from libs.server import Binding, main, run_server, setup_process
from services.scheduler.batcher import Batcher
from services.scheduler.config import SchedulerConfig
from services.scheduler.dispatch import Backend, Dispatcher
from services.scheduler.hosted import HostedBackend, HostedClient, HostedConfig
from services.scheduler.servicer import SchedulerServicer
from services.scheduler.triton import TritonBackend

_log = logging.getLogger("services.scheduler")


async def serve() -> None:
    config = SchedulerConfig.from_env()
    setup_process(config.telemetry)
    catalog = load_catalog(config.catalog)
    backends: dict[str, Backend] = {
        "triton": TritonBackend.connect(
            {name: pool.nodes for name, pool in catalog.pools.items()}, config.triton_timeout_s
        ),
    }
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
                request_timeout_s=config.hosted_timeout_s,
                max_retries=config.hosted_max_retries,
            )
        )
    backends["hosted"] = HostedBackend(hosted_clients)
    dispatcher = Dispatcher(backends)
    batchers = {
        name: Batcher(model, dispatcher.run_batch, config.max_inflight_batches)
        for name, model in catalog.models.items()
    }
    for batcher in batchers.values():
        batcher.start()

    async def close_batchers() -> None:
        for batcher in batchers.values():
            await batcher.close()

    binding = Binding(
        add=scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server,
        servicer=SchedulerServicer(catalog, batchers, config.default_timeout_s),
        service=scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"],
    )
    await run_server(config.server, [binding], cleanups=[close_batchers, dispatcher.close])


if __name__ == "__main__":
    main(serve)
