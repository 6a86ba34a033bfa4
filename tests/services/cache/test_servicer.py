"""CacheService checks its own input: a bad request is INVALID_ARGUMENT, never INTERNAL.

The real servicer behind the real ServiceGate on a grpc.aio server, over a real Valkey.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as redis
from shepherd.cache.v1 import cache_pb2, cache_pb2_grpc
from shepherd.common.v1 import common_pb2

from tests.support.cache import cache_service


@pytest.fixture
async def stub(client: redis.Redis) -> AsyncIterator[cache_pb2_grpc.CacheServiceStub]:
    async with cache_service(client) as (stub, _):
        yield stub


def lookup(
    role: int = common_pb2.ROLE_USER, policy: int = common_pb2.CACHE_POLICY_AUTO
) -> cache_pb2.LookupRequest:
    return cache_pb2.LookupRequest(
        model_family="shepherd-tiny",
        tenant="acme",
        messages=[common_pb2.ChatMessage(role=role, content="hello")],  # type: ignore[arg-type]
        policy=policy,  # type: ignore[arg-type]
    )


def nan_temperature() -> cache_pb2.LookupRequest:
    """Found by the fuzz: a NaN temperature with policy ALWAYS was keyed and looked up."""
    request = lookup(policy=common_pb2.CACHE_POLICY_ALWAYS)
    request.params.temperature = float("nan")
    return request


async def test_a_valid_lookup_is_a_miss_with_a_key(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    response = await stub.Lookup(lookup(), timeout=5)
    assert response.cacheable and not response.hit and response.key


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (lookup(role=99), "messages[0].role"),
        (lookup(policy=99), "policy"),
        (nan_temperature(), "params.temperature"),
    ],
)
async def test_unknown_roles_and_policies_are_invalid_argument(
    stub: cache_pb2_grpc.CacheServiceStub, request_: cache_pb2.LookupRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Lookup(request_, timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{field}: must be" in (refused.value.details() or "")


async def test_hundreds_of_bad_messages_get_a_status_the_caller_can_read(
    stub: cache_pb2_grpc.CacheServiceStub,
) -> None:
    """Found by the fuzz (tests/fuzz): one violation per message made a status too large for
    a gRPC client (over 8 KiB of trailers), which saw RESOURCE_EXHAUSTED "Stream removed"."""
    request = lookup(role=99)
    request.messages.extend([request.messages[0]] * 299)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Lookup(request, timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details() or ""
    assert details.startswith("invalid request: messages[0].role: must be")
    assert details.endswith(" more")


async def test_a_huge_foreign_namespace_is_refused_readably(
    stub: cache_pb2_grpc.CacheServiceStub,
) -> None:
    """The refusal names the namespace the key was for, shortened when a caller made it huge."""
    key = f"shepherd:cache:v2:tenant:{'x' * 30_000}:shepherd-tiny:{'0' * 64}"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Store(cache_pb2.StoreRequest(key=key, tenant="acme"), timeout=5)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    details = refused.value.details() or ""
    assert details.startswith("tenant 'acme' may not use cache namespace 'tenant:xxx")
    assert details.endswith("(shortened)")
