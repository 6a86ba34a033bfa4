"""Single-flight in the cache service: leases, followers, takeover, stats and purge.

The real servicer on a grpc.aio server over a real Valkey; the test plays the routers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as redis
from shepherd.cache.v1 import cache_pb2, cache_pb2_grpc
from shepherd.common.v1 import common_pb2

from services.cache.stats import CacheStats
from tests.support.cache import cache_service

Service = tuple[cache_pb2_grpc.CacheServiceStub, CacheStats]


@pytest.fixture
async def service(client: redis.Redis) -> AsyncIterator[Service]:
    async with cache_service(client, lease_ms=400) as service:
        yield service


def lookup(
    prompt: str = "hello", tenant: str = "acme", **params: object
) -> cache_pb2.LookupRequest:
    return cache_pb2.LookupRequest(
        model_family="shepherd-tiny",
        tenant=tenant,
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=prompt)],
        params=common_pb2.GenerationParams(max_tokens=8, **params),  # type: ignore[arg-type]
    )


def answer(text: str = "hi there") -> common_pb2.Completion:
    return common_pb2.Completion(
        text=text,
        finish_reason="stop",
        usage=common_pb2.Usage(prompt_tokens=10, completion_tokens=3, total_tokens=13),
        placement=common_pb2.Placement(
            deployment="local/tiny_lm", kind=common_pb2.BACKEND_KIND_TRITON
        ),
    )


async def follow(
    stub: cache_pb2_grpc.CacheServiceStub, key: str, tenant: str = "acme"
) -> list[cache_pb2.FollowResponse]:
    return [
        event
        async for event in stub.Follow(cache_pb2.FollowRequest(key=key, tenant=tenant), timeout=10)
    ]


async def test_the_first_miss_leads_identical_lookups_follow_and_get_its_text_and_answer(
    service: Service,
) -> None:
    stub, _ = service
    leader = await stub.Lookup(lookup(), timeout=5)
    assert leader.outcome == cache_pb2.LOOKUP_OUTCOME_LEAD and leader.lease_token
    first = await stub.Lookup(lookup(), timeout=5)
    assert first.outcome == cache_pb2.LOOKUP_OUTCOME_FOLLOW and first.key == leader.key

    async def publish() -> AsyncIterator[cache_pb2.PublishRequest]:
        for piece in ("hi", " there"):
            yield cache_pb2.PublishRequest(
                key=leader.key, lease_token=leader.lease_token, tenant="acme", text=piece
            )

    early = asyncio.create_task(follow(stub, first.key))
    await stub.Publish(publish(), timeout=5)
    # A follower that arrives after some text was published gets it from the start.
    late = asyncio.create_task(follow(stub, first.key))
    await asyncio.sleep(0.3)
    await stub.Store(
        cache_pb2.StoreRequest(
            key=leader.key,
            completion=answer(),
            tenant="acme",
            lease_token=leader.lease_token,
            keep=True,
        ),
        timeout=5,
    )

    for events in await asyncio.gather(early, late):
        assert [e.text for e in events[:-1]] == ["hi", " there"]
        assert events[-1].completion == answer()
    hit = await stub.Lookup(lookup(), timeout=5)
    assert hit.outcome == cache_pb2.LOOKUP_OUTCOME_HIT and hit.completion == answer()


async def test_a_leader_that_fails_tells_its_followers_why(service: Service) -> None:
    stub, _ = service
    leader = await stub.Lookup(lookup("fails"), timeout=5)
    waiting = asyncio.create_task(follow(stub, leader.key))
    await asyncio.sleep(0.1)

    await stub.Abandon(
        cache_pb2.AbandonRequest(
            key=leader.key,
            lease_token=leader.lease_token,
            tenant="acme",
            code=grpc.StatusCode.UNAVAILABLE.value[0],
            message="no Triton node is ready",
        ),
        timeout=5,
    )

    (event,) = await waiting
    assert event.end.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert event.end.message == "no Triton node is ready" and not event.end.lease_expired
    # The lease is free again: the next lookup leads.
    assert (await stub.Lookup(lookup("fails"), timeout=5)).outcome == cache_pb2.LOOKUP_OUTCOME_LEAD


async def test_followers_of_a_leader_that_vanished_take_over_when_its_lease_expires(
    service: Service,
) -> None:
    stub, stats = service
    leader = await stub.Lookup(lookup("vanishes"), timeout=5)
    follower = await stub.Lookup(lookup("vanishes"), timeout=5)
    assert follower.lease_ms == 400

    (event,) = await follow(stub, follower.key)  # the leader never stores nor renews

    assert event.end.lease_expired
    takeover = await stub.Lookup(lookup("vanishes"), timeout=5)
    assert takeover.outcome == cache_pb2.LOOKUP_OUTCOME_LEAD
    assert takeover.lease_token != leader.lease_token
    await stats.flush()
    assert (await stub.GetStats(cache_pb2.GetStatsRequest(), timeout=5)).leases_expired == 1


async def test_a_renewed_lease_outlives_its_first_expiry(service: Service) -> None:
    stub, _ = service
    leader = await stub.Lookup(lookup("slow"), timeout=5)
    waiting = asyncio.create_task(follow(stub, leader.key))
    for _ in range(4):  # 800 ms of work, twice the lease
        await asyncio.sleep(0.2)
        renewed = await stub.Renew(
            cache_pb2.RenewRequest(key=leader.key, lease_token=leader.lease_token, tenant="acme"),
            timeout=5,
        )
        assert renewed.renewed
    await stub.Store(
        cache_pb2.StoreRequest(
            key=leader.key,
            completion=answer("slow"),
            tenant="acme",
            lease_token=leader.lease_token,
            keep=True,
        ),
        timeout=5,
    )
    (event,) = await waiting
    assert event.completion.text == "slow"


async def test_sampling_without_a_seed_neither_leads_nor_follows(service: Service) -> None:
    stub, _ = service
    for _ in range(2):
        sampled = await stub.Lookup(lookup("creative", temperature=0.8), timeout=5)
        assert sampled.outcome == cache_pb2.LOOKUP_OUTCOME_MISS and not sampled.cacheable
    # A fixed seed makes sampling deterministic: coalesced like greedy decoding.
    seeded = [
        await stub.Lookup(lookup("creative", temperature=0.8, seed=7), timeout=5) for _ in range(2)
    ]
    assert [s.outcome for s in seeded] == [
        cache_pb2.LOOKUP_OUTCOME_LEAD,
        cache_pb2.LOOKUP_OUTCOME_FOLLOW,
    ]


async def test_stats_count_what_happened_and_purge_deletes_by_key_family_and_tenant(
    service: Service,
) -> None:
    stub, stats = service
    for tenant, prompt in (("acme", "a"), ("acme", "b"), ("globex", "c")):
        lead = await stub.Lookup(lookup(prompt, tenant=tenant), timeout=5)
        await stub.Store(
            cache_pb2.StoreRequest(
                key=lead.key,
                completion=answer(),
                tenant=tenant,
                lease_token=lead.lease_token,
                keep=True,
            ),
            timeout=5,
        )
    hit = await stub.Lookup(lookup("a"), timeout=5)
    assert hit.hit
    await stats.flush()

    report = await stub.GetStats(cache_pb2.GetStatsRequest(), timeout=5)
    assert (report.hits, report.misses, report.leases, report.coalesced) == (1, 3, 3, 0)
    assert report.hit_ratio == pytest.approx(0.25)
    # The hit saved one answer at shepherd-tiny's list price: 10 in, 3 out.
    assert report.cost_saved.nano_usd == 10 * 20 + 3 * 50
    (family,) = report.families
    assert family.family == "shepherd-tiny" and family.entries == 3 and family.bytes > 0

    by_key = await stub.Purge(cache_pb2.PurgeRequest(key=hit.key), timeout=5)
    by_tenant = await stub.Purge(cache_pb2.PurgeRequest(tenant="globex"), timeout=5)
    by_family = await stub.Purge(cache_pb2.PurgeRequest(family="shepherd-tiny"), timeout=5)
    assert (by_key.deleted, by_tenant.deleted, by_family.deleted) == (1, 1, 1)
    assert not (await stub.GetStats(cache_pb2.GetStatsRequest(), timeout=5)).families


@pytest.mark.parametrize(
    ("purge", "field"),
    [
        (cache_pb2.PurgeRequest(), "target"),
        (cache_pb2.PurgeRequest(family="shepherd-*"), "family"),
        (cache_pb2.PurgeRequest(key="not-a-key"), "key"),
        (cache_pb2.PurgeRequest(tenant="a b"), "tenant"),
    ],
)
async def test_a_purge_must_name_exactly_what_to_delete(
    service: Service, purge: cache_pb2.PurgeRequest, field: str
) -> None:
    stub, _ = service
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Purge(purge, timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{field}:" in (refused.value.details() or "")


async def test_publishing_to_another_tenants_key_is_refused_with_a_status(
    service: Service,
) -> None:
    """Publish is client-streaming: the service gate maps its errors like any other call's."""
    stub, _ = service
    leader = await stub.Lookup(lookup("mine", tenant="acme"), timeout=5)

    async def pieces() -> AsyncIterator[cache_pb2.PublishRequest]:
        yield cache_pb2.PublishRequest(
            key=leader.key, lease_token=leader.lease_token, tenant="globex", text="stolen"
        )

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Publish(pieces(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "may not use cache namespace 'tenant:acme'" in (refused.value.details() or "")
