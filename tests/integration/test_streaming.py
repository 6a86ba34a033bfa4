"""Streaming end to end, as a caller of RouterService/ChatStream sees it, on a real mesh.

Deltas arrive one by one from the decoupled Triton model and from the hosted API's SSE; every
stream ends with exactly one final chunk (normal end, cache hit, cancellation, failure after
some text, deadline); what was generated is billed exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
import tritonclient.grpc as tritonclient
from google.rpc import error_details_pb2
from shepherd.billing.v1 import billing_pb2_grpc
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2, router_pb2_grpc

from deploy.local.launcher import LocalMesh
from libs.config import REPO_ROOT
from tests.integration.conftest import Metadata, tenant_totals
from tests.integration.test_mesh import auth, grpcurl
from tests.integration.test_tenancy import details_of
from tests.support.catalog import ENGINE_MODEL, ENGINE_TRITON_MODEL, SLOW_MODEL, SLOW_TRITON_MODEL
from tests.support.scheduler import triton_counts

TIMEOUT_S = 30.0
STOP, LENGTH = common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH


def stream_request(model: str, text: str, **params: object) -> router_pb2.ChatStreamRequest:
    return router_pb2.ChatStreamRequest(
        model=model,
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)],
        params=common_pb2.GenerationParams(**params),  # type: ignore[arg-type]
    )


def unary_twin(request: router_pb2.ChatStreamRequest) -> router_pb2.ChatRequest:
    """The same request for Chat: the two messages share their fields."""
    return router_pb2.ChatRequest.FromString(request.SerializeToString())


def read(
    stream: object,
) -> tuple[list[str], router_pb2.ChatFinal | None, grpc.RpcError | None]:
    """Deltas, the final chunk and the status error of a ChatStream call, with checks on order."""
    deltas: list[str] = []
    final = None
    error = None
    try:
        for chunk in stream:  # type: ignore[attr-defined]
            assert final is None, "nothing may follow the final chunk"
            if chunk.HasField("delta"):
                deltas.append(chunk.delta.text)
            else:
                final = chunk.final
    except grpc.RpcError as caught:
        error = caught
    return deltas, final, error


def test_grpcurl_shows_the_deltas_arriving_then_one_final_chunk(
    mesh: LocalMesh, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    # tiny-slow paces its tokens 50 ms apart: deltas that arrive faster than the mesh sends
    # them are joined (services/scheduler/events.py), so only a paced model shows each one.
    body = {
        "model": "tiny-slow",
        "messages": [{"role": "ROLE_USER", "content": f"stream to grpcurl {uuid.uuid4().hex}"}],
        "params": {"max_tokens": 4},
    }
    output = grpcurl(
        "-H",
        f"authorization: Bearer {key}",
        "-d",
        json.dumps(body),
        mesh.address("router"),
        "shepherd.router.v1.RouterService/ChatStream",
    )
    chunks = [json.loads(part) for part in output.replace("}\n{", "}\x00{").split("\x00")]
    deltas = [c["delta"]["text"] for c in chunks if "delta" in c]
    assert len(deltas) >= 2, "a streaming model sends its text in several deltas"
    assert [c for c in chunks if "final" in c] == [chunks[-1]]
    final = chunks[-1]["final"]
    assert final["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
    assert int(final["usage"]["completion_tokens"]) >= len(deltas)
    assert final["placement"]["backend_model"] == "tiny_lm_slow"
    assert len(final["trace_id"]) == 32
    # The scheduler measured the time to first token and between tokens.
    stats = json.loads(
        grpcurl(
            "-H",
            f"authorization: Bearer {mesh.config.admin_key}",
            "-d",
            '{"model": "tiny-slow"}',
            mesh.address("scheduler"),
            "shepherd.scheduler.v1.SchedulerService/GetStats",
        )
    )
    (model,) = stats["models"]
    assert 0 < model["ttft_p50_ms"] <= model["ttft_p99_ms"]
    assert model["time_per_output_token_p50_ms"] > 0


@pytest.mark.parametrize("model", ["tiny-stream", "tiny", "gpt4"])
def test_a_stream_says_what_the_unary_answer_says(
    router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str], model: str
) -> None:
    _, key = tenant
    request = stream_request(model, f"same answer both ways {uuid.uuid4().hex}", max_tokens=12)
    request.cache_policy = common_pb2.CACHE_POLICY_BYPASS
    deltas, final, error = read(router.ChatStream(request, metadata=auth(key), timeout=TIMEOUT_S))
    answer = router.Chat(unary_twin(request), metadata=auth(key), timeout=TIMEOUT_S)
    assert error is None and final is not None
    assert "".join(deltas) == answer.text
    assert final.usage == answer.usage
    assert final.cost == answer.cost and final.cost.nano_usd > 0
    assert final.placement.backend_model == answer.placement.backend_model
    assert final.finish_reason in (STOP, LENGTH)
    assert deltas  # how many depends on pacing: deltas that queue up are sent as one


def test_a_cache_hit_replays_as_a_stream_at_no_cost(
    router: router_pb2_grpc.RouterServiceStub,
    billing: billing_pb2_grpc.BillingServiceStub,
    admin_md: Metadata,
    tenant: tuple[str, str],
) -> None:
    name, key = tenant
    request = stream_request("tiny-stream", f"remember me {uuid.uuid4().hex}", max_tokens=10)
    first_deltas, first, _ = read(router.ChatStream(request, metadata=auth(key), timeout=30))
    replay_deltas, replay, error = read(router.ChatStream(request, metadata=auth(key), timeout=30))
    assert first is not None and replay is not None and error is None
    assert not first.cache_hit and replay.cache_hit
    assert "".join(replay_deltas) == "".join(first_deltas) and replay_deltas
    assert replay.cost.nano_usd == 0 and replay.usage == first.usage
    # The unary call is answered from the same entry: the stream stored a complete answer.
    assert router.Chat(unary_twin(request), metadata=auth(key), timeout=30).cache_hit
    assert tenant_totals(billing, admin_md, name).cost.nano_usd == first.cost.nano_usd


def test_cancelling_after_the_first_delta_stops_the_work_and_bills_it_once(
    mesh: LocalMesh,
    router: router_pb2_grpc.RouterServiceStub,
    billing: billing_pb2_grpc.BillingServiceStub,
    admin_md: Metadata,
    tenant: tuple[str, str],
) -> None:
    name, key = tenant
    assert mesh.triton is not None
    triton = tritonclient.InferenceServerClient(mesh.triton.config.grpc_url)

    before = triton_counts(triton, SLOW_TRITON_MODEL)
    request = stream_request(SLOW_MODEL, f"cancel me {uuid.uuid4().hex}", max_tokens=64)
    call = router.ChatStream(request, metadata=auth(key), timeout=TIMEOUT_S)
    first = next(call)
    assert first.HasField("delta")
    call.cancel()
    # Triton records a decoupled model's execution when it ends, with the time it computed:
    # all 64 steps take 64 x 50 ms = 3.2 s; a stopped execution, a fraction of that.
    wait_until = time.monotonic() + 10
    while (
        after := triton_counts(triton, SLOW_TRITON_MODEL)
    ).executions == before.executions and time.monotonic() < wait_until:
        time.sleep(0.1)
    triton.close()
    assert after.executions == before.executions + 1, "the cancelled execution ended"
    spent_s = (after.compute_ns - before.compute_ns) / 1e9
    assert spent_s < 1.6, "it stopped decoding long before its 64 steps"

    deadline = time.monotonic() + 10
    used = tenant_totals(billing, admin_md, name)
    while used.requests == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
        used = tenant_totals(billing, admin_md, name)
    assert used.requests == 1, "the partial answer is billed, once"
    assert 0 < used.usage.completion_tokens < 64
    assert used.cost.nano_usd > 0
    time.sleep(0.5)
    assert tenant_totals(billing, admin_md, name) == used, "and never again"


def test_a_passed_deadline_still_ends_with_a_final_chunk(
    router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    request = stream_request(SLOW_MODEL, f"too slow {uuid.uuid4().hex}", max_tokens=64)
    deltas, final, error = read(router.ChatStream(request, metadata=auth(key), timeout=2.5))
    assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert final is not None, "the final chunk comes before the deadline's status"
    assert final.finish_reason == common_pb2.FINISH_REASON_CANCELLED
    assert deltas and 0 < final.usage.completion_tokens < 64
    assert final.cost.nano_usd > 0


def test_a_hosted_failure_mid_stream_ends_with_a_final_chunk_then_the_error(
    mesh: LocalMesh,
    router: router_pb2_grpc.RouterServiceStub,
    billing: billing_pb2_grpc.BillingServiceStub,
    admin_md: Metadata,
    tenant: tuple[str, str],
) -> None:
    name, key = tenant
    assert mesh.sim is not None
    httpx.post(
        f"{mesh.sim.root_url}/_sim/fail", json={"cut_after": 3, "count": 1}
    ).raise_for_status()
    try:
        request = stream_request("gpt4", f"cut me off {uuid.uuid4().hex}", max_tokens=20)
        deltas, final, error = read(router.ChatStream(request, metadata=auth(key), timeout=30))
    finally:
        httpx.post(f"{mesh.sim.root_url}/_sim/reset").raise_for_status()
    assert deltas and error is not None
    assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
    assert final is not None and final.finish_reason == common_pb2.FINISH_REASON_ERROR
    assert final.usage.completion_tokens >= 1 and final.cost.nano_usd > 0
    assert tenant_totals(billing, admin_md, name).cost.nano_usd == final.cost.nano_usd


def test_hosted_streaming_waits_out_a_429_before_the_first_byte(
    mesh: LocalMesh, router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    assert mesh.sim is not None
    sim = mesh.sim.root_url
    httpx.post(f"{sim}/_sim/fail", json={"status": 429, "count": 1, "retry_after": 0.2})
    try:
        request = stream_request("deepseek", f"retry me {uuid.uuid4().hex}", max_tokens=8)
        deltas, final, error = read(router.ChatStream(request, metadata=auth(key), timeout=30))
        assert error is None and final is not None and deltas
        # A provider that keeps refusing: RESOURCE_EXHAUSTED with RetryInfo, before any text.
        httpx.post(f"{sim}/_sim/fail", json={"status": 429, "count": 10, "retry_after": 30})
        request = stream_request("deepseek", f"give up {uuid.uuid4().hex}", max_tokens=8)
        deltas, final, error = read(router.ChatStream(request, metadata=auth(key), timeout=30))
    finally:
        httpx.post(f"{sim}/_sim/reset").raise_for_status()
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not deltas and final is None
    assert any(isinstance(d, error_details_pb2.RetryInfo) for d in details_of(error))


def test_an_engine_batched_deployment_gets_one_request_per_sequence(
    mesh: LocalMesh, router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    assert mesh.triton is not None
    triton = tritonclient.InferenceServerClient(mesh.triton.config.grpc_url)

    before = triton_counts(triton, ENGINE_TRITON_MODEL)
    barrier = threading.Barrier(8)

    def one(index: int) -> tuple[list[str], router_pb2.ChatFinal | None, grpc.RpcError | None]:
        request = stream_request(ENGINE_MODEL, f"sequence {index} {uuid.uuid4().hex}")
        request.cache_policy = common_pb2.CACHE_POLICY_BYPASS
        barrier.wait(timeout=10)
        return read(router.ChatStream(request, metadata=auth(key), timeout=TIMEOUT_S))

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(8)))
    # Triton records an execution of a decoupled model when it ends: wait for all eight.
    deadline = time.monotonic() + 10
    while (
        after := triton_counts(triton, ENGINE_TRITON_MODEL)
    ).executions - before.executions < 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    triton.close()
    assert all(final is not None and error is None for _, final, error in results)
    assert all(final.placement.batch_size == 1 for _, final, _ in results if final)
    assert (after.inferences - before.inferences, after.executions - before.executions) == (8, 8)


def test_the_python_example_streams(mesh: LocalMesh, tenant: tuple[str, str]) -> None:
    _, key = tenant
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "chat.py"), "--stream",
         "--model", "tiny-stream", "--router", mesh.address("router"), "Hello from the example"],
        env={**os.environ, "SHEPHERD_API_KEY": key}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "on local/tiny_lm_stream (BACKEND_KIND_TRITON)" in result.stdout
    assert "finish FINISH_REASON_" in result.stdout
