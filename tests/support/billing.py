"""A real BillingService on a grpc.aio server over a real Valkey, that tests can stop and start.

The servicer, the ledger and the ServiceGate are the production code; only the process
boundary is missing, so a test can take billing down and bring it back on the same port.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import redis.asyncio as redis
from grpc_health.v1 import health_pb2
from shepherd.billing.v1 import billing_pb2, billing_pb2_grpc
from shepherd.common.v1 import common_pb2

from deploy.local.launcher import wait_serving
from deploy.local.ports import free_port
from deploy.local.processes import spawn, stop
from libs.accounts import Accounts
from libs.catalog import load_catalog
from libs.config import DEFAULT_CATALOG
from libs.credentials import AccessPolicy, Credentials
from libs.gate import ServiceGate
from services.billing.ledger import Ledger
from services.billing.pools import PoolStore
from services.billing.servicer import BillingServicer
from tests.support.scheduler import TEST_CREDENTIALS

SERVING = health_pb2.HealthCheckResponse.SERVING

CREDENTIALS = Credentials(internal_tokens=("billing-test-token",))
MODEL = "deepseek-v3.2"


class CountingBilling(BillingServicer):
    """The real servicer; it also remembers the size of each batch it was sent."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(
            load_catalog(DEFAULT_CATALOG), Ledger(Accounts(client), 86_400), PoolStore(client)
        )
        self.batches: list[int] = []

    async def RecordUsageBatch(
        self, request: billing_pb2.RecordUsageBatchRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.RecordUsageBatchResponse:
        self.batches.append(len(request.records))
        return await super().RecordUsageBatch(request, context)


class BillingServer:
    """Billing on one loopback port for the whole test, however often it is stopped."""

    def __init__(self, client: redis.Redis) -> None:
        self.servicer = CountingBilling(client)
        self.address = f"127.0.0.1:{free_port()}"
        self._server: grpc.aio.Server | None = None

    async def start(self) -> BillingServer:
        server = grpc.aio.server(interceptors=[ServiceGate(AccessPolicy(CREDENTIALS))])
        billing_pb2_grpc.add_BillingServiceServicer_to_server(self.servicer, server)
        server.add_insecure_port(self.address)
        await server.start()
        self._server = server
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
            self._server = None


def usage_record(
    request_id: str, *, tenant: str = "acme", fingerprint: str = "f" * 64
) -> billing_pb2.RecordUsageRequest:
    """A record of 100 prompt and 20 completion tokens of MODEL."""
    return billing_pb2.RecordUsageRequest(
        request_id=request_id,
        tenant=tenant,
        model=MODEL,
        deployment=f"holysheep/{MODEL}",
        usage=common_pb2.Usage(prompt_tokens=100, completion_tokens=20, total_tokens=120),
        fingerprint=fingerprint,
    )


class BillingProcess:
    """`python -m services.billing` on a free port, with a catalog written for the test and
    the scheduler tests' service token and admin key (tests/support/scheduler.py)."""

    def __init__(self, run_dir: Path, catalog_path: Path, redis_url: str) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = run_dir / "billing.log"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._env = {
            "SHEPHERD_CATALOG": str(catalog_path),
            "SHEPHERD_BILLING_PORT": str(self.port),
            "REDIS_URL": redis_url,
            "SHEPHERD_INTERNAL_TOKEN": TEST_CREDENTIALS.internal_tokens[0],
            "SHEPHERD_ADMIN_KEYS": TEST_CREDENTIALS.admin_keys[0],
        }
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> BillingProcess:
        self._process = spawn(
            [sys.executable, "-m", "services.billing"],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self._env},
            log_path=self.log_path,
        )
        try:
            deadline = time.monotonic() + timeout_s
            wait_serving("billing", self._process, self.address, self.log_path, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._process is not None:
            stop(self._process)
            self._process = None

    def admin_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {TEST_CREDENTIALS.admin_keys[0]}"),)
