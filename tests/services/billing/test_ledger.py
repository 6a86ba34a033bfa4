"""The usage ledger against a real Valkey server: idempotent, exact and durable."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
import redis.asyncio as redis

from deploy.local.ports import free_port
from deploy.local.valkey import ValkeyConfig, ValkeyServer
from libs.accounts import Accounts, InvalidRecord
from libs.accounts import Aggregate as Totals
from libs.errors import ShepherdError
from libs.server import open_redis
from services.billing.ledger import Bucket, Ledger, UsageEntry, report_range

NOON = dt.datetime(2026, 11, 21, 12, tzinfo=dt.UTC)


def ledger_of(client: redis.Redis) -> Ledger:
    return Ledger(Accounts(client), retention_s=35 * 86_400)


async def billed(ledger: Ledger, usage: UsageEntry) -> tuple[int, bool]:
    recorded = await ledger.record(usage)
    return recorded.cost_nano, recorded.duplicate


def entry(
    request_id: str,
    *,
    tenant: str = "acme",
    model: str = "deepseek-v3.2",
    prompt: int = 100,
    completion: int = 20,
    cost: int = 36_400,
    cache_hit: bool = False,
    at: dt.datetime = NOON,
) -> UsageEntry:
    return UsageEntry(
        request_id=request_id,
        tenant=tenant,
        model=model,
        deployment=f"holysheep/{model}",
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_nano=cost,
        cache_hit=cache_hit,
        recorded_at=at,
    )


async def test_same_request_id_bills_once(client: redis.Redis) -> None:
    ledger = ledger_of(client)

    assert await billed(ledger, entry("req-1", cost=36_400)) == (36_400, False)
    # A retry of the same request, even with different numbers, is not billed again and
    # reports what was billed the first time.
    assert await billed(ledger, entry("req-1", cost=99_999, prompt=5)) == (36_400, True)

    totals = await ledger.tenant_totals("acme")
    assert totals.overall == Totals(
        requests=1, prompt_tokens=100, completion_tokens=20, cost_nano=36_400, cache_hits=0
    )


async def test_unknown_tenant_has_zero_totals(client: redis.Redis) -> None:
    totals = await ledger_of(client).tenant_totals("nobody")
    assert totals.overall == Totals()
    assert totals.models == {}


async def test_totals_per_tenant_and_model_add_up_exactly(client: redis.Redis) -> None:
    ledger = ledger_of(client)
    await ledger.record(entry("a1", model="gpt-4.1", prompt=1_000, completion=500, cost=6_000_000))
    await ledger.record(entry("a2", model="gpt-4.1", prompt=10, completion=1, cost=28_000))
    await ledger.record(entry("a3", model="deepseek-v3.2", prompt=7, completion=3, cost=3_220))
    await ledger.record(
        entry("a4", model="deepseek-v3.2", prompt=7, completion=3, cost=0, cache_hit=True)
    )
    await ledger.record(entry("b1", tenant="globex", model="gpt-4.1", prompt=1, cost=9))

    acme = await ledger.tenant_totals("acme")
    assert acme.overall == Totals(
        requests=4, prompt_tokens=1_024, completion_tokens=507, cost_nano=6_031_220, cache_hits=1
    )
    assert acme.models == {
        "gpt-4.1": Totals(
            requests=2, prompt_tokens=1_010, completion_tokens=501, cost_nano=6_028_000
        ),
        "deepseek-v3.2": Totals(
            requests=2, prompt_tokens=14, completion_tokens=6, cost_nano=3_220, cache_hits=1
        ),
    }
    globex = await ledger.tenant_totals("globex")
    assert globex.overall == Totals(requests=1, prompt_tokens=1, completion_tokens=20, cost_nano=9)
    assert set(globex.models) == {"gpt-4.1"}


async def test_large_amounts_stay_exact(client: redis.Redis) -> None:
    ledger = ledger_of(client)
    big = 4_000_000_000_000_000_001  # beyond float precision (2**53), inside int64
    await ledger.record(entry("big-1", cost=big))
    await ledger.record(entry("big-2", cost=1))

    totals = await ledger.tenant_totals("acme")
    assert totals.overall.cost_nano == big + 1


async def test_a_record_that_would_overflow_is_refused_before_anything_is_written(
    client: redis.Redis,
) -> None:
    ledger = ledger_of(client)
    await ledger.record(entry("near-max", cost=9_000_000_000_000_000_000))
    before = await ledger.tenant_totals("acme")

    with pytest.raises(InvalidRecord, match="would overflow"):
        await ledger.record(entry("too-much", cost=900_000_000_000_000_000))
    with pytest.raises(InvalidRecord, match="not a whole number"):
        await ledger.record(entry("negative", prompt=-1))

    # Nothing of either refused record reached the ledger, and reports still work.
    assert await ledger.tenant_totals("acme") == before
    assert not await client.exists("shepherd:t:{acme}:request:too-much")
    assert await billed(ledger, entry("next", cost=1)) == (1, False)


async def test_model_names_with_colons_keep_their_totals(client: redis.Redis) -> None:
    ledger = ledger_of(client)
    await ledger.record(entry("c1", model="org:model:v2", cost=5))

    totals = await ledger.tenant_totals("acme")
    assert totals.models["org:model:v2"].cost_nano == 5
    assert totals.models["org:model:v2"].requests == 1


async def test_concurrent_duplicates_bill_each_request_exactly_once(valkey: ValkeyServer) -> None:
    # 200 calls share a pool of 20 connections, as a billing replica under a burst does.
    client = open_redis(valkey.config.url, 5.0, max_connections=20)
    try:
        await client.flushdb()
        await check_concurrent_duplicates(ledger_of(client))
    finally:
        await client.aclose()


async def check_concurrent_duplicates(ledger: Ledger) -> None:
    entries = [entry(f"conc-{i}", prompt=i, completion=2 * i, cost=1_000 + i) for i in range(100)]

    results = await asyncio.gather(*(billed(ledger, e) for e in entries + entries[::-1]))

    assert sum(1 for _, duplicate in results if duplicate) == 100
    first, second = results[:100], results[100:][::-1]
    for e, (cost_a, dup_a), (cost_b, dup_b) in zip(entries, first, second, strict=True):
        assert cost_a == cost_b == e.cost_nano
        assert dup_a != dup_b  # exactly one of the two recorded it
    totals = await ledger.tenant_totals("acme")
    assert totals.overall.requests == 100
    assert totals.overall.cost_nano == sum(1_000 + i for i in range(100))
    assert totals.overall.prompt_tokens == sum(range(100))
    assert totals.overall.completion_tokens == 2 * sum(range(100))


async def test_totals_survive_a_valkey_restart(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    server = ValkeyServer(
        ValkeyConfig(port=free_port(), data_dir=tmp_path_factory.mktemp("valkey-restart"))
    ).start()
    try:
        client = open_redis(server.config.url, 2.0)
        try:
            ledger = ledger_of(client)
            for i in range(10):
                await ledger.record(entry(f"r{i}", cost=123_456_789 + i))
            before = await ledger.tenant_totals("acme")
        finally:
            await client.aclose()
        server.stop()  # SIGTERM: Valkey flushes the append-only file before exiting
        server.start()

        client = open_redis(server.config.url, 2.0)
        try:
            ledger = ledger_of(client)
            after = await ledger.tenant_totals("acme")
            # The request ids survived too: a retry after the restart is still a duplicate.
            assert await billed(ledger, entry("r3", cost=1)) == (123_456_792, True)
        finally:
            await client.aclose()
    finally:
        server.stop()

    assert before.overall.requests == 10
    assert after == before


async def test_report_groups_by_day_and_model_and_shows_only_the_tenant(
    client: redis.Redis,
) -> None:
    ledger = ledger_of(client)
    day_before = NOON - dt.timedelta(days=1)
    await ledger.record(entry("a1", model="gpt-4.1", cost=100, at=day_before))
    await ledger.record(entry("a2", model="gpt-4.1", cost=200))
    await ledger.record(entry("a3", model="deepseek-v3.2", cost=0, cache_hit=True))
    await ledger.record(entry("b1", tenant="globex", model="gpt-4.1", cost=999))

    report = await ledger.report("acme", day_before.date(), NOON.date())
    assert [(b.day, b.model, b.usage.requests, b.usage.cost_nano) for b in report] == [
        ("2026-11-20", "gpt-4.1", 1, 100),
        ("2026-11-21", "deepseek-v3.2", 1, 0),
        ("2026-11-21", "gpt-4.1", 1, 200),
    ]
    assert isinstance(report[0], Bucket) and report[1].usage.cache_hits == 1
    assert (
        await ledger.report(
            "acme", NOON.date() + dt.timedelta(days=1), NOON.date() + dt.timedelta(days=2)
        )
        == []
    )


def test_report_range_defaults_to_thirty_days_and_refuses_nonsense() -> None:
    today = NOON.date()
    assert report_range("", "", today) == (today - dt.timedelta(days=29), today)
    assert report_range("2026-11-01", "2026-11-02", today) == (
        dt.date(2026, 11, 1),
        dt.date(2026, 11, 2),
    )
    for start, end in [("yesterday", ""), ("2026-11-05", "2026-11-01"), ("2020-01-01", "")]:
        with pytest.raises(ShepherdError) as caught:
            report_range(start, end, today)
        assert "start_day" in caught.value.message


def test_report_range_ending_near_the_first_date_starts_at_it() -> None:
    """A report ending in the first days of year 1 has fewer than thirty days, not an error.

    Found by the fuzz (tests/fuzz): end_day 0001-01-01 without start_day made the default
    start overflow, and GetUsage answered INTERNAL.
    """
    today = NOON.date()
    assert report_range("", "0001-01-01", today) == (dt.date.min, dt.date.min)
    assert report_range("", "0001-01-10", today) == (dt.date.min, dt.date(1, 1, 10))
    assert report_range("", "9999-12-31", today) == (dt.date(9999, 12, 2), dt.date.max)
