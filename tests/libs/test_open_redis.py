"""The shared Redis client survives a Redis restart, and retries only connection errors."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from deploy.local.ports import free_port
from deploy.local.valkey import ValkeyConfig, ValkeyServer
from libs.server import open_redis

# Idempotent by key, like every Shepherd script: the value is set, not added to.
SCRIPT = "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('GET', KEYS[1])"


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[ValkeyServer]:
    """A Valkey of this test's own, since the test restarts it."""
    server = ValkeyServer(ValkeyConfig(port=free_port(), data_dir=tmp_path / "valkey")).start()
    yield server
    server.stop()


async def test_the_first_commands_after_a_restart_succeed_on_fresh_connections(
    valkey: ValkeyServer,
) -> None:
    client = open_redis(valkey.config.url, 2.0, max_connections=4)
    script = client.register_script(SCRIPT)
    try:
        # Open several pooled connections, as a busy service has, and leave them idle.
        await asyncio.gather(*(client.set(f"k{i}", i) for i in range(4)))
        assert await script(keys=["s"], args=["before"]) == b"before"

        valkey.stop()  # every pooled connection is now dead
        valkey.start()  # the same port; the scripts are gone from its script cache

        # Each command takes a dead pooled connection first, and still succeeds.
        assert await asyncio.gather(*(client.get(f"k{i}") for i in range(4))) == [
            b"0",
            b"1",
            b"2",
            b"3",
        ]
        assert not (await client.script_exists(script.sha))[0]
        assert await script(keys=["s"], args=["after"]) == b"after"  # NOSCRIPT: reloaded
    finally:
        await client.aclose()


async def test_a_timeout_is_not_retried() -> None:
    # A listener that accepts connections but never answers, like a wedged server.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        silent.setblocking(False)
        client = open_redis(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", 0.3)
        try:
            with pytest.raises(redis.TimeoutError):
                await client.get("k")
        finally:
            await client.aclose()
        accepted = 0
        while True:
            try:
                connection, _ = silent.accept()
            except BlockingIOError:
                break
            connection.close()
            accepted += 1
    assert accepted == 1, "a timed-out command must not be sent again on another connection"
