"""End-to-end checks through the router of a real mesh, as a calling service sees it."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
import tritonclient.grpc as tritonclient
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from shepherd.billing.v1 import billing_pb2, billing_pb2_grpc
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2, router_pb2_grpc

from deploy.local.launcher import LocalMesh
from libs.catalog import load_catalog
from libs.config import DEFAULT_CATALOG, REPO_ROOT
from services.scheduler.triton import render_prompt
from tests.integration.conftest import Metadata
from tests.support.catalog import OFFLINE_MODEL
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.scheduler import triton_counts
from tests.support.tiny_lm import tiny_lm_tokenize

CATALOG = load_catalog(DEFAULT_CATALOG)
TIMEOUT_S = 30.0
BILLING_BATCH = "/shepherd.billing.v1.BillingService/RecordUsageBatch"


def chat_request(model: str, text: str, **params: object) -> router_pb2.ChatRequest:
    return router_pb2.ChatRequest(
        model=model,
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)],
        params=common_pb2.GenerationParams(**params),  # type: ignore[arg-type]
    )


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def expected_cost(model: str, usage: common_pb2.Usage) -> int:
    return CATALOG.models[model].price.cost_nano(usage.prompt_tokens, usage.completion_tokens)


def rpc_error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_chat_on_triton_returns_text_usage_cost_and_placement(
    router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    response = router.Chat(
        chat_request("tiny", "Tell me about GPU scheduling"), metadata=auth(key), timeout=TIMEOUT_S
    )
    assert response.model == "shepherd-tiny"
    assert response.text.strip()
    assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens > 0
    assert response.usage.total_tokens == (
        response.usage.prompt_tokens + response.usage.completion_tokens
    )
    assert response.cost.nano_usd == expected_cost("shepherd-tiny", response.usage) > 0
    assert response.placement.kind == common_pb2.BACKEND_KIND_TRITON
    assert response.placement.deployment == "local/tiny_lm"
    assert response.placement.backend_model == "tiny_lm"
    assert not response.cache_hit
    assert len(response.trace_id) == 32 and int(response.trace_id, 16) != 0


def test_chat_on_the_echo_model_echoes_the_rendered_prompt(
    router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    """shepherd-echo (the gateway benchmark's model) answers through the whole mesh with the
    start of the prompt as the scheduler renders it, counted by tiny_lm's tokenizer."""
    _, key = tenant
    text = f"Echo me {uuid.uuid4().hex[:8]}"
    response = router.Chat(
        chat_request("echo", text, max_tokens=6), metadata=auth(key), timeout=TIMEOUT_S
    )
    assert response.model == "shepherd-echo"
    prompt = render_prompt((("user", text),))
    assert response.text == "< | user | > echo"
    assert response.usage.prompt_tokens == len(tiny_lm_tokenize(prompt))
    assert response.usage.completion_tokens == 6
    assert response.finish_reason == "length"
    assert response.cost.nano_usd == expected_cost("shepherd-echo", response.usage) > 0
    assert response.placement.backend_model == "echo_lm"
    assert response.placement.deployment == "local/echo_lm"


def test_chat_on_hosted_api_returns_text_usage_cost_and_placement(
    router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    response = router.Chat(
        chat_request("gpt4", "Compare Triton with a hosted API", max_tokens=24),
        metadata=auth(key),
        timeout=TIMEOUT_S,
    )
    assert response.model == "gpt-4.1"
    assert response.text.strip()
    assert 0 < response.usage.completion_tokens <= 24
    assert response.cost.nano_usd == expected_cost("gpt-4.1", response.usage) > 0
    assert response.placement.kind == common_pb2.BACKEND_KIND_HOSTED
    assert response.placement.backend_model == "gpt-4.1"


def test_billing_shows_each_request_once(
    router: router_pb2_grpc.RouterServiceStub,
    billing: billing_pb2_grpc.BillingServiceStub,
    admin_md: Metadata,
    tenant: tuple[str, str],
) -> None:
    name, key = tenant
    on_triton = router.Chat(
        chat_request("tiny", "bill me once", temperature=0.7, seed=1),
        metadata=auth(key),
        timeout=TIMEOUT_S,
    )
    hosted_request = chat_request("deepseek", "bill me once too", max_tokens=8)
    hosted_request.request_id = f"retry-{uuid.uuid4().hex}"
    on_hosted = router.Chat(hosted_request, metadata=auth(key), timeout=TIMEOUT_S)
    # The caller retries with the same idempotency key: it is answered, but billed only once.
    retried = router.Chat(hosted_request, metadata=auth(key), timeout=TIMEOUT_S)
    assert retried.request_id == on_hosted.request_id
    assert retried.cost.nano_usd == on_hosted.cost.nano_usd

    totals = billing.GetTenantUsage(
        billing_pb2.GetTenantUsageRequest(tenant=name), metadata=admin_md, timeout=5
    )
    assert totals.requests == 2
    assert totals.cost.nano_usd == on_triton.cost.nano_usd + on_hosted.cost.nano_usd
    assert totals.usage.completion_tokens == (
        on_triton.usage.completion_tokens + on_hosted.usage.completion_tokens
    )
    per_model = {m.model: m for m in totals.models}
    assert per_model["shepherd-tiny"].requests == 1
    assert per_model["deepseek-v3.2"].requests == 1
    assert per_model["deepseek-v3.2"].cost.nano_usd == on_hosted.cost.nano_usd


def test_repeated_deterministic_request_is_a_cache_hit(
    router: router_pb2_grpc.RouterServiceStub,
    billing: billing_pb2_grpc.BillingServiceStub,
    admin_md: Metadata,
    tenant: tuple[str, str],
) -> None:
    name, key = tenant
    request = chat_request("tiny", f"cache me {uuid.uuid4().hex}")
    first = router.Chat(request, metadata=auth(key), timeout=TIMEOUT_S)
    second = router.Chat(request, metadata=auth(key), timeout=TIMEOUT_S)
    assert not first.cache_hit
    assert second.cache_hit
    assert second.text == first.text
    assert second.usage == first.usage
    assert second.cost.nano_usd == 0
    totals = billing.GetTenantUsage(
        billing_pb2.GetTenantUsageRequest(tenant=name), metadata=admin_md, timeout=5
    )
    assert totals.cost.nano_usd == first.cost.nano_usd
    assert {m.model: m.cache_hits for m in totals.models} == {"shepherd-tiny": 1}


def test_sampling_without_a_seed_is_not_cached_unless_asked(
    router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    request = chat_request("tiny", f"sample me {uuid.uuid4().hex}", temperature=0.8)
    assert not router.Chat(request, metadata=auth(key), timeout=TIMEOUT_S).cache_hit
    assert not router.Chat(request, metadata=auth(key), timeout=TIMEOUT_S).cache_hit
    request.cache_policy = common_pb2.CACHE_POLICY_ALWAYS
    router.Chat(request, metadata=auth(key), timeout=TIMEOUT_S)
    assert router.Chat(request, metadata=auth(key), timeout=TIMEOUT_S).cache_hit


def test_sampling_with_a_fixed_seed_is_deterministic_and_cached(
    router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    request = chat_request("tiny", f"seeded {uuid.uuid4().hex}", temperature=0.8, seed=7)
    first = router.Chat(request, metadata=auth(key), timeout=TIMEOUT_S)
    again = router.Chat(request, metadata=auth(key), timeout=TIMEOUT_S)
    assert not first.cache_hit and again.cache_hit
    assert again.text == first.text and again.seed == first.seed == 7


def test_concurrent_requests_share_triton_executions(
    mesh: LocalMesh, router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    assert mesh.triton is not None
    triton = tritonclient.InferenceServerClient(mesh.triton.config.grpc_url)

    def counts() -> tuple[int, int]:
        found = triton_counts(triton, "tiny_lm")
        return found.inferences, found.executions

    inferences_before, executions_before = counts()
    requests = []
    for index in range(16):
        request = chat_request("tiny", f"batch me {index} {uuid.uuid4().hex}")
        request.cache_policy = common_pb2.CACHE_POLICY_BYPASS
        requests.append(request)
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(
            pool.map(lambda r: router.Chat(r, metadata=auth(key), timeout=TIMEOUT_S), requests)
        )
    # Triton updates its statistics a moment after the last response leaves: wait for them.
    give_up = time.monotonic() + 10
    while (after := counts())[0] - inferences_before < 16 and time.monotonic() < give_up:
        time.sleep(0.05)
    inferences_after, executions_after = after
    triton.close()

    assert all(r.text for r in responses)
    assert inferences_after - inferences_before == 16
    assert executions_after - executions_before < 16
    assert max(r.placement.batch_size for r in responses) > 1


def test_unknown_model_is_not_found(
    router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    error = rpc_error(
        lambda: router.Chat(chat_request("gpt5", "hi"), metadata=auth(key), timeout=TIMEOUT_S)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "gpt5" in error.details() and "gpt-4.1" in error.details()


def test_bad_input_is_invalid_argument_with_field_violations(
    router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    request = router_pb2.ChatRequest(
        model="tiny", params=common_pb2.GenerationParams(temperature=3.0, max_tokens=100_000)
    )
    error = rpc_error(lambda: router.Chat(request, metadata=auth(key), timeout=TIMEOUT_S))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    fields = {v.field for v in bad_request.field_violations}
    assert fields == {"messages", "params.temperature", "params.max_tokens"}


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer sk-shepherd-wrong"),)])
def test_missing_or_wrong_key_is_unauthenticated(
    router: router_pb2_grpc.RouterServiceStub, metadata: tuple[tuple[str, str], ...]
) -> None:
    error = rpc_error(
        lambda: router.Chat(chat_request("tiny", "hi"), metadata=metadata, timeout=TIMEOUT_S)
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "API key" in error.details()


def test_no_healthy_backend_is_unavailable(
    router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    error = rpc_error(
        lambda: router.Chat(
            chat_request(OFFLINE_MODEL, "hi"), metadata=auth(key), timeout=TIMEOUT_S
        )
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert f"no healthy backend for model {OFFLINE_MODEL}" in error.details()


def test_hosted_rate_limit_is_resource_exhausted_with_retry_info(
    mesh: LocalMesh, router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    assert mesh.sim is not None
    httpx.post(
        f"{mesh.sim.root_url}/_sim/fail", json={"status": 429, "count": 1, "retry_after": 30}
    ).raise_for_status()
    try:
        error = rpc_error(
            lambda: router.Chat(
                chat_request("claude", f"rate limit me {uuid.uuid4().hex}"),
                metadata=auth(key),
                timeout=TIMEOUT_S,
            )
        )
    finally:
        httpx.post(f"{mesh.sim.root_url}/_sim/reset").raise_for_status()
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(error)
    assert status is not None
    retry_info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry_info)
    assert retry_info.retry_delay.seconds == 30


GRPCURL = shutil.which("grpcurl", path=str(REPO_ROOT / ".venv" / "bin")) or "grpcurl"


def grpcurl(*args: str) -> str:
    result = subprocess.run(
        [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_grpcurl_lists_describes_and_calls_the_router(
    mesh: LocalMesh, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    router = mesh.address("router")
    services = grpcurl(router, "list").split()
    assert "shepherd.router.v1.RouterService" in services
    assert "grpc.health.v1.Health" in services
    description = grpcurl(router, "describe", "shepherd.router.v1.RouterService")
    assert "rpc Chat ( .shepherd.router.v1.ChatRequest )" in description
    body = json.dumps(
        {"model": "tiny", "messages": [{"role": "ROLE_USER", "content": "hello from grpcurl"}]}
    )
    call = ("-H", f"authorization: Bearer {key}", "-d", body, router)
    answer = json.loads(grpcurl(*call, "shepherd.router.v1.RouterService/Chat"))
    assert answer["model"] == "shepherd-tiny"
    assert answer["text"]
    assert answer["placement"]["kind"] == "BACKEND_KIND_TRITON"
    health = json.loads(grpcurl(router, "grpc.health.v1.Health/Check"))
    assert health == {"status": "SERVING"}


def test_one_request_makes_one_trace_across_all_services(
    otlp: OtlpReceiver, router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    response = router.Chat(
        chat_request("tiny", f"trace me {uuid.uuid4().hex}"), metadata=auth(key), timeout=TIMEOUT_S
    )
    services = {"shepherd-router", "shepherd-cache", "shepherd-scheduler", "shepherd-billing"}
    expected_names = {"/shepherd.router.v1.RouterService/Chat", "scheduler.batch"}
    spans = otlp.wait_for_trace(response.trace_id, services, expected_names)
    assert services <= {s.service for s in spans}
    assert expected_names <= {s.name for s in spans}
    # Exactly one root: every other span hangs off a span of the same trace.
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if s.parent_span_id not in ids]
    assert len(roots) == 1 and roots[0].service == "shepherd-router"
    batch = next(s for s in spans if s.name == "scheduler.batch")
    scheduler_server = next(
        s
        for s in spans
        if s.name == "/shepherd.scheduler.v1.SchedulerService/InferMany"
        and s.service == "shepherd-scheduler"
    )
    assert (response.trace_id, scheduler_server.span_id) in batch.links


def test_every_trace_shows_its_own_billing_even_when_records_travel_together(
    otlp: OtlpReceiver, router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    # Concurrent answers reach billing in shared RecordUsageBatch calls (the router groups
    # the records of answers that finish while a call is in flight); each record still
    # carries its own request's trace, so no trace loses its billing step: a span of its own
    # (billing.record), or the call's span when the call was sent from that very trace.
    _, key = tenant
    tag = uuid.uuid4().hex

    def ask(n: int) -> router_pb2.ChatResponse:
        request = chat_request("echo", f"grouped billing {tag} {n}", max_tokens=2)
        request.cache_policy = common_pb2.CACHE_POLICY_BYPASS
        return router.Chat(request, metadata=auth(key), timeout=TIMEOUT_S)

    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(ask, range(24)))
    for answer in answers:
        spans = otlp.wait_for_trace(answer.trace_id, {"shepherd-billing"}, set())
        records = [
            s
            for s in spans
            if s.service == "shepherd-billing"
            and s.attributes.get("shepherd.request_id") == answer.request_id
        ]
        assert len(records) == 1, f"trace {answer.trace_id} has {len(records)} billing records"
        assert records[0].name in {"billing.record", BILLING_BATCH}


def test_sampling_without_a_seed_is_fresh_and_the_returned_seed_reproduces_it(
    router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    prompt = f"tell me something new {uuid.uuid4().hex}"

    def ask(**params: object) -> router_pb2.ChatResponse:
        request = chat_request("tiny", prompt, max_tokens=12, **params)
        request.cache_policy = common_pb2.CACHE_POLICY_BYPASS
        return router.Chat(request, metadata=auth(key), timeout=TIMEOUT_S)

    sampled = [ask(temperature=1.5) for _ in range(4)]
    assert all(answer.HasField("seed") for answer in sampled)
    assert len({answer.seed for answer in sampled}) == 4
    assert len({answer.text for answer in sampled}) > 1, "unseeded sampling repeated itself"

    again = ask(temperature=1.5, seed=sampled[0].seed)
    assert again.text == sampled[0].text and again.seed == sampled[0].seed
    assert not ask(temperature=0).HasField("seed")  # greedy: nothing to reproduce


def test_an_operator_reads_the_scheduler_state_with_grpcurl(
    mesh: LocalMesh, router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    router.Chat(
        chat_request("tiny", f"count me {uuid.uuid4().hex}"), metadata=auth(key), timeout=TIMEOUT_S
    )
    call = [mesh.address("scheduler"), "shepherd.scheduler.v1.SchedulerService/GetStats"]
    # Without the admin key the operator is told what to send.
    refused = subprocess.run(
        [GRPCURL, "-plaintext", "-d", "{}", *call], capture_output=True, text=True, timeout=30
    )
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr
    assert "authorization: Bearer <admin key>" in refused.stderr
    stats = json.loads(
        grpcurl(
            "-H", f"authorization: Bearer {mesh.config.admin_key}", "-d", '{"model": "tiny"}', *call
        )
    )
    [model] = stats["models"]
    assert model["model"] == "shepherd-tiny"
    assert int(model["completed"]) >= 1 and int(model["batches"]) >= 1
    local = [n for n in stats["nodes"] if n["pool"] == "local"]
    assert local and local[0]["state"] == "NODE_STATE_HEALTHY"
    assert "tiny_lm" in local[0]["loaded_models"]


def test_a_self_hosted_only_chat_never_goes_to_a_hosted_model(
    router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    request = chat_request("gpt4", f"private {uuid.uuid4().hex}")
    request.self_hosted_only = True
    error = rpc_error(lambda: router.Chat(request, metadata=auth(key), timeout=TIMEOUT_S))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "shepherd-tiny" in error.details()
    request = chat_request("tiny", f"private {uuid.uuid4().hex}")
    request.self_hosted_only = True
    answer = router.Chat(request, metadata=auth(key), timeout=TIMEOUT_S)
    assert answer.placement.kind == common_pb2.BACKEND_KIND_TRITON
