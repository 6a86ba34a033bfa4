"""Single-flight through the whole mesh: identical requests in flight run once on Triton.

Two router replicas share one cache, one Valkey and one Triton node. What a user sees: the
same answer for everyone, one inference on the GPU (Triton's own statistics), one paid
ledger entry and the rest recorded as coalesced hits at no cost; followers of a streaming
leader get its deltas live; a leader's router dying costs its followers only the lease
expiry and one inference; sampling is never shared. Operators see it in CacheService/GetStats
and can Purge with an admin key, both through grpcurl.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
import tritonclient.grpc as tritonclient
from shepherd.billing.v1 import billing_pb2_grpc
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2, router_pb2_grpc

from deploy.local.launcher import LocalMesh, Replica
from deploy.local.processes import stop
from libs.apikeys import issue_key_at
from libs.credentials import INTERNAL_TOKEN_HEADER
from tests.integration.conftest import Metadata, tenant_totals
from tests.integration.test_mesh import GRPCURL, grpcurl
from tests.support.catalog import SLOW_MODEL, SLOW_TRITON_MODEL
from tests.support.scheduler import triton_counts

TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def replica(mesh: LocalMesh) -> Replica:
    """A second router replica sharing the mesh's cache, Valkey and Triton."""
    return mesh.add_router()


@pytest.fixture
async def routers(
    mesh: LocalMesh, replica: Replica
) -> AsyncIterator[list[router_pb2_grpc.RouterServiceStub]]:
    channels = [grpc.aio.insecure_channel(a) for a in (mesh.address("router"), replica.address)]
    try:
        yield [router_pb2_grpc.RouterServiceStub(c) for c in channels]
    finally:
        for channel in channels:
            await channel.close()


async def new_key(mesh: LocalMesh, prefix: str) -> tuple[str, Metadata]:
    tenant = f"{prefix}-{uuid.uuid4().hex[:8]}"
    key = await issue_key_at(mesh.redis_url, tenant)
    return tenant, (("authorization", f"Bearer {key}"),)


def slow_chat(prompt: str, max_tokens: int = 30, **params: object) -> router_pb2.ChatRequest:
    """A chat on the test's slow model: 50 ms a token, so requests overlap for sure."""
    return router_pb2.ChatRequest(
        model=SLOW_MODEL,
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=prompt)],
        params=common_pb2.GenerationParams(max_tokens=max_tokens, **params),  # type: ignore[arg-type]
    )


def inferences(mesh: LocalMesh, at_least: int = 0) -> int:
    """Triton's count of the slow model's inferences, once it reaches `at_least`.

    Triton updates a decoupled model's statistics as its responses complete, a moment after
    the caller has its answer: wait for the count expected, then give any extra a moment to
    show before reading it for the assertion.
    """
    assert mesh.triton is not None
    client = tritonclient.InferenceServerClient(mesh.triton.config.grpc_url)
    give_up = time.monotonic() + 10
    while (count := triton_counts(client, SLOW_TRITON_MODEL).inferences) < at_least:
        assert time.monotonic() < give_up, f"Triton counted {count} inferences, not {at_least}"
        time.sleep(0.05)
    time.sleep(0.3)
    return triton_counts(client, SLOW_TRITON_MODEL).inferences


async def warm(
    routers: list[router_pb2_grpc.RouterServiceStub], md: Metadata
) -> router_pb2.ChatResponse:
    """Load the slow model on the node first (its first use), outside what is measured."""
    request = slow_chat(f"warm {uuid.uuid4().hex}", max_tokens=1)
    request.cache_policy = common_pb2.CACHE_POLICY_BYPASS
    return await routers[0].Chat(request, metadata=md, timeout=TIMEOUT_S)


async def test_a_hundred_identical_requests_on_two_replicas_run_once(
    mesh: LocalMesh,
    billing: billing_pb2_grpc.BillingServiceStub,
    admin_md: Metadata,
    routers: list[router_pb2_grpc.RouterServiceStub],
) -> None:
    tenant, md = await new_key(mesh, "flight")
    warm_up = await warm(routers, md)
    before = inferences(mesh, at_least=1)
    prompt = f"one answer for all {uuid.uuid4().hex}"

    answers = await asyncio.gather(
        *(
            routers[n % 2].Chat(slow_chat(prompt), metadata=md, timeout=TIMEOUT_S)
            for n in range(100)
        )
    )

    assert inferences(mesh, at_least=before + 1) - before == 1
    assert len({a.text for a in answers}) == 1 and answers[0].text
    paid = [a for a in answers if not a.cache_hit]
    assert len(paid) == 1 and paid[0].cost.nano_usd > 0 and not paid[0].coalesced
    assert sum(a.coalesced for a in answers) == 99
    assert all(a.cost.nano_usd == 0 for a in answers if a.coalesced)
    totals = tenant_totals(billing, admin_md, tenant)
    assert totals.requests == 101  # the warm-up, then 1 paid and 99 coalesced
    assert totals.coalesced == 99
    assert totals.cost.nano_usd == warm_up.cost.nano_usd + paid[0].cost.nano_usd


async def test_followers_of_a_streaming_leader_receive_its_deltas_live(
    mesh: LocalMesh, routers: list[router_pb2_grpc.RouterServiceStub]
) -> None:
    _, md = await new_key(mesh, "fanout")
    await warm(routers, md)
    chat = slow_chat(f"stream it to everyone {uuid.uuid4().hex}", max_tokens=20)
    request = router_pb2.ChatStreamRequest(
        model=chat.model, messages=chat.messages, params=chat.params
    )

    async def stream(router: router_pb2_grpc.RouterServiceStub) -> tuple[list[str], bool]:
        deltas, coalesced = [], False
        async for chunk in router.ChatStream(request, metadata=md, timeout=TIMEOUT_S):
            if chunk.HasField("delta"):
                deltas.append(chunk.delta.text)
            else:
                coalesced = chunk.final.coalesced
        return deltas, coalesced

    leader = asyncio.create_task(stream(routers[0]))
    await asyncio.sleep(0.3)  # the leader is generating: followers join mid-answer
    followers = await asyncio.gather(*(stream(routers[n % 2]) for n in range(6)))
    lead_deltas, lead_coalesced = await leader

    assert not lead_coalesced and len(lead_deltas) > 1
    for deltas, coalesced in followers:
        assert coalesced
        assert deltas == lead_deltas  # the same pieces, in order, from the first


async def test_followers_of_a_router_that_dies_take_over_and_are_answered(
    mesh: LocalMesh, routers: list[router_pb2_grpc.RouterServiceStub]
) -> None:
    _, md = await new_key(mesh, "orphans")
    doomed = mesh.add_router()
    await warm(routers, md)
    prompt = f"my leader dies {uuid.uuid4().hex}"
    async with grpc.aio.insecure_channel(doomed.address) as channel:
        lead = asyncio.ensure_future(
            router_pb2_grpc.RouterServiceStub(channel).Chat(
                slow_chat(prompt, max_tokens=40), metadata=md, timeout=TIMEOUT_S
            )
        )
        await asyncio.sleep(0.5)  # the doomed replica leads
        followers = [
            asyncio.ensure_future(
                routers[n % 2].Chat(
                    slow_chat(prompt, max_tokens=40), metadata=md, timeout=TIMEOUT_S
                )
            )
            for n in range(5)
        ]
        await asyncio.sleep(0.5)
        stop_at = time.monotonic()
        await asyncio.to_thread(mesh.kill, doomed.address)
        answers = await asyncio.gather(*followers)
        with pytest.raises(grpc.aio.AioRpcError):
            await lead
    took = time.monotonic() - stop_at
    stop(doomed.process)

    assert len({a.text for a in answers}) == 1 and answers[0].text
    # One follower took over as the new leader and paid; the others followed it.
    assert sorted(a.coalesced for a in answers) == [False, True, True, True, True]
    assert took < TIMEOUT_S, f"the followers waited {took:.1f}s"


async def test_sampled_requests_are_never_shared(
    mesh: LocalMesh, routers: list[router_pb2_grpc.RouterServiceStub]
) -> None:
    _, md = await new_key(mesh, "sampling")
    await warm(routers, md)
    before = inferences(mesh, at_least=1)
    prompt = f"be creative {uuid.uuid4().hex}"

    answers = await asyncio.gather(
        *(
            routers[n % 2].Chat(
                slow_chat(prompt, max_tokens=10, temperature=1.0), metadata=md, timeout=TIMEOUT_S
            )
            for n in range(5)
        )
    )

    assert inferences(mesh, at_least=before + 5) - before == 5
    assert not any(a.coalesced or a.cache_hit for a in answers)
    assert len({a.seed for a in answers}) == 5


def test_operators_read_stats_and_purge_with_grpcurl(mesh: LocalMesh, admin_md: Metadata) -> None:
    cache = mesh.address("cache")
    admin = ("-H", f"authorization: Bearer {mesh.config.admin_key}")
    stats = json.loads(grpcurl(*admin, cache, "shepherd.cache.v1.CacheService/GetStats"))
    assert int(stats["leases"]) >= 1 and int(stats["coalesced"]) >= 99
    assert any(f["family"] == SLOW_MODEL for f in stats["families"])

    body = json.dumps({"family": SLOW_MODEL})
    purged = json.loads(grpcurl(*admin, "-d", body, cache, "shepherd.cache.v1.CacheService/Purge"))
    assert int(purged["deleted"]) >= 1
    after = json.loads(grpcurl(*admin, cache, "shepherd.cache.v1.CacheService/GetStats"))
    assert not any(f["family"] == SLOW_MODEL for f in after.get("families", []))

    # Purging needs an admin key: the service token of the mesh's own services is not one.
    refused = subprocess.run(
        [
            GRPCURL, "-plaintext", "-H", f"{INTERNAL_TOKEN_HEADER}: {mesh.config.internal_token}",
            "-d", body, cache, "shepherd.cache.v1.CacheService/Purge",
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "Unauthenticated" in refused.stderr or "PermissionDenied" in refused.stderr
