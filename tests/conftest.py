"""Fixtures shared by the whole suite: a real Valkey server and a client of it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as redis

from deploy.local.ports import free_port
from deploy.local.valkey import ValkeyConfig, ValkeyServer
from libs.config import DEFAULT_METRICS_PORTS
from libs.server import open_redis

# Services the tests start serve no /metrics unless a test gives them a port (the local
# launcher does): the documented defaults (9461-9464) would make two test runs on one machine,
# or a test beside `make run`, fight over them.
for _service in DEFAULT_METRICS_PORTS:
    os.environ.setdefault(f"SHEPHERD_{_service.upper()}_METRICS_PORT", "0")


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyServer]:
    """A real Valkey server per test module, stopped when the module is done."""
    server = ValkeyServer(
        ValkeyConfig(port=free_port(), data_dir=tmp_path_factory.mktemp("valkey"))
    ).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def client(valkey: ValkeyServer) -> AsyncIterator[redis.Redis]:
    """A client of the module's Valkey server, on an empty database."""
    client = open_redis(valkey.config.url, 2.0)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()
