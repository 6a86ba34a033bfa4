"""Chaos: under load, each component is SIGKILLed and restarted; no answer may be lost.

For each of Valkey, the Triton node, billing, cache, scheduler and a router (one of two
replicas behind the callers), twelve callers send chats (Triton and hosted models, cache hits,
streams) for a moment, the component is killed, stays down two seconds, comes back on its
port, and the load goes on for two more seconds. Callers retry retryable statuses with the
same request id on the other router replica, as a careful client does. Then, against the
ledger read back through billing and Valkey:

- every request was answered (none failed for good), each exactly once, under its own id;
- no request was billed twice (the running aggregates count each ledger entry once);
- no computed answer was thrown away (withheld because it could not be billed), and every
  billed request was delivered to its caller;
- Σ ledger = Σ the costs the answers stated, to the nano-dollar.

The time from the component's return to the first success of a request started after it is
reported, not asserted: this machine is shared, and a timed assertion would fail only on a
busy day. Bounded: each fault takes about ten seconds, the module well under three minutes.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
import redis.asyncio as redis
from shepherd.billing.v1 import billing_pb2, billing_pb2_grpc

from deploy.local.launcher import LocalMesh, Replica
from libs.apikeys import issue_key_at
from tests.chaos.load import Load, Outcome
from tests.chaos.report import ChaosReport, FaultRow

FAULTS = ("valkey", "triton", "billing", "cache", "scheduler", "router")
BEFORE_KILL_S = 1.5
DOWN_S = 2.0
AFTER_RETURN_S = 2.0
SETTLE_S = 30.0


async def ledger_of(mesh: LocalMesh, tenant: str) -> billing_pb2.GetTenantUsageResponse:
    async with grpc.aio.insecure_channel(mesh.address("billing")) as channel:
        return await billing_pb2_grpc.BillingServiceStub(channel).GetTenantUsage(
            billing_pb2.GetTenantUsageRequest(tenant=tenant),
            metadata=(("authorization", f"Bearer {mesh.config.admin_key}"),),
            timeout=5,
        )


async def billed_ids(mesh: LocalMesh, tenant: str) -> set[str]:
    """The request ids that have a ledger entry, read from Valkey itself."""
    prefix = f"shepherd:t:{{{tenant}}}:request:"
    client = redis.Redis.from_url(mesh.redis_url)
    try:
        return {key.decode()[len(prefix) :] async for key in client.scan_iter(prefix + "*")}
    finally:
        await client.aclose()


async def settled(mesh: LocalMesh, tenant: str, answered: list[Outcome]) -> None:
    """Wait until spooled usage has reached the ledger (or give up and let the test say so)."""
    want = sum(o.cost_nano for o in answered)
    give_up = time.monotonic() + SETTLE_S
    while time.monotonic() < give_up:
        try:
            usage = await ledger_of(mesh, tenant)
            if usage.cost.nano_usd == want and usage.requests >= len(answered):
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", FAULTS)
async def test_a_killed_component_loses_no_answer_and_bills_nothing_twice(
    fault: str, mesh: LocalMesh, second_router: Replica, report: ChaosReport
) -> None:
    tenant = f"chaos-{fault}-{uuid.uuid4().hex[:6]}"
    key = await issue_key_at(mesh.redis_url, tenant)
    load = Load([mesh.address("router"), second_router.address], key, tag=tenant).start()
    await asyncio.sleep(BEFORE_KILL_S)
    killed = mesh.kill(fault)
    await asyncio.sleep(DOWN_S)
    returned = await asyncio.to_thread(mesh.revive, fault)
    await asyncio.sleep(AFTER_RETURN_S)
    outcomes = await load.stop()

    answered = [o for o in outcomes if o.ok]
    await settled(mesh, tenant, answered)
    usage = await ledger_of(mesh, tenant)
    ids = await billed_ids(mesh, tenant)
    after = [
        a
        for o in outcomes
        for a in o.attempts
        if a.started >= returned and a.code == grpc.StatusCode.OK
    ]
    late_failures = [
        a.ended - returned
        for o in outcomes
        for a in o.attempts
        if a.code != grpc.StatusCode.OK and a.ended > returned
    ]
    row = FaultRow.of(
        fault,
        outcomes,
        usage,
        ids,
        down_s=returned - killed,
        recovery_s=min(a.ended for a in after) - returned if after else None,
        last_failure_after_return_s=max(late_failures) if late_failures else None,
    )
    report.add(row)

    unanswered = [(o.request_id, o.final_code.name) for o in outcomes if not o.ok]
    assert unanswered == [], f"requests that failed for good: {unanswered[:10]}"
    assert row.answered_twice == 0
    assert row.billed_twice == 0
    assert row.thrown_away == 0, "answers were computed and then thrown away, unbilled"
    assert row.lost_answers == 0, (
        f"billed, never delivered: {sorted(ids - {o.request_id for o in answered})[:10]}"
    )
    assert row.ledger_nano == row.answered_nano
    assert usage.requests == len(answered)
    assert after, f"nothing succeeded after the {fault} came back"
