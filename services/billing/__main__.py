"""Run the billing service, with AdminService beside it: `python -m services.billing`."""

from __future__ import annotations

from shepherd.billing.v1 import admin_pb2, admin_pb2_grpc, billing_pb2, billing_pb2_grpc

from libs.accounts import Accounts
from libs.apikeys import KeyStore
from libs.catalog import load_catalog
from libs.credentials import Access, AccessPolicy
from libs.server import Binding, main, open_redis, redis_probe, run_server, setup_process
from services.billing.admin import AdminServicer
from services.billing.config import BillingConfig
from services.billing.ledger import Ledger
from services.billing.pools import PoolStore
from services.billing.servicer import BillingServicer

_BILLING = "/shepherd.billing.v1.BillingService/"


async def serve() -> None:
    config = BillingConfig.from_env()
    setup_process(config.telemetry)
    catalog = load_catalog(config.catalog)
    client = open_redis(config.redis_url, config.redis_timeout_s)
    accounts = Accounts(client)
    ledger = Ledger(accounts, config.retention_s)
    pools = PoolStore(client)
    bindings = [
        Binding(
            add=billing_pb2_grpc.add_BillingServiceServicer_to_server,
            servicer=BillingServicer(catalog, ledger, pools),
            service=billing_pb2.DESCRIPTOR.services_by_name["BillingService"],
        ),
        Binding(
            add=admin_pb2_grpc.add_AdminServiceServicer_to_server,
            servicer=AdminServicer(catalog, KeyStore(client), accounts, ledger, pools),
            service=admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
        ),
    ]
    # Only the router records usage, and only schedulers pool usage (RecordPoolUsage, with
    # the service token); operators may read reports with an admin key.
    access = AccessPolicy(
        config.credentials,
        {
            "/shepherd.billing.v1.AdminService/": Access.ADMIN,
            _BILLING + "GetTenantUsage": Access.INTERNAL_OR_ADMIN,
            _BILLING + "GetUsage": Access.INTERNAL_OR_ADMIN,
        },
    )
    await run_server(
        config.server,
        bindings,
        cleanups=[client.aclose],
        access=access,
        readiness=[redis_probe(config.redis_url)],  # the ledger and budgets live there
    )


if __name__ == "__main__":
    main(serve)
