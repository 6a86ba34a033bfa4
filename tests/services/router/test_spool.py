"""The usage spool against the real billing servicer on a real Valkey, taken down and back up.

What a caller and an operator see: a record the spool accepted reaches the ledger exactly
once, whether billing comes back while the router runs or only after the router restarts;
a record billing can never take is set aside, not retried for ever, and does not hold back
the others; a full spool refuses instead of growing without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as redis
from shepherd.billing.v1 import billing_pb2, billing_pb2_grpc

from libs.errors import ShepherdError
from libs.peers import PeerChannel, open_channel
from services.router.spool import UsageSpool, decode, encode
from tests.support.billing import CREDENTIALS, BillingServer, usage_record


@pytest.fixture
async def billing(client: redis.Redis) -> AsyncIterator[tuple[BillingServer, PeerChannel]]:
    """Billing, not started: each test decides when it is up."""
    server = BillingServer(client)
    channel = open_channel(server.address, CREDENTIALS)
    try:
        yield server, channel
    finally:
        await channel.close()
        await server.stop()


async def totals(channel: PeerChannel, tenant: str = "acme") -> billing_pb2.GetTenantUsageResponse:
    stub = billing_pb2_grpc.BillingServiceStub(channel)
    return await stub.GetTenantUsage(billing_pb2.GetTenantUsageRequest(tenant=tenant), timeout=5)


def spooled(directory: Path) -> list[billing_pb2.RecordUsageRequest]:
    """Every record in the spool's segment files."""
    return [r for path in sorted(directory.glob("*.log")) for r in decode(path.read_bytes())]


async def replayed(spool: UsageSpool, timeout_s: float = 20.0) -> None:
    """Replay until the spool is empty (billing may take a moment to be reachable again)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while not await spool.replay():
        assert loop.time() < give_up, f"{spool.pending} records still spooled"
        await asyncio.sleep(0.1)


async def test_records_spooled_while_billing_is_down_are_billed_once_when_it_returns(
    billing: tuple[BillingServer, PeerChannel], tmp_path: Path
) -> None:
    server, channel = billing
    spool = UsageSpool(tmp_path, billing_pb2_grpc.BillingServiceStub(channel), call_timeout_s=1)
    spool.open()

    await asyncio.gather(*(spool.put(usage_record(f"r{i}")) for i in range(40)))
    # Billing is down: a round keeps everything, on disk.
    assert not await spool.replay()
    assert spool.pending == 40
    assert len(spooled(tmp_path)) == 40

    await server.start()
    await replayed(spool)

    usage = await totals(channel)
    assert usage.requests == 40
    assert spool.pending == 0 and spooled(tmp_path) == []
    # A record billing already had (its answer was lost, not its usage) is not billed again.
    await spool.put(usage_record("r0"))
    await replayed(spool)
    assert (await totals(channel)).requests == 40


async def test_a_restarted_router_replays_what_its_previous_run_spooled(
    billing: tuple[BillingServer, PeerChannel], tmp_path: Path
) -> None:
    server, channel = billing
    stub = billing_pb2_grpc.BillingServiceStub(channel)
    first = UsageSpool(tmp_path, stub)
    first.open()
    for i in range(5):
        await first.put(usage_record(f"before-crash-{i}"))
    # The process dies half-way through appending a sixth record: that record was never
    # acknowledged (its caller got no answer), so only the torn bytes are left behind.
    with (tmp_path / "current.log").open("ab") as log:
        log.write(encode(usage_record("torn"))[:-7])

    await server.start()
    second = UsageSpool(tmp_path, stub)
    assert second.open() == 5
    await replayed(second)

    usage = await totals(channel)
    assert usage.requests == 5
    assert spooled(tmp_path) == []


async def test_a_record_billing_refuses_is_set_aside_and_the_others_are_billed(
    billing: tuple[BillingServer, PeerChannel], tmp_path: Path
) -> None:
    server, channel = billing
    await server.start()
    spool = UsageSpool(tmp_path, billing_pb2_grpc.BillingServiceStub(channel))
    spool.open()
    bad = usage_record("bad")
    bad.model = "no-such-model"

    for item in (usage_record("ok-1"), bad, usage_record("ok-2")):
        await spool.put(item)
    await replayed(spool)

    assert (await totals(channel)).requests == 2
    assert [r.request_id for r in decode((tmp_path / "rejected.log").read_bytes())] == ["bad"]


async def test_a_full_spool_refuses_with_unavailable(
    billing: tuple[BillingServer, PeerChannel], tmp_path: Path
) -> None:
    _, channel = billing
    spool = UsageSpool(tmp_path, billing_pb2_grpc.BillingServiceStub(channel), max_records=3)
    spool.open()
    for i in range(3):
        await spool.put(usage_record(f"r{i}"))

    with pytest.raises(ShepherdError) as refused:
        await spool.put(usage_record("r3"))

    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert "usage spool is full (3 records)" in refused.value.message


async def test_the_replay_loop_bills_records_without_being_asked(
    billing: tuple[BillingServer, PeerChannel], tmp_path: Path
) -> None:
    server, channel = billing
    spool = UsageSpool(
        tmp_path, billing_pb2_grpc.BillingServiceStub(channel), replay_interval_s=0.05
    )
    spool.open()
    spool.start()
    try:
        await spool.put(usage_record("while-down"))
        await server.start()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 20
        while (await totals(channel)).requests < 1:
            assert loop.time() < give_up, "the replay loop never billed the record"
            await asyncio.sleep(0.05)
    finally:
        await spool.close(timeout_s=5)
    assert spool.pending == 0
