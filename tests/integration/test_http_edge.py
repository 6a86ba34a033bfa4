"""The OpenAI-compatible HTTP edge on a real mesh, as code written for OpenAI uses it.

The official `openai` SDK, sync and async, points its base_url at the router's HTTP port:
chats, streams with usage, model lists, and every error class mapped to the SDK's exception.
curl shows the SSE framing byte for byte. The same deterministic request through HTTP and
gRPC gives the same text, usage and cost, and one request id is billed once whichever way it
came. SIGTERM drains HTTP as it drains gRPC.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import openai
import pytest
from shepherd.billing.v1 import admin_pb2, admin_pb2_grpc, billing_pb2_grpc
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2, router_pb2_grpc

from deploy.local.launcher import LocalMesh
from tests.integration.conftest import Metadata, tenant_totals
from tests.integration.test_mesh import auth, chat_request, expected_cost
from tests.support.catalog import OFFLINE_MODEL, SLOW_MODEL

TIMEOUT_S = 30.0
TRACE_ID = re.compile(r"^[0-9a-f]{32}$")


def client(mesh: LocalMesh, key: str) -> openai.OpenAI:
    """The SDK as a user sets it up, without its own retries so each error shows as it is."""
    return openai.OpenAI(
        base_url=mesh.openai_base_url, api_key=key, max_retries=0, timeout=TIMEOUT_S
    )


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def prompt(label: str) -> str:
    return f"{label} {uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def admin(mesh: LocalMesh) -> Iterator[admin_pb2_grpc.AdminServiceStub]:
    with grpc.insecure_channel(mesh.address("billing")) as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel)


def set_limits(
    admin: admin_pb2_grpc.AdminServiceStub, admin_md: Metadata, tenant: str, **limits: Any
) -> None:
    admin.SetTenantLimits(
        admin_pb2.SetTenantLimitsRequest(
            tenant=tenant,
            limits=admin_pb2.TenantLimits(overall=admin_pb2.Limits(**limits)),
        ),
        metadata=admin_md,
        timeout=5,
    )


# -- answers ----------------------------------------------------------------------------------


def test_the_openai_sdk_chats_through_the_mesh_and_is_billed(
    mesh: LocalMesh,
    tenant: tuple[str, str],
    billing: billing_pb2_grpc.BillingServiceStub,
    admin_md: Metadata,
) -> None:
    name, key = tenant
    raw = client(mesh, key).chat.completions.with_raw_response.create(
        model="tiny", messages=user(prompt("hello")), max_tokens=8, temperature=0
    )
    answer = raw.parse()
    assert answer.object == "chat.completion" and answer.model == "shepherd-tiny"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content
    assert answer.choices[0].finish_reason in {"stop", "length"}
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 8
    usage = common_pb2.Usage(
        prompt_tokens=answer.usage.prompt_tokens, completion_tokens=answer.usage.completion_tokens
    )
    cost = expected_cost("shepherd-tiny", usage)
    # What it cost, where it ran and its trace: in the headers and in the body's extra field.
    request_id = raw.headers["x-request-id"]
    assert answer.id == f"chatcmpl-{request_id}"
    assert raw.headers["x-shepherd-cost-nano-usd"] == str(cost)
    assert "backend=triton" in raw.headers["x-shepherd-placement"]
    assert raw.headers["x-shepherd-cache-hit"] == "false"
    assert TRACE_ID.match(raw.headers["x-shepherd-trace-id"])
    extra = (answer.model_extra or {})["shepherd"]
    assert extra["cost_nano_usd"] == cost and extra["request_id"] == request_id
    assert extra["trace_id"] == raw.headers["x-shepherd-trace-id"]
    totals = tenant_totals(billing, admin_md, name)
    assert (totals.requests, totals.cost.nano_usd) == (1, cost)


async def test_the_async_sdk_streams_deltas_then_always_the_usage(
    mesh: LocalMesh, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    async with openai.AsyncOpenAI(
        base_url=mesh.openai_base_url, api_key=key, max_retries=0, timeout=TIMEOUT_S
    ) as aclient:
        text = prompt("stream")
        # tiny-slow paces its tokens, so the deltas arrive one by one. No stream_options:
        # the usage chunk comes all the same.
        stream = await aclient.chat.completions.create(
            model=SLOW_MODEL, messages=user(text), max_tokens=5, stream=True
        )
        chunks = [chunk async for chunk in stream]
        unary = await aclient.chat.completions.create(
            model=SLOW_MODEL, messages=user(text), max_tokens=5
        )
    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(deltas) == 5, "one delta per token of the paced model"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    extra = (last.model_extra or {})["shepherd"]
    # tiny-slow is a copy of shepherd-tiny-stream, at its price (tests/support/catalog.py).
    assert extra["cost_nano_usd"] == expected_cost(
        "shepherd-tiny-stream",
        common_pb2.Usage(
            prompt_tokens=last.usage.prompt_tokens, completion_tokens=last.usage.completion_tokens
        ),
    )
    # The unary answer of the same request is the same text (from the cache: it is deterministic).
    assert unary.choices[0].message.content == "".join(deltas)
    assert (unary.model_extra or {})["shepherd"]["cache_hit"] is True


def test_models_lists_names_and_aliases_and_retrieves_one(
    mesh: LocalMesh, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    sdk = client(mesh, key)
    listed = {model.id: model for model in sdk.models.list()}
    assert {"shepherd-tiny", "tiny", "gpt-4.1", "gpt4"} <= set(listed)
    assert (listed["tiny"].model_extra or {})["root"] == "shepherd-tiny"
    assert all(model.object == "model" for model in listed.values())
    gpt4 = sdk.models.retrieve("gpt4")
    assert gpt4.id == "gpt4" and (gpt4.model_extra or {})["root"] == "gpt-4.1"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("no-such-model")
    with pytest.raises(openai.AuthenticationError):
        client(mesh, "sk-shepherd-wrong").models.list()


# -- errors, each as the SDK's own exception ---------------------------------------------------


def test_bad_requests_are_bad_request_errors_naming_the_param(
    mesh: LocalMesh, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    sdk = client(mesh, key)
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model="tiny", messages=user("hi"), n=2)
    assert caught.value.param == "n"  # type: ignore[attr-defined]
    # Checked by the pipeline, named as the caller named it.
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=100_000)
    assert caught.value.param == "max_tokens"  # type: ignore[attr-defined]
    assert "max_tokens: must be between 1 and 64" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(
            model="tiny", messages=user("hi"), extra_headers={"x-shepherd-priority": "urgent"}
        )
    assert caught.value.param == "x-shepherd-priority"  # type: ignore[attr-defined]


def test_a_wrong_or_missing_key_is_an_authentication_error(mesh: LocalMesh) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        client(mesh, "sk-shepherd-wrong").chat.completions.create(model="tiny", messages=user("x"))
    assert caught.value.code == "invalid_api_key"
    missing = httpx.post(
        f"{mesh.openai_base_url}/chat/completions",
        json={"model": "tiny", "messages": user("x")},
        timeout=TIMEOUT_S,
    )
    assert missing.status_code == 401
    assert "missing API key" in missing.json()["error"]["message"]


def test_a_prompt_that_must_stay_self_hosted_is_denied_a_hosted_model(
    mesh: LocalMesh, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client(mesh, key).chat.completions.create(
            model="gpt4",
            messages=user(prompt("secret")),
            extra_headers={"x-shepherd-self-hosted-only": "true"},
        )
    assert "must stay on self-hosted nodes" in caught.value.message


def test_an_unknown_model_is_not_found_with_suggestions(
    mesh: LocalMesh, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    with pytest.raises(openai.NotFoundError) as caught:
        client(mesh, key).chat.completions.create(model="tinny", messages=user("x"))
    assert caught.value.code == "model_not_found"
    assert "Did you mean" in caught.value.message and "tiny" in caught.value.message


def test_rate_limits_and_budgets_are_rate_limit_errors_with_retry_after(
    mesh: LocalMesh,
    tenant: tuple[str, str],
    admin: admin_pb2_grpc.AdminServiceStub,
    admin_md: Metadata,
) -> None:
    name, key = tenant
    sdk = client(mesh, key)
    set_limits(admin, admin_md, name, requests_per_minute=1)
    sdk.chat.completions.create(model="tiny", messages=user(prompt("one")), max_tokens=4)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model="tiny", messages=user(prompt("two")), max_tokens=4)
    assert caught.value.type == "requests" and caught.value.code == "rate_limit_exceeded"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    set_limits(admin, admin_md, name, daily_budget=common_pb2.Money(nano_usd=1))
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model="tiny", messages=user(prompt("three")), max_tokens=4)
    assert caught.value.code == "insufficient_quota"
    assert "budget exhausted" in caught.value.message
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_no_healthy_backend_is_a_503(mesh: LocalMesh, tenant: tuple[str, str]) -> None:
    _, key = tenant
    with pytest.raises(openai.InternalServerError) as caught:
        client(mesh, key).chat.completions.create(model=OFFLINE_MODEL, messages=user("x"))
    assert caught.value.status_code == 503
    assert f"no healthy backend for model {OFFLINE_MODEL}" in caught.value.message


def test_a_passed_deadline_is_a_504_and_a_stream_still_gets_its_usage(
    mesh: LocalMesh, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    sdk = client(mesh, key)
    # The first request loads tiny-slow onto the node (it is not preloaded): not under a deadline.
    sdk.chat.completions.create(model=SLOW_MODEL, messages=user(prompt("load")), max_tokens=1)
    deadline = {"x-shepherd-timeout-s": "1.5"}  # tiny-slow needs 3.2 s for 64 tokens
    with pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(
            model=SLOW_MODEL, messages=user(prompt("late")), max_tokens=64, extra_headers=deadline
        )
    assert caught.value.status_code == 504
    # Streamed: the text generated in time arrives, then the usage chunk (what was generated
    # is billed), then the error event, which the SDK raises.
    chunks = []
    with pytest.raises(openai.APIError) as failed:
        for chunk in sdk.chat.completions.create(
            model=SLOW_MODEL,
            messages=user(prompt("late stream")),
            max_tokens=64,
            stream=True,
            extra_headers=deadline,
        ):
            chunks.append(chunk)
    assert "deadline" in failed.value.message.lower()
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert 0 < chunks[-1].usage.completion_tokens < 64


def test_the_edges_own_errors_are_openai_json_too(mesh: LocalMesh, tenant: tuple[str, str]) -> None:
    _, key = tenant
    headers = {"authorization": f"Bearer {key}"}
    with httpx.Client(base_url=mesh.openai_base_url, headers=headers, timeout=TIMEOUT_S) as http:
        unknown = http.post("/audio/speech", json={"model": "tiny", "input": "x"})
        assert unknown.status_code == 404
        assert unknown.json()["error"]["message"] == "Invalid URL (POST /v1/audio/speech)"
        wrong_method = http.get("/chat/completions")
        assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
        not_json = http.post("/chat/completions", content=b"{not json")
        assert not_json.status_code == 400 and not_json.json()["error"]["param"] == "body"
        huge = {"model": "tiny", "messages": user("x" * (9 * 1024 * 1024))}
        too_large = http.post("/chat/completions", json=huge)
        assert too_large.status_code == 413
        assert too_large.json()["error"]["code"] == "request_too_large"


# -- the wire, and the same request either way -------------------------------------------------


def test_curl_sees_server_sent_events_framed_as_openai_frames_them(
    mesh: LocalMesh, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    text = prompt("curl")
    common = [
        "curl", "-sS", "--max-time", "30", f"{mesh.openai_base_url}/chat/completions",
        "-H", f"authorization: Bearer {key}", "-H", "content-type: application/json",
    ]  # fmt: skip
    body = {"model": "tiny-stream", "messages": user(text), "max_tokens": 6, "temperature": 0}
    streamed = subprocess.run(
        [*common, "-N", "-i", "-d", json.dumps({**body, "stream": True})],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    head, _, raw = streamed.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-type: text/event-stream" in head.lower()
    assert raw.endswith(b"\n\ndata: [DONE]\n\n")
    frames = raw.split(b"\n\n")[:-1]
    assert all(frame.startswith(b"data: ") and b"\n" not in frame for frame in frames)
    chunks = [json.loads(frame[len(b"data: ") :]) for frame in frames[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    streamed_text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1])
    whole = json.loads(
        subprocess.run(
            [*common, "-d", json.dumps(body)], capture_output=True, check=True, timeout=60
        ).stdout
    )
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"]["content"] == streamed_text


def test_one_request_id_through_grpc_then_http_is_one_answer_billed_once(
    mesh: LocalMesh,
    tenant: tuple[str, str],
    router: router_pb2_grpc.RouterServiceStub,
    billing: billing_pb2_grpc.BillingServiceStub,
    admin_md: Metadata,
) -> None:
    name, key = tenant
    request_id, text = uuid.uuid4().hex, prompt("both ways")
    request = chat_request("tiny", text, max_tokens=8, temperature=0)
    request.request_id = request_id
    via_grpc = router.Chat(request, metadata=auth(key), timeout=TIMEOUT_S)
    via_http = client(mesh, key).chat.completions.create(
        model="tiny",
        messages=user(text),
        max_tokens=8,
        temperature=0,
        extra_headers={"Idempotency-Key": request_id},
    )
    assert via_http.id == f"chatcmpl-{request_id}"
    assert via_http.choices[0].message.content == via_grpc.text
    assert via_http.usage is not None
    assert (via_http.usage.prompt_tokens, via_http.usage.completion_tokens) == (
        via_grpc.usage.prompt_tokens,
        via_grpc.usage.completion_tokens,
    )
    assert (via_http.model_extra or {})["shepherd"]["cost_nano_usd"] == via_grpc.cost.nano_usd > 0
    totals = tenant_totals(billing, admin_md, name)
    assert (totals.requests, totals.cost.nano_usd) == (1, via_grpc.cost.nano_usd)


def test_the_same_request_computed_either_way_says_the_same_at_the_same_price(
    mesh: LocalMesh,
    tenant: tuple[str, str],
    router: router_pb2_grpc.RouterServiceStub,
    billing: billing_pb2_grpc.BillingServiceStub,
    admin_md: Metadata,
) -> None:
    name, key = tenant
    text = prompt("computed twice")
    # The cache is bypassed both ways, so both are computed on Triton (deterministic: greedy).
    request = chat_request("tiny", text, max_tokens=8, temperature=0)
    request.cache_policy = common_pb2.CACHE_POLICY_BYPASS
    via_grpc = router.Chat(request, metadata=auth(key), timeout=TIMEOUT_S)
    raw = client(mesh, key).chat.completions.with_raw_response.create(
        model="tiny",
        messages=user(text),
        max_tokens=8,
        temperature=0,
        extra_headers={"x-shepherd-cache-policy": "bypass"},
    )
    via_http = raw.parse()
    assert via_http.choices[0].message.content == via_grpc.text
    assert via_http.usage is not None
    assert via_http.usage.total_tokens == via_grpc.usage.total_tokens
    assert raw.headers["x-shepherd-cost-nano-usd"] == str(via_grpc.cost.nano_usd)
    assert not via_grpc.cache_hit and raw.headers["x-shepherd-cache-hit"] == "false"
    totals = tenant_totals(billing, admin_md, name)
    assert (totals.requests, totals.cost.nano_usd) == (2, 2 * via_grpc.cost.nano_usd)


def test_the_callers_traceparent_is_continued(mesh: LocalMesh, tenant: tuple[str, str]) -> None:
    _, key = tenant
    trace_id = uuid.uuid4().hex
    raw = client(mesh, key).chat.completions.with_raw_response.create(
        model="tiny",
        messages=user(prompt("traced")),
        max_tokens=4,
        extra_headers={"traceparent": f"00-{trace_id}-{'1' * 16}-01"},
    )
    assert raw.headers["x-shepherd-trace-id"] == trace_id
    assert (raw.parse().model_extra or {})["shepherd"]["trace_id"] == trace_id


def test_stop_sequences_end_the_text_where_they_begin(
    mesh: LocalMesh, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    sdk = client(mesh, key)
    text = prompt("stop")
    whole = (
        sdk.chat.completions.create(
            model="tiny-stream", messages=user(text), max_tokens=12, temperature=0
        )
        .choices[0]
        .message.content
    )
    assert whole is not None and len(whole.split(" ")) > 4
    stop = " " + whole.split(" ")[3]
    expected = whole[: whole.index(stop)]
    cut = sdk.chat.completions.create(
        model="tiny-stream", messages=user(text), max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    chunks = list(
        sdk.chat.completions.create(
            model="tiny-stream",
            messages=user(text),
            max_tokens=12,
            temperature=0,
            stop=stop,
            stream=True,
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


# -- shutdown ---------------------------------------------------------------------------------


def test_sigterm_finishes_http_requests_in_flight_and_refuses_new_ones(
    mesh: LocalMesh, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    assert mesh.sim is not None
    replica = mesh.add_router({"SHEPHERD_SHUTDOWN_GRACE_S": "60"})
    base = f"http://{replica.http_address}/v1"
    headers = {"authorization": f"Bearer {key}"}
    # The hosted simulator waits 400 ms before each token: the stream below (12 tokens or
    # more, about 5 s) lasts long after SIGTERM and the checks that follow it.
    httpx.post(
        f"{mesh.sim.root_url}/_sim/config", json={"stream_interval_ms": 400}
    ).raise_for_status()
    first_chunk = threading.Event()
    frames: list[bytes] = []

    def stream() -> None:
        body = {
            "model": "deepseek",
            "messages": user(prompt("drain")),
            "max_tokens": 16,
            "stream": True,
        }
        with httpx.stream(
            "POST", f"{base}/chat/completions", json=body, headers=headers, timeout=60
        ) as response:
            for line in response.iter_lines():
                if line:
                    frames.append(line.encode())
                    first_chunk.set()

    reader = threading.Thread(target=stream)
    try:
        with httpx.Client(headers=headers, timeout=TIMEOUT_S) as kept_alive:
            assert kept_alive.get(f"{base}/models").status_code == 200  # opens a connection
            reader.start()
            assert first_chunk.wait(TIMEOUT_S), "the stream never started"
            replica.process.send_signal(signal.SIGTERM)
            # New connections are refused once the router has closed its HTTP listener...
            deadline = time.monotonic() + TIMEOUT_S
            while True:
                try:
                    httpx.get(f"{base}/models", headers=headers, timeout=5)
                except httpx.ConnectError:
                    break
                assert time.monotonic() < deadline, "the HTTP listener stayed open"
                time.sleep(0.05)
            # ...and a request on a connection kept alive is told to go elsewhere.
            refused = kept_alive.get(f"{base}/models")
            assert refused.status_code == 503
            assert "shutting down: retry on another replica" in refused.json()["error"]["message"]
            assert reader.is_alive(), "the stream must still be running while the router drains"
        reader.join(TIMEOUT_S * 2)
        assert replica.process.wait(timeout=TIMEOUT_S * 2) == 0
    finally:
        httpx.post(f"{mesh.sim.root_url}/_sim/reset").raise_for_status()
        reader.join(TIMEOUT_S)
    # The stream accepted before SIGTERM ran to its end: the usage chunk, then [DONE].
    assert frames[-1] == b"data: [DONE]"
    assert json.loads(frames[-2][len(b"data: ") :])["usage"]["completion_tokens"] > 0
    messages = [json.loads(line)["msg"] for line in replica.log_path.read_text().splitlines()]
    assert messages.index("drained") > messages.index("shutting down")


def test_the_sdk_embeds_through_the_mesh_like_the_grpc_embed(
    mesh: LocalMesh,
    router: router_pb2_grpc.RouterServiceStub,
    tenant: tuple[str, str],
    billing: billing_pb2_grpc.BillingServiceStub,
    admin_md: Metadata,
) -> None:
    name, key = tenant
    inputs = [prompt("sheep graze"), prompt("the mesh batches")]
    sdk = client(mesh, key)
    # The SDK asks for base64 unless told otherwise, and decodes it; float is the API's default.
    encoded = sdk.embeddings.create(model="embed", input=inputs)
    plain = sdk.embeddings.create(model="embed", input=inputs, encoding_format="float")
    grpc_answer = router.Embed(
        router_pb2.EmbedRequest(model="embed", inputs=inputs), metadata=auth(key), timeout=30
    )

    expected = [list(e.values) for e in grpc_answer.embeddings]
    for answer in (encoded, plain):
        assert answer.object == "list" and answer.model == "shepherd-embed"
        assert [d.index for d in answer.data] == [0, 1]
        for got, want in zip(answer.data, expected, strict=True):
            assert got.embedding == pytest.approx(want, abs=1e-6)
        assert answer.usage.prompt_tokens == grpc_answer.usage.prompt_tokens > 0
        assert answer.usage.total_tokens == grpc_answer.usage.total_tokens
    # One request computed and billed through HTTP; the identical ones after it, over HTTP and
    # gRPC alike, are cache hits at no cost.
    assert grpc_answer.cache_hit and grpc_answer.cost.nano_usd == 0
    totals = tenant_totals(billing, admin_md, name)
    assert totals.requests == 3
    assert totals.cost.nano_usd == expected_cost("shepherd-embed", grpc_answer.usage) > 0

    with pytest.raises(openai.BadRequestError) as refused:
        sdk.embeddings.create(model="embed", input=inputs, dimensions=64)
    assert refused.value.body["param"] == "dimensions"  # type: ignore[index]
