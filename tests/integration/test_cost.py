"""What self-hosting cost, end to end through the real mesh: the answer, the ledger, the
operator's reports and the pool report.

A tenant asks a self-hosted model whose family is also on a hosted API (the test catalog's
sovereign-local, of family sovereign with sovereign-hosted): its answers carry their GPU
time; the ledger holds exactly that time, priced at the pool's GPU-hour; the operator's report
compares the self-hosted tokens with the hosted price to the nano-dollar; a cache hit and a
hosted answer used no GPU time; the tenant's own report shows its GPU time but not what it
cost Shepherd; the pool report counts the work.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from shepherd.billing.v1 import admin_pb2, admin_pb2_grpc
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2, router_pb2_grpc

from deploy.local.launcher import LocalMesh
from libs.catalog import load_catalog
from tests.integration.conftest import Metadata
from tests.integration.test_mesh import auth, chat_request
from tests.support.catalog import SOVEREIGN_HOSTED, SOVEREIGN_LOCAL

TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def admin(mesh: LocalMesh) -> Iterator[admin_pb2_grpc.AdminServiceStub]:
    with grpc.insecure_channel(mesh.address("billing")) as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel)


def test_self_hosted_gpu_time_is_on_the_answer_in_the_ledger_and_against_the_hosted_price(
    mesh: LocalMesh,
    router: router_pb2_grpc.RouterServiceStub,
    admin: admin_pb2_grpc.AdminServiceStub,
    admin_md: Metadata,
    tenant: tuple[str, str],
) -> None:
    name, key = tenant
    catalog = load_catalog(Path(mesh.config.extra_env["SHEPHERD_CATALOG"]), env={})
    prompts = [f"what did {n} cost {uuid.uuid4().hex}" for n in range(6)]
    answers = [
        router.Chat(
            chat_request(SOVEREIGN_LOCAL, prompt, max_tokens=4 + n),
            metadata=auth(key),
            timeout=TIMEOUT_S,
        )
        for n, prompt in enumerate(prompts)
    ]
    for answer in answers:
        placement = answer.placement
        assert placement.kind == common_pb2.BACKEND_KIND_TRITON and not answer.cache_hit
        assert 0 < placement.gpu_us <= placement.batch_gpu_us and placement.batch_id
    # The same request again is answered from the cache, which ran on no GPU now.
    hit = router.Chat(
        chat_request(SOVEREIGN_LOCAL, prompts[0], max_tokens=4),
        metadata=auth(key),
        timeout=TIMEOUT_S,
    )
    assert hit.cache_hit
    assert (hit.placement.gpu_us, hit.placement.batch_gpu_us, hit.placement.batch_id) == (0, 0, "")
    hosted = router.Chat(
        chat_request(SOVEREIGN_HOSTED, f"and hosted {uuid.uuid4().hex}", max_tokens=4),
        metadata=auth(key),
        timeout=TIMEOUT_S,
    )
    assert hosted.placement.kind == common_pb2.BACKEND_KIND_HOSTED
    assert hosted.placement.gpu_us == 0

    report = admin.GetTenantReport(
        admin_pb2.GetTenantReportRequest(tenant=name), metadata=admin_md, timeout=5
    )

    buckets = {b.model: b for b in report.buckets}
    bucket = buckets[SOVEREIGN_LOCAL]
    prompt = sum(a.usage.prompt_tokens for a in answers)
    completion = sum(a.usage.completion_tokens for a in answers)
    assert (bucket.requests, bucket.cache_hits, bucket.self_hosted_requests) == (7, 1, 6)
    assert bucket.self_hosted_usage == common_pb2.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
    assert bucket.gpu_us == sum(a.placement.gpu_us for a in answers)
    pool = catalog.pools["local"]
    assert bucket.gpu_cost.nano_usd == sum(pool.gpu_cost_nano(a.placement.gpu_us) for a in answers)
    # The same tokens at the hosted deployment's price, to the nano-dollar (rounded once).
    price = catalog.models[SOVEREIGN_HOSTED].price
    hosted_nano = (
        prompt * price.input_nano_per_million + completion * price.output_nano_per_million + 500_000
    ) // 1_000_000
    assert bucket.hosted_equivalent_cost.nano_usd == hosted_nano
    assert bucket.savings.nano_usd == hosted_nano - bucket.gpu_cost.nano_usd
    assert buckets[SOVEREIGN_HOSTED].gpu_us == 0
    assert not buckets[SOVEREIGN_HOSTED].self_hosted_requests
    # The tenant sees its GPU time, as its answers showed it; Shepherd's costs it does not.
    mine = router.GetUsage(router_pb2.GetUsageRequest(), metadata=auth(key), timeout=5)
    (own,) = [b for b in mine.buckets if b.model == SOVEREIGN_LOCAL]
    assert own.gpu_us == bucket.gpu_us
    assert not own.HasField("gpu_cost") and not own.HasField("hosted_equivalent_cost")

    # The pool counted the batches too (the scheduler reports every second).
    deadline = time.monotonic() + 30
    while True:
        pools = admin.GetPoolReport(
            admin_pb2.GetPoolReportRequest(pool="local"), metadata=admin_md, timeout=5
        )
        (local,) = pools.pools
        if local.busy_gpu_us >= bucket.gpu_us:
            break
        assert time.monotonic() < deadline, "the pool report never counted the batches"
        time.sleep(0.2)
    assert local.capacity_gpu_us > 0 and 0 < local.batch_fill <= 1
    assert local.capacity_cost.nano_usd > 0 and local.busy_cost.nano_usd > 0

    # With the pool's utilisation measured, the advisor has what it needs for the model.
    report = admin.GetTenantReport(
        admin_pb2.GetTenantReportRequest(tenant=name), metadata=admin_md, timeout=5
    )
    (advice,) = [a for a in report.advice if a.model == SOVEREIGN_LOCAL]
    assert advice.pool == "local" and advice.gpu_us_per_token > 0 and advice.verdict
    assert advice.utilisation > 0 and advice.hosted_cost_per_million_tokens.nano_usd > 0
    print(f"advice: {advice.verdict}")
