"""Tenant accounts against a real Valkey server: reservations, settlement, limits, isolation.

Time is passed in, so windows, lease expiry and period boundaries are tested exactly.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import redis.asyncio as redis

from libs.accounts import Accounts, Admission, Limits, TenantLimits, period_end, tenant_prefix

T0 = dt.datetime(2026, 11, 21, 12, 0, 0, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)


async def admit(
    accounts: Accounts,
    request_id: str,
    *,
    tenant: str = "acme",
    fingerprint: str = "fp",
    model: str = "gpt-4.1",
    worst: int = 1_000,
    tokens: int = 100,
    lease_ms: int = 30_000,
    now: dt.datetime = T0,
) -> Admission:
    return await accounts.admit(
        tenant=tenant,
        request_id=request_id,
        fingerprint=fingerprint,
        model=model,
        worst_cost_nano=worst,
        estimated_tokens=tokens,
        lease_ms=lease_ms,
        member=f"{request_id}@{now.timestamp()}",
        now=now,
    )


async def record(
    accounts: Accounts,
    request_id: str,
    *,
    tenant: str = "acme",
    fingerprint: str = "fp",
    model: str = "gpt-4.1",
    cost: int = 600,
    prompt: int = 10,
    completion: int = 20,
    now: dt.datetime = T0,
) -> tuple[int, bool, bool, bool]:
    recorded = await accounts.record(
        tenant=tenant,
        request_id=request_id,
        fingerprint=fingerprint,
        model=model,
        deployment="holysheep/gpt-4.1",
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_nano=cost,
        cache_hit=False,
        now=now,
        retention_s=35 * 86_400,
    )
    return recorded.cost_nano, recorded.duplicate, recorded.conflict, recorded.capped


async def spent_and_reserved(accounts: Accounts, tenant: str = "acme") -> tuple[int, int]:
    overall, _ = await accounts.period(tenant, "day", "2026-11-21")
    return overall.cost_nano, overall.reserved_nano


async def test_reserve_then_settle_moves_the_worst_case_to_the_actual_cost(
    client: redis.Redis,
) -> None:
    accounts = Accounts(client)
    assert (await admit(accounts, "r1", worst=1_000)).outcome == "admitted"
    assert await spent_and_reserved(accounts) == (0, 1_000)

    assert await record(accounts, "r1", cost=600) == (600, False, False, False)
    assert await spent_and_reserved(accounts) == (600, 0)
    _, models = await accounts.period("acme", "month", "2026-11")
    assert models["gpt-4.1"].cost_nano == 600 and models["gpt-4.1"].reserved_nano == 0


async def test_a_cost_above_the_reservation_is_capped_at_it(client: redis.Redis) -> None:
    accounts = Accounts(client)
    await admit(accounts, "r1", worst=500)
    assert await record(accounts, "r1", cost=700) == (500, False, False, True)
    assert await spent_and_reserved(accounts) == (500, 0)


async def test_request_ids_are_scoped_by_tenant(client: redis.Redis) -> None:
    accounts = Accounts(client)
    await admit(accounts, "shared-id", tenant="acme")
    assert await record(accounts, "shared-id", tenant="acme", cost=600) == (
        600,
        False,
        False,
        False,
    )
    # globex reuses acme's id with another body: its own, fresh request, billed in full.
    assert (await admit(accounts, "shared-id", tenant="globex", fingerprint="other")).accepted
    assert await record(accounts, "shared-id", tenant="globex", fingerprint="other", cost=900) == (
        900,
        False,
        False,
        False,
    )
    assert (await accounts.totals("acme"))[0].cost_nano == 600
    assert (await accounts.totals("globex"))[0].cost_nano == 900
    assert all(k.startswith(b"shepherd:t:{") for k in await client.keys("shepherd:t:*"))


async def test_a_reused_id_with_another_request_is_a_conflict_never_a_free_answer(
    client: redis.Redis,
) -> None:
    accounts = Accounts(client)
    await admit(accounts, "r1", fingerprint="hello")
    # In flight: another body under the same id is refused at admission.
    assert (await admit(accounts, "r1", fingerprint="bye")).outcome == "conflict"
    # The same body is a retry: it reuses the reservation instead of taking a second one.
    assert (await admit(accounts, "r1", fingerprint="hello")).outcome == "reused"
    assert await spent_and_reserved(accounts) == (0, 1_000)
    await record(accounts, "r1", fingerprint="hello", cost=600)
    # Billed: a retry reserves nothing and is a duplicate; another body is a conflict.
    assert (await admit(accounts, "r1", fingerprint="hello")).outcome == "billed"
    assert await record(accounts, "r1", fingerprint="hello", cost=600) == (600, True, False, False)
    assert (await admit(accounts, "r1", fingerprint="bye")).outcome == "conflict"
    assert (await record(accounts, "r1", fingerprint="bye", cost=5))[2] is True
    assert await spent_and_reserved(accounts) == (600, 0)


async def test_a_budget_is_never_overshot_by_concurrent_reservations(client: redis.Redis) -> None:
    accounts = Accounts(client)
    await accounts.set_limits("acme", TenantLimits(overall=Limits(day_nano=10_000)))
    outcomes = await asyncio.gather(*(admit(accounts, f"r{n}", worst=300) for n in range(200)))
    admitted = [n for n, a in enumerate(outcomes) if a.accepted]
    assert len(admitted) == 10_000 // 300
    refused = next(a for a in outcomes if not a.accepted)
    assert (refused.outcome, refused.period, refused.limit) == ("budget", "day", 10_000)
    assert refused.reserved == 300 * len(admitted)
    # Settling below the worst case frees room for exactly the money left.
    for n in admitted:
        await record(accounts, f"r{n}", cost=200)
    spent, reserved = await spent_and_reserved(accounts)
    assert (spent, reserved) == (200 * len(admitted), 0)
    more = [await admit(accounts, f"late{n}", worst=300) for n in range(40)]
    assert sum(a.accepted for a in more) == (10_000 - spent) // 300


async def test_monthly_and_per_model_budgets_apply_too(client: redis.Redis) -> None:
    accounts = Accounts(client)
    await accounts.set_limits(
        "acme",
        TenantLimits(
            overall=Limits(month_nano=5_000),
            models={"claude-sonnet-4.5": Limits(day_nano=1_500)},
        ),
    )
    assert (await admit(accounts, "c1", model="claude-sonnet-4.5", worst=1_000)).accepted
    refused = await admit(accounts, "c2", model="claude-sonnet-4.5", worst=1_000)
    assert (refused.outcome, refused.scope, refused.period) == ("budget", "m", "day")
    assert (await admit(accounts, "g1", model="gpt-4.1", worst=3_500)).accepted
    refused = await admit(accounts, "g2", model="gpt-4.1", worst=1_000)
    assert (refused.outcome, refused.scope, refused.period) == ("budget", "t", "month")


async def test_a_lease_of_a_dead_router_expires_and_its_money_comes_back(
    client: redis.Redis,
) -> None:
    accounts = Accounts(client)
    await accounts.set_limits("acme", TenantLimits(overall=Limits(day_nano=1_000)))
    assert (await admit(accounts, "orphan", worst=1_000, lease_ms=5_000)).accepted
    assert not (await admit(accounts, "next", worst=1_000)).accepted
    assert await accounts.open_leases("acme", T0 + dt.timedelta(seconds=4)) == 1
    # After the lease ends the next script of the tenant releases it: the money is back.
    later = T0 + dt.timedelta(seconds=6)
    assert (await admit(accounts, "next", worst=1_000, now=later)).accepted
    assert await spent_and_reserved(accounts) == (0, 1_000)
    # A late record of the orphan still bills what it used, once, and never twice.
    assert (await record(accounts, "orphan", cost=100, now=later))[:2] == (100, False)


async def test_release_gives_the_reservation_back(client: redis.Redis) -> None:
    accounts = Accounts(client)
    await admit(accounts, "r1", worst=700)
    assert await accounts.release("acme", "r1") is True
    assert await accounts.release("acme", "r1") is False
    assert await spent_and_reserved(accounts) == (0, 0)
    assert await accounts.open_leases("acme", T0) == 0


async def test_requests_per_minute_is_a_sliding_window(client: redis.Redis) -> None:
    accounts = Accounts(client)
    await accounts.set_limits("acme", TenantLimits(overall=Limits(rpm=3)))
    times = [T0, T0 + dt.timedelta(seconds=10), T0 + dt.timedelta(seconds=20)]
    for n, at in enumerate(times):
        assert (await admit(accounts, f"r{n}", now=at)).accepted
    refused = await admit(accounts, "r3", now=T0 + dt.timedelta(seconds=30))
    assert (refused.outcome, refused.limit, refused.retry_after_ms) == ("rpm", 3, 30_000)
    # The first request leaves the window 60 s after it came, and not a millisecond before.
    assert not (
        await admit(accounts, "r4", now=T0 + MINUTE - dt.timedelta(milliseconds=1))
    ).accepted
    assert (await admit(accounts, "r5", now=T0 + MINUTE)).accepted


async def test_tokens_per_minute_reserve_the_estimate_and_settle_to_the_actual(
    client: redis.Redis,
) -> None:
    accounts = Accounts(client)
    await accounts.set_limits("acme", TenantLimits(models={"gpt-4.1": Limits(tpm=250)}))
    assert (await admit(accounts, "r1", tokens=100)).accepted
    assert (await admit(accounts, "r2", tokens=100)).accepted
    refused = await admit(accounts, "r3", tokens=100)
    assert (refused.outcome, refused.scope, refused.retry_after_ms) == ("tpm", "m", 60_000)
    # r1 used 30 of its 100 estimated tokens: the window now holds 130, so r3 fits.
    await record(accounts, "r1", prompt=10, completion=20)
    assert (await admit(accounts, "r3", tokens=100)).accepted
    assert (await admit(accounts, "too-big", tokens=251)).outcome == "tpm_never"
    # Other models are not limited.
    assert (await admit(accounts, "other", model="deepseek-v3.2", tokens=1_000)).accepted


async def test_a_refused_request_takes_nothing(client: redis.Redis) -> None:
    accounts = Accounts(client)
    await accounts.set_limits("acme", TenantLimits(overall=Limits(rpm=10, day_nano=500)))
    assert (await admit(accounts, "big", worst=600)).outcome == "budget"
    for n in range(10):
        assert (await admit(accounts, f"r{n}", worst=10)).accepted
    assert await spent_and_reserved(accounts) == (0, 100)


async def test_limits_round_trip_and_replace(client: redis.Redis) -> None:
    accounts = Accounts(client)
    limits = TenantLimits(
        overall=Limits(day_nano=1, month_nano=2, rpm=3, tpm=4),
        models={"gpt-4.1": Limits(rpm=5)},
    )
    await accounts.set_limits("acme", limits)
    assert await accounts.limits("acme") == limits
    await accounts.set_limits("acme", TenantLimits())
    assert await accounts.limits("acme") == TenantLimits()


async def test_ledger_entries_expire_after_the_retention_and_aggregates_stay(
    client: redis.Redis,
) -> None:
    accounts = Accounts(client)
    await admit(accounts, "r1")
    await record(accounts, "r1")
    prefix = tenant_prefix("acme")
    assert 35 * 86_400 - 5 <= await client.ttl(prefix + "request:r1") <= 35 * 86_400
    assert await client.ttl(prefix + "day:2026-11-21") == -1
    assert await client.ttl(prefix + "totals") == -1


def test_periods_end_at_utc_midnight_and_month_start() -> None:
    assert period_end("day", T0) == dt.datetime(2026, 11, 22, tzinfo=dt.UTC)
    assert period_end("month", T0) == dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    december = dt.datetime(2026, 12, 31, 23, 59, tzinfo=dt.UTC)
    assert period_end("month", december) == dt.datetime(2027, 1, 1, tzinfo=dt.UTC)


async def test_money_beyond_double_precision_stays_exact(client: redis.Redis) -> None:
    accounts = Accounts(client)
    budget = 2**62 + 7  # far beyond 2**53, where a Lua number would round
    await accounts.set_limits("acme", TenantLimits(overall=Limits(month_nano=budget)))
    worst = 2**61 + 3
    assert (await admit(accounts, "a", worst=worst)).accepted
    assert (await admit(accounts, "b", worst=worst)).accepted
    # 2 * (2**61 + 3) = 2**62 + 6 is reserved; 2 more would pass a double, not an integer.
    refused = await admit(accounts, "c", worst=2)
    assert refused.outcome == "budget" and refused.reserved == 2 * worst
    assert (await admit(accounts, "d", worst=1)).accepted
    assert (await record(accounts, "a", cost=2**61 + 1))[0] == 2**61 + 1
    overall, _ = await accounts.period("acme", "month", "2026-11")
    assert overall.cost_nano == 2**61 + 1 and overall.reserved_nano == worst + 1


async def test_a_free_request_reserves_and_releases_nothing(client: redis.Redis) -> None:
    accounts = Accounts(client)
    assert (await admit(accounts, "free", worst=0)).accepted
    assert await accounts.release("acme", "free") is True
    assert await spent_and_reserved(accounts) == (0, 0)


async def test_an_admission_run_twice_counts_its_tokens_once(client: redis.Redis) -> None:
    """A command whose connection broke after Redis ran it is retried (libs/server.open_redis):
    the same admission, same window member, must not count its tokens twice."""
    accounts = Accounts(client)
    await accounts.set_limits("acme", TenantLimits(overall=Limits(tpm=250)))
    assert (await admit(accounts, "r1", tokens=100)).outcome == "admitted"
    assert (await admit(accounts, "r1", tokens=100)).outcome == "reused"

    # 100 of 250 tokens are used, not 200: a request of 150 still fits.
    assert (await admit(accounts, "r2", tokens=150)).outcome == "admitted"
    assert (await admit(accounts, "r3", tokens=1)).outcome == "tpm"
