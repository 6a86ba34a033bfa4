"""Usage records in groups: the router's UsageRecorder against billing's RecordUsageBatch.

Both ends are the real code: BillingServicer on a real grpc.aio server (behind the same
ServiceGate every service runs) over a real Valkey, and the recorder on a PeerChannel.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as redis
from shepherd.billing.v1 import billing_pb2, billing_pb2_grpc

from deploy.local.ports import free_port
from libs.errors import ShepherdError
from libs.peers import open_channel
from services.billing.servicer import MAX_BATCH_RECORDS, MAX_RECORD_TOKENS
from services.router.usage import UsageRecorder
from tests.support.billing import CREDENTIALS, BillingServer, CountingBilling, usage_record


@pytest.fixture
async def billing(
    client: redis.Redis,
) -> AsyncIterator[tuple[CountingBilling, billing_pb2_grpc.BillingServiceStub]]:
    server = await BillingServer(client).start()
    channel = open_channel(server.address, CREDENTIALS)
    try:
        yield server.servicer, billing_pb2_grpc.BillingServiceStub(channel)
    finally:
        await channel.close()
        await server.stop()


record = usage_record


async def test_a_lone_record_goes_at_once_and_is_billed_once(
    billing: tuple[CountingBilling, billing_pb2_grpc.BillingServiceStub],
) -> None:
    servicer, stub = billing
    recorder = UsageRecorder(stub)

    first = await asyncio.wait_for(recorder.record(record("r1"), 5.0), 5.0)
    again = await recorder.record(record("r1"), 5.0)

    assert first.cost.nano_usd > 0 and not first.duplicate
    assert again.duplicate and again.cost == first.cost
    assert servicer.batches == [1, 1]


async def test_records_that_arrive_while_a_call_is_in_flight_go_together(
    billing: tuple[CountingBilling, billing_pb2_grpc.BillingServiceStub],
) -> None:
    servicer, stub = billing
    recorder = UsageRecorder(stub, max_inflight=1)
    single = await recorder.record(record("price"), 5.0)

    answers = await asyncio.gather(*(recorder.record(record(f"r{i}"), 5.0) for i in range(50)))

    assert all(a.cost == single.cost and not a.duplicate for a in answers)
    # The first record left alone; the other 49 queued behind it and left as one group.
    assert servicer.batches[1:] == [1, 49]
    totals = await stub.GetTenantUsage(billing_pb2.GetTenantUsageRequest(tenant="acme"), timeout=5)
    assert totals.requests == 51
    assert totals.cost.nano_usd == 51 * single.cost.nano_usd


async def test_a_bad_record_fails_alone_and_its_group_mates_are_billed(
    billing: tuple[CountingBilling, billing_pb2_grpc.BillingServiceStub],
) -> None:
    servicer, stub = billing
    recorder = UsageRecorder(stub, max_inflight=1)
    await recorder.record(record("warm"), 5.0)
    bad = record("bad")
    bad.model = "no-such-model"
    conflicting = record("warm", fingerprint="e" * 64)  # same id, another request: refused

    outcomes = await asyncio.gather(
        recorder.record(record("first"), 5.0),
        recorder.record(bad, 5.0),
        recorder.record(record("good", tenant="globex"), 5.0),
        recorder.record(conflicting, 5.0),
        return_exceptions=True,
    )

    assert isinstance(outcomes[0], billing_pb2.RecordUsageResponse)
    assert isinstance(outcomes[2], billing_pb2.RecordUsageResponse)
    assert isinstance(outcomes[1], ShepherdError)
    assert outcomes[1].code == grpc.StatusCode.NOT_FOUND and "no-such-model" in outcomes[1].message
    assert isinstance(outcomes[3], ShepherdError)
    assert outcomes[3].code == grpc.StatusCode.INVALID_ARGUMENT
    assert "already billed for a different request" in outcomes[3].message
    assert servicer.batches[1:] == [1, 3]
    globex = await stub.GetTenantUsage(
        billing_pb2.GetTenantUsageRequest(tenant="globex"), timeout=5
    )
    assert globex.requests == 1


async def test_billing_down_fails_every_record_of_the_call_unavailable() -> None:
    channel = open_channel(f"127.0.0.1:{free_port()}", CREDENTIALS)
    recorder = UsageRecorder(billing_pb2_grpc.BillingServiceStub(channel))
    try:
        outcomes = await asyncio.gather(
            *(recorder.record(record(f"r{i}"), 0.5) for i in range(3)), return_exceptions=True
        )
    finally:
        await channel.close()
    assert all(isinstance(o, ShepherdError) for o in outcomes)
    assert {o.code for o in outcomes if isinstance(o, ShepherdError)} <= {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }


async def test_an_oversized_batch_is_refused_with_the_limit(
    billing: tuple[CountingBilling, billing_pb2_grpc.BillingServiceStub],
) -> None:
    _, stub = billing
    request = billing_pb2.RecordUsageBatchRequest(
        records=[record(f"r{i}") for i in range(MAX_BATCH_RECORDS + 1)]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RecordUsageBatch(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_BATCH_RECORDS} records" in (caught.value.details() or "")


async def test_an_absurd_token_count_is_refused_and_the_tenant_stays_readable(
    billing: tuple[CountingBilling, billing_pb2_grpc.BillingServiceStub],
) -> None:
    # int64-max tokens once left a tenant's totals half-written, and GetTenantUsage INTERNAL.
    _, stub = billing
    recorder = UsageRecorder(stub)
    huge = record("huge")
    huge.usage.completion_tokens = 2**63 - 1
    fine = await recorder.record(record("fine"), 5.0)

    with pytest.raises(ShepherdError) as refused:
        await recorder.record(huge, 5.0)

    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_RECORD_TOKENS:,}" in refused.value.message
    totals = await stub.GetTenantUsage(billing_pb2.GetTenantUsageRequest(tenant="acme"), timeout=5)
    assert totals.requests == 1 and totals.cost == fine.cost
