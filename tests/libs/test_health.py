"""Readiness follows Redis, liveness does not: real services, a real Valkey stopped and started."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from shepherd.billing.v1 import admin_pb2, billing_pb2
from shepherd.cache.v1 import cache_pb2
from shepherd.router.v1 import router_pb2

from deploy.local.ports import free_port
from deploy.local.processes import spawn, stop, tail
from deploy.local.valkey import ValkeyConfig, ValkeyServer
from libs.config import REPO_ROOT
from libs.health import LIVENESS
from tests.support.health import NOT_SERVING, SERVING, status, wait_for

TOKEN = "token-for-the-health-test-0123456789"
ADMIN_KEY = "admin-key-for-the-health-test-0123456789"

# Each Redis user and the names that must follow readiness: "" and every service it serves.
SERVICES = {
    "router": [router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name],
    "cache": [cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name],
    "billing": [
        billing_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name,
        admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    ],
}


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[ValkeyServer]:
    """A Valkey of this test's own, since the test stops it."""
    server = ValkeyServer(ValkeyConfig(port=free_port(), data_dir=tmp_path / "valkey")).start()
    yield server
    server.stop()


@pytest.fixture
def services(tmp_path: Path, valkey: ValkeyServer) -> Iterator[dict[str, str]]:
    """The router, cache and billing processes on free ports, all using `valkey`."""
    ports = {name: free_port() for name in SERVICES}
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "REDIS_URL": valkey.config.url,
        "SHEPHERD_INTERNAL_TOKEN": TOKEN,
        "SHEPHERD_ADMIN_KEYS": ADMIN_KEY,
        "SHEPHERD_ROUTER_SPOOL_DIR": str(tmp_path / "spool"),  # not the checkout's .run/
        **{f"SHEPHERD_{name.upper()}_PORT": str(port) for name, port in ports.items()},
    }
    processes = {
        name: spawn(
            [sys.executable, "-m", f"services.{name}"],
            env=env,
            log_path=tmp_path / f"{name}.log",
            cwd=REPO_ROOT,
        )
        for name in SERVICES
    }
    try:
        yield {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    finally:
        for name, process in processes.items():
            if stop(process) != 0:
                print(f"{name} log:\n{tail(tmp_path / f'{name}.log')}")


async def test_readiness_follows_redis_while_liveness_stays_serving(
    valkey: ValkeyServer, services: dict[str, str]
) -> None:
    for name, address in services.items():
        for health_name in ["", *SERVICES[name]]:
            await wait_for(address, health_name, SERVING)
        assert await status(address, LIVENESS) == SERVING

    valkey.stop()
    for name, address in services.items():
        for health_name in ["", *SERVICES[name]]:
            await wait_for(address, health_name, NOT_SERVING)
        assert await status(address, LIVENESS) == SERVING, f"{name} is alive without Redis"

    valkey.start()  # the same port and data directory
    for name, address in services.items():
        for health_name in ["", *SERVICES[name]]:
            await wait_for(address, health_name, SERVING)
        assert await status(address, LIVENESS) == SERVING
