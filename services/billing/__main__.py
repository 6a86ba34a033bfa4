"""Run the billing service: `python -m services.billing`."""

from __future__ import annotations

from shepherd.billing.v1 import billing_pb2, billing_pb2_grpc

from libs.catalog import load_catalog
from libs.server import Binding, main, open_redis, run_server, setup_process
from services.billing.config import BillingConfig
from services.billing.ledger import Ledger
from services.billing.servicer import BillingServicer


async def serve() -> None:
    config = BillingConfig.from_env()
    setup_process(config.telemetry)
    catalog = load_catalog(config.catalog)
    client = open_redis(config.redis_url, config.redis_timeout_s)
    binding = Binding(
        add=billing_pb2_grpc.add_BillingServiceServicer_to_server,
        servicer=BillingServicer(catalog, Ledger(client)),
        service=billing_pb2.DESCRIPTOR.services_by_name["BillingService"],
    )
    await run_server(config.server, [binding], cleanups=[client.aclose])


if __name__ == "__main__":
    main(serve)
