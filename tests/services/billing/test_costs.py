"""What self-hosting cost, against a real Valkey: GPU time and its price in the ledger, the
hosted-equivalent cost in usage reports, the pools' hourly figures and the cost advisor.

The servicers are the production ones over a real Redis; only the gRPC transport is left
out (their methods are called directly, as the gate would after checking the caller).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import grpc
import pytest
import redis.asyncio as redis
from shepherd.billing.v1 import admin_pb2, billing_pb2
from shepherd.common.v1 import common_pb2

from libs.accounts import Accounts
from libs.apikeys import KeyStore
from libs.catalog import Catalog, Price, parse_catalog
from libs.errors import ShepherdError
from services.billing.admin import AdminServicer
from services.billing.costs import NODE_MONTH_HOURS
from services.billing.ledger import Ledger
from services.billing.pools import HOUR_US, PoolStore
from services.billing.servicer import BillingServicer

SELF_HOSTED = "tiny"  # on pool gpu, with a hosted deployment of its own to compare with
FAMILY_ONLY = "tiny-ft"  # on pool gpu, compared with its family's hosted model
ALONE = "tiny-alone"  # on pool gpu, nothing hosted to compare with
HOSTED = "big"  # hosted only
HOSTED_PRICE = {"input_usd_per_million": "0.28", "output_usd_per_million": "0.42"}


def catalog() -> Catalog:
    cheap = {"input_usd_per_million": "0.02", "output_usd_per_million": "0.05"}

    def triton(model: str) -> dict[str, Any]:
        return {"kind": "triton", "pool": "gpu", "model": model}

    return parse_catalog(
        {
            "pools": {
                "gpu": {"nodes": ["127.0.0.1:1"], "gpu_hour_usd": "4.00", "gpus_per_node": 2}
            },
            "providers": {"sim": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "K"}},
            "models": {
                SELF_HOSTED: {
                    "price": cheap,
                    "deployments": [
                        triton("tiny_lm"),
                        {"kind": "hosted", "provider": "sim", "model": "x", "price": HOSTED_PRICE},
                    ],
                },
                FAMILY_ONLY: {"family": HOSTED, "price": cheap, "deployments": [triton("ft")]},
                ALONE: {"price": cheap, "deployments": [triton("alone")]},
                HOSTED: {
                    "price": {"input_usd_per_million": "2.00", "output_usd_per_million": "8.00"},
                    "deployments": [{"kind": "hosted", "provider": "sim", "model": "big"}],
                },
            },
        },
        env={},
    )


@pytest.fixture
def servicers(client: redis.Redis) -> tuple[BillingServicer, AdminServicer, Catalog]:
    shipped = catalog()
    accounts = Accounts(client)
    ledger = Ledger(accounts, 86_400)
    pools = PoolStore(client)
    return (
        BillingServicer(shipped, ledger, pools),
        AdminServicer(shipped, KeyStore(client), accounts, ledger, pools),
        shipped,
    )


def record(
    request_id: str,
    model: str,
    *,
    prompt: int,
    completion: int,
    gpu_us: int = 0,
    deployment: str = "",
    cache_hit: bool = False,
    tenant: str = "acme",
) -> billing_pb2.RecordUsageRequest:
    return billing_pb2.RecordUsageRequest(
        request_id=request_id,
        tenant=tenant,
        model=model,
        deployment=deployment or f"gpu/{catalog().models[model].deployments[0].backend_model}",
        usage=common_pb2.Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        ),
        cache_hit=cache_hit,
        fingerprint=request_id.ljust(64, "0"),
        gpu_us=gpu_us,
    )


def gpu_cost(gpu_us: int) -> int:
    """$4.00 a GPU-hour, in nano-USD, rounded half up once."""
    return (gpu_us * 4_000_000_000 + 1_800_000_000) // 3_600_000_000


async def test_gpu_time_is_priced_exactly_and_the_report_compares_it_with_hosted(
    servicers: tuple[BillingServicer, AdminServicer, Catalog],
) -> None:
    billing, admin, _ = servicers
    rows = [(31, 16, 4_417), (17, 9, 2_001), (1_000, 999, 123_457), (5, 1, 9)]
    for n, (prompt, completion, gpu_us) in enumerate(rows):
        response = await billing.RecordUsage(
            record(f"r{n}", SELF_HOSTED, prompt=prompt, completion=completion, gpu_us=gpu_us),
            None,
        )
        assert response.gpu_cost.nano_usd == gpu_cost(gpu_us)
    # A retry reports the same GPU cost and adds nothing.
    again = await billing.RecordUsage(
        record("r0", SELF_HOSTED, prompt=31, completion=16, gpu_us=4_417), None
    )
    assert again.duplicate and again.gpu_cost.nano_usd == gpu_cost(4_417)
    # A cache hit ran on no GPU now, whatever its placement said: it counts in neither cost.
    await billing.RecordUsage(
        record("hit", SELF_HOSTED, prompt=31, completion=16, gpu_us=4_417, cache_hit=True), None
    )
    # A request that spilled to the hosted API has no GPU time, and is not self-hosted.
    await billing.RecordUsage(
        record("spill", SELF_HOSTED, prompt=40, completion=8, deployment="sim/x"), None
    )

    report = await admin.GetTenantReport(admin_pb2.GetTenantReportRequest(tenant="acme"), None)

    (bucket,) = report.buckets
    prompt, completion = sum(r[0] for r in rows), sum(r[1] for r in rows)
    assert bucket.requests == len(rows) + 2
    assert bucket.self_hosted_requests == len(rows)
    assert bucket.self_hosted_usage == common_pb2.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
    assert bucket.gpu_us == sum(r[2] for r in rows)
    assert bucket.gpu_cost.nano_usd == sum(gpu_cost(r[2]) for r in rows)
    # Hosted equivalent: the self-hosted tokens at the hosted deployment's price ($0.28 and
    # $0.42 per million), to the nano-dollar: priced once over the bucket's tokens.
    hosted = (prompt * 280_000_000 + completion * 420_000_000 + 500_000) // 1_000_000
    assert bucket.hosted_equivalent_cost.nano_usd == hosted
    assert hosted == Price(280_000_000, 420_000_000).cost_nano(prompt, completion)
    assert bucket.savings.nano_usd == hosted - bucket.gpu_cost.nano_usd
    assert report.total_gpu_cost == bucket.gpu_cost
    # BillingService/GetUsage answers the same report.
    usage = await billing.GetUsage(billing_pb2.GetUsageRequest(tenant="acme"), None)
    assert list(usage.buckets) == list(report.buckets)
    totals = await billing.GetTenantUsage(billing_pb2.GetTenantUsageRequest(tenant="acme"), None)
    assert (totals.gpu_us, totals.gpu_cost) == (bucket.gpu_us, bucket.gpu_cost)
    assert totals.models[0].gpu_us == bucket.gpu_us


async def test_the_hosted_equivalent_comes_from_the_family_or_is_left_unset(
    servicers: tuple[BillingServicer, AdminServicer, Catalog],
) -> None:
    billing, admin, _ = servicers
    await billing.RecordUsage(record("a", FAMILY_ONLY, prompt=10, completion=5, gpu_us=7), None)
    await billing.RecordUsage(record("b", ALONE, prompt=10, completion=5, gpu_us=7), None)
    await billing.RecordUsage(
        record("c", HOSTED, prompt=10, completion=5, deployment="sim/big"), None
    )

    report = await admin.GetTenantReport(admin_pb2.GetTenantReportRequest(tenant="acme"), None)

    buckets = {b.model: b for b in report.buckets}
    # tiny-ft is compared with its family's hosted model, big, at $2 and $8 per million.
    assert buckets[FAMILY_ONLY].hosted_equivalent_cost.nano_usd == (10 * 2_000 + 5 * 8_000)
    assert buckets[FAMILY_ONLY].savings.nano_usd == 60_000 - gpu_cost(7)
    # Nothing to compare with: unset, not zero.
    assert not buckets[ALONE].HasField("hosted_equivalent_cost")
    assert not buckets[ALONE].HasField("savings")
    # A hosted-only model: no GPU time, no self-hosted tokens, nothing to compare.
    assert (buckets[HOSTED].gpu_us, buckets[HOSTED].self_hosted_requests) == (0, 0)
    assert not buckets[HOSTED].HasField("hosted_equivalent_cost")


async def test_gpu_time_on_a_hosted_deployment_is_refused_before_anything_is_written(
    servicers: tuple[BillingServicer, AdminServicer, Catalog],
) -> None:
    billing, admin, _ = servicers
    for bad in (
        record("h", SELF_HOSTED, prompt=1, completion=1, gpu_us=5, deployment="sim/x"),
        record("n", SELF_HOSTED, prompt=1, completion=1, gpu_us=-1),
    ):
        with pytest.raises(ShepherdError) as refused:
            await billing.RecordUsage(bad, None)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "gpu_us" in refused.value.message
    report = await admin.GetTenantReport(admin_pb2.GetTenantReportRequest(tenant="acme"), None)
    assert list(report.buckets) == []


def delta(pool: str, start_us: int, end_us: int, **figures: int) -> billing_pb2.PoolUsageDelta:
    return billing_pb2.PoolUsageDelta(
        pool=pool, from_unix_us=start_us, to_unix_us=end_us, **figures
    )


def hour_start(at: dt.datetime) -> int:
    return int(at.timestamp()) // 3600 * HOUR_US


async def test_pool_figures_count_once_per_report_and_wall_time_once_per_moment(
    servicers: tuple[BillingServicer, AdminServicer, Catalog],
) -> None:
    billing, admin, _ = servicers
    h = hour_start(dt.datetime.now(dt.UTC)) - HOUR_US  # the previous hour, all of it past
    second = 1_000_000
    first = billing_pb2.RecordPoolUsageRequest(
        reporter="sched-a",
        sequence=1,
        deltas=[
            delta(
                "gpu",
                h,
                h + 10 * second,
                gpus=2,
                busy_gpu_us=4 * second,
                executions=10,
                rows=40,
                batch_slots=80,
            ),
        ],
    )
    assert not (await billing.RecordPoolUsage(first, None)).duplicate
    # Sent again (its answer was lost): nothing more.
    assert (await billing.RecordPoolUsage(first, None)).duplicate
    # A second replica observed 5..15 s: only 10..15 s is new wall time; its work all counts.
    await billing.RecordPoolUsage(
        billing_pb2.RecordPoolUsageRequest(
            reporter="sched-b",
            sequence=1,
            deltas=[
                delta(
                    "gpu",
                    h + 5 * second,
                    h + 15 * second,
                    gpus=2,
                    busy_gpu_us=3 * second,
                    executions=5,
                    rows=5,
                    batch_slots=40,
                ),
            ],
        ),
        None,
    )
    day = dt.datetime.fromtimestamp(h / 1e6, dt.UTC).date().isoformat()
    report = await admin.GetPoolReport(
        admin_pb2.GetPoolReportRequest(pool="gpu", start_day=day, end_day=day), None
    )

    (hour,) = report.hours
    assert hour.hour == dt.datetime.fromtimestamp(h / 1e6, dt.UTC).strftime("%Y-%m-%dT%H")
    assert (hour.wall_us, hour.capacity_gpu_us, hour.busy_gpu_us) == (
        15 * second,
        30 * second,
        7 * second,
    )
    assert hour.utilisation == pytest.approx(7 / 30)
    assert (hour.executions, hour.rows) == (15, 45)
    assert hour.batch_fill == pytest.approx(45 / 120)
    assert hour.capacity_cost.nano_usd == gpu_cost(30 * second)
    assert hour.busy_cost.nano_usd == gpu_cost(7 * second)
    (whole,) = report.pools
    assert (whole.pool, whole.hour, whole.busy_gpu_us) == ("gpu", "", 7 * second)


async def test_a_report_that_is_malformed_is_refused(
    servicers: tuple[BillingServicer, AdminServicer, Catalog],
) -> None:
    billing, _, _ = servicers
    h = hour_start(dt.datetime.now(dt.UTC))
    for bad, field in (
        (billing_pb2.RecordPoolUsageRequest(reporter="", sequence=1), "reporter"),
        (billing_pb2.RecordPoolUsageRequest(reporter="a", sequence=0), "sequence"),
        (
            billing_pb2.RecordPoolUsageRequest(
                reporter="a", sequence=1, deltas=[delta("gpu", h - 1, h + 1)]
            ),
            "within one hour",
        ),
        (
            billing_pb2.RecordPoolUsageRequest(
                reporter="a", sequence=1, deltas=[delta("gpu", h, h + 1, busy_gpu_us=-1)]
            ),
            "busy_gpu_us",
        ),
    ):
        with pytest.raises(ShepherdError) as refused:
            await billing.RecordPoolUsage(bad, None)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert field in str(refused.value.message) + str(refused.value.details)


async def test_the_advisor_finds_the_volume_where_self_hosting_beats_the_hosted_price(
    servicers: tuple[BillingServicer, AdminServicer, Catalog],
) -> None:
    billing, admin, _ = servicers
    now = dt.datetime.now(dt.UTC)
    h = hour_start(now)
    # The pool was 25 % busy while watched: 90 of 360 GPU-seconds.
    await billing.RecordPoolUsage(
        billing_pb2.RecordPoolUsageRequest(
            reporter="s",
            sequence=1,
            deltas=[delta("gpu", h, h + 180_000_000, gpus=2, busy_gpu_us=90_000_000)],
        ),
        None,
    )
    # 2,000,000 self-hosted tokens (1.5 M prompt, 0.5 M completion) took 1,000 GPU-seconds.
    await billing.RecordUsage(
        record("x", SELF_HOSTED, prompt=1_500_000, completion=500_000, gpu_us=10**9), None
    )
    await billing.RecordUsage(record("y", ALONE, prompt=10, completion=5, gpu_us=7), None)

    report = await admin.GetTenantReport(
        admin_pb2.GetTenantReportRequest(tenant="acme", end_day=now.date().isoformat()), None
    )

    advice = {a.model: a for a in report.advice}
    tiny = advice[SELF_HOSTED]
    assert (tiny.pool, tiny.utilisation) == ("gpu", pytest.approx(0.25))
    assert tiny.gpu_us_per_token == pytest.approx(500.0)
    # Hosted: (1.5 M × $0.28 + 0.5 M × $0.42) / 2 M tokens = $0.315 per million.
    assert tiny.hosted_cost_per_million_tokens.nano_usd == 315_000_000
    # Self-hosted at 25 %: 500 GPU-µs a token / 0.25 × $4 per GPU-hour = $2.2222 per million.
    assert tiny.self_hosted_cost_per_million_tokens.nano_usd == round(
        500 * 1_000_000 * 4_000_000_000 / (3_600_000_000 * 0.25)
    )
    assert tiny.node_monthly_cost.nano_usd == 2 * 4_000_000_000 * NODE_MONTH_HOURS
    # Dearer than hosted at any volume at 25 %; it would take 25 % × 2.2222 / 0.315.
    assert tiny.break_even_tokens_per_month == 0
    assert tiny.break_even_utilisation == pytest.approx(0.25 * 2_222_222_222 / 315_000_000)
    assert "needs at least" in tiny.verdict
    assert "cannot advise" in advice[ALONE].verdict
    assert "no hosted deployment" in advice[ALONE].verdict

    # Another tenant whose tokens take a thousandth of that: self-hosting wins above the
    # volume whose hosted bill is one node's month, $5,840 at $0.315 a million.
    await billing.RecordUsage(
        record("z", SELF_HOSTED, prompt=1_500_000, completion=500_000, gpu_us=10**6, tenant="lean"),
        None,
    )
    lean = await admin.GetTenantReport(
        admin_pb2.GetTenantReportRequest(tenant="lean", end_day=now.date().isoformat()), None
    )
    (wins,) = lean.advice
    assert wins.self_hosted_cost_per_million_tokens.nano_usd == 2_222_222
    assert wins.break_even_tokens_per_month == 5_840_000_000_000 * 1_000_000 // 315_000_000
    assert wins.tokens_per_month == 2_000_000  # a 30-day report: its own volume
    assert "beats the hosted price above 18,539,682,539 tokens a month" in wins.verdict


async def test_a_report_that_would_overflow_a_figure_writes_nothing(
    servicers: tuple[BillingServicer, AdminServicer, Catalog], client: redis.Redis
) -> None:
    billing, admin, _ = servicers
    h = hour_start(dt.datetime.now(dt.UTC))
    await client.hset(f"shepherd:pool:{{gpu}}:hour:{h // HOUR_US}", "rows", 8 * 10**18)
    await client.zadd("shepherd:pool:{gpu}:hours", {str(h // HOUR_US): h // HOUR_US})
    report = billing_pb2.RecordPoolUsageRequest(
        reporter="s", sequence=1, deltas=[delta("gpu", h, h + 10, gpus=1, rows=1)]
    )
    with pytest.raises(ShepherdError) as refused:
        await billing.RecordPoolUsage(report, None)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    pools = await admin.GetPoolReport(admin_pb2.GetPoolReportRequest(pool="gpu"), None)
    assert (pools.pools[0].rows, pools.pools[0].wall_us) == (8 * 10**18, 0)


async def test_reports_reach_the_last_day_there_is(
    servicers: tuple[BillingServicer, AdminServicer, Catalog],
) -> None:
    billing, admin, _ = servicers
    for first in ("9999-12-31", "0001-01-01"):
        request = {"start_day": first, "end_day": first}
        usage = await billing.GetUsage(billing_pb2.GetUsageRequest(tenant="acme", **request), None)
        assert list(usage.buckets) == []
        pools = await admin.GetPoolReport(admin_pb2.GetPoolReportRequest(**request), None)
        assert [p.pool for p in pools.pools] == ["gpu"]
