"""The response store against a real Valkey server, and failing open when it is gone."""

from __future__ import annotations

import socket
import time

import redis.asyncio as redis
from shepherd.common.v1 import common_pb2

from deploy.local.ports import LOCALHOST, free_port
from libs.server import open_redis
from services.cache.store import ResponseStore

COMPLETION = common_pb2.Completion(
    text="Three sheep.",
    finish_reason="stop",
    usage=common_pb2.Usage(prompt_tokens=12, completion_tokens=3, total_tokens=15),
    placement=common_pb2.Placement(
        deployment="local/tiny_lm",
        kind=common_pb2.BACKEND_KIND_TRITON,
        node="127.0.0.1:8001",
        backend_model="tiny_lm",
        batch_size=4,
    ),
)


async def test_put_then_get_round_trips_with_ttl(client: redis.Redis) -> None:
    store = ResponseStore(client, default_ttl_s=3600)

    assert await store.put("shepherd:cache:v1:test:a", COMPLETION, ttl_s=120) is True
    assert await store.get("shepherd:cache:v1:test:a") == COMPLETION
    assert 110 <= await client.ttl("shepherd:cache:v1:test:a") <= 120


async def test_zero_ttl_uses_the_default(client: redis.Redis) -> None:
    store = ResponseStore(client, default_ttl_s=900)

    assert await store.put("shepherd:cache:v1:test:b", COMPLETION, ttl_s=0) is True
    assert 890 <= await client.ttl("shepherd:cache:v1:test:b") <= 900


async def test_miss_is_none(client: redis.Redis) -> None:
    assert await ResponseStore(client, 60).get("shepherd:cache:v1:test:missing") is None


async def test_put_overwrites(client: redis.Redis) -> None:
    store = ResponseStore(client, 60)
    newer = common_pb2.Completion(text="Four sheep.", finish_reason="length")

    await store.put("k", COMPLETION, 60)
    await store.put("k", newer, 60)

    assert await store.get("k") == newer


async def test_fails_open_fast_when_redis_is_down() -> None:
    client = open_redis(f"redis://{LOCALHOST}:{free_port()}/0", 0.25)
    store = ResponseStore(client, 60)
    try:
        started = time.monotonic()
        assert await store.get("k") is None
        assert await store.put("k", COMPLETION, 60) is False
        assert time.monotonic() - started < 0.9
    finally:
        await client.aclose()


async def test_fails_open_within_the_timeout_when_redis_hangs() -> None:
    # A listener that accepts connections but never answers, like a wedged server.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind((LOCALHOST, 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        client = open_redis(f"redis://{LOCALHOST}:{port}/0", 0.2)
        store = ResponseStore(client, 60)
        try:
            started = time.monotonic()
            assert await store.get("k") is None
            elapsed_get = time.monotonic() - started
            started = time.monotonic()
            assert await store.put("k", COMPLETION, 60) is False
            elapsed_put = time.monotonic() - started
        finally:
            await client.aclose()

    assert elapsed_get < 0.9
    assert elapsed_put < 0.9
