"""The operators' view of a real mesh: Triton in the trace, GenAI conventions, /metrics, logs.

Everything here is read the way an operator reads it: spans as the OTLP receiver gets them
(the services over gRPC, Triton over HTTP, as Jaeger would), /metrics scraped over HTTP as
Prometheus scrapes it, log lines as the services write them, and the shipped Grafana
dashboard checked against what the services really serve.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence

import grpc
import pytest
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2, router_pb2_grpc

from deploy.local.launcher import LocalMesh
from deploy.local.otlp import Span
from tests.integration.test_mesh import auth
from tests.integration.test_mesh import chat_request as chat
from tests.support.dashboard import load_dashboard, metric_names, queries, scrape, total
from tests.support.otlp_receiver import OtlpReceiver

TIMEOUT_S = 30.0
CHAT = "/shepherd.router.v1.RouterService/Chat"


def metrics_url(mesh: LocalMesh, service: str) -> str:
    return f"http://127.0.0.1:{mesh.config.metrics_ports[service]}/metrics"


def ancestors(span: Span, spans: Sequence[Span]) -> list[str]:
    """The names of a span's ancestors in its trace, nearest first."""
    by_id = {s.span_id: s for s in spans}
    names = []
    parent = by_id.get(span.parent_span_id)
    while parent is not None:
        names.append(parent.name)
        parent = by_id.get(parent.parent_span_id)
    return names


@pytest.mark.parametrize(
    ("model", "backend_model"), [("tiny", "tiny_lm"), ("tiny-stream", "tiny_lm_stream")]
)
def test_tritons_own_spans_join_the_request_trace_under_the_batch(
    otlp: OtlpReceiver,
    router: router_pb2_grpc.RouterServiceStub,
    tenant: tuple[str, str],
    model: str,
    backend_model: str,
) -> None:
    """Triton exports OTLP over HTTP, the services over gRPC: one trace holds both.

    A decoupled model's request span (InferRequest) ends only when Triton's stream does, and
    the scheduler closes the stream as soon as every row has finished; Triton then does not
    always export that one span. Its model and compute spans always come, under it.
    """
    _, key = tenant
    answer = router.Chat(
        chat(model, f"trace into triton {uuid.uuid4().hex}"), metadata=auth(key), timeout=TIMEOUT_S
    )
    decoupled = model == "tiny-stream"
    needed = {CHAT, "scheduler.batch", backend_model, "compute"}
    if not decoupled:
        needed.add("InferRequest")
    spans = otlp.wait_for_trace(
        answer.trace_id,
        {"shepherd-router", "shepherd-scheduler", "triton"},
        needed,
        timeout_s=60.0,
    )
    assert otlp.refused == []
    triton = {s.name: s for s in spans if s.service == "triton"}
    assert set(triton) >= needed - {CHAT, "scheduler.batch"}
    assert answer.placement.backend_model == backend_model
    model_span, compute = triton[backend_model], triton["compute"]
    assert model_span.attributes["triton.model_name"] == backend_model
    assert compute.parent_span_id == model_span.span_id
    assert {"COMPUTE_START", "COMPUTE_END"} <= {name for name, _ in compute.events}
    request = triton.get("InferRequest")
    if request is not None:
        assert model_span.parent_span_id == request.span_id
        # InferRequest -> the batch that called the node -> the request's spans.
        assert ancestors(request, spans)[0] == "scheduler.batch"
        assert ancestors(request, spans)[-1] == CHAT


def test_chat_spans_carry_the_genai_conventions(
    otlp: OtlpReceiver, router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    name, key = tenant
    request = chat("tiny", f"conventional {uuid.uuid4().hex}", max_tokens=9, seed=7)
    answer = router.Chat(request, metadata=auth(key), timeout=TIMEOUT_S)
    spans = otlp.wait_for_trace(answer.trace_id, {"shepherd-router"}, {"chat tiny", CHAT})
    span = next(s for s in spans if s.name == "chat tiny")
    assert span.kind == "client"
    assert ancestors(span, spans) == [CHAT]
    attributes = span.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "triton"
    assert attributes["gen_ai.request.model"] == "tiny"
    assert attributes["gen_ai.response.model"] == answer.placement.backend_model == "tiny_lm"
    assert attributes["gen_ai.request.max_tokens"] == 9
    assert attributes["gen_ai.request.seed"] == 7
    assert attributes["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens
    assert attributes["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens
    assert attributes["gen_ai.response.finish_reasons"] == [answer.finish_reason]
    assert attributes["shepherd.tenant"] == name
    assert attributes["shepherd.cost.nano_usd"] == answer.cost.nano_usd
    # The hops the chat made are its children: the cache lookup and the scheduler's stream.
    children = {s.name for s in spans if s.parent_span_id == span.span_id}
    assert "/shepherd.scheduler.v1.SchedulerService/InferMany" in children

    # A hosted model: the provider is the catalog's, and the scheduler's call to it is a
    # GenAI client span too.
    hosted = router.Chat(chat("gpt4", "Hi", max_tokens=16), metadata=auth(key), timeout=TIMEOUT_S)
    spans = otlp.wait_for_trace(
        hosted.trace_id, {"shepherd-scheduler"}, {"chat gpt4", "hosted.chat"}
    )
    span = next(s for s in spans if s.name == "chat gpt4")
    assert span.attributes["gen_ai.provider.name"] == "holysheep"
    assert span.attributes["gen_ai.response.model"] == hosted.placement.backend_model
    upstream = next(s for s in spans if s.name == "hosted.chat")
    assert upstream.attributes["gen_ai.provider.name"] == "holysheep"
    assert upstream.attributes["gen_ai.operation.name"] == "chat"

    # A failed chat says why, on the span and (below) in the metrics.
    with pytest.raises(grpc.RpcError) as failed:
        router.Chat(chat("no-such-model", "Hi"), metadata=auth(key), timeout=TIMEOUT_S)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND


def test_metrics_count_what_the_traffic_did(
    mesh: LocalMesh, router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    """Requests by status and tokens, scraped from /metrics, match the calls made here."""
    name, key = tenant
    urls = {service: metrics_url(mesh, service) for service in mesh.config.metrics_ports}
    before = {service: scrape(url) for service, url in urls.items()}
    tag = uuid.uuid4().hex
    answers = [
        router.Chat(chat("tiny", f"count me {tag} {n}"), metadata=auth(key), timeout=TIMEOUT_S)
        for n in range(3)
    ]
    codes = []
    for bad in (
        lambda: router.Chat(chat("no-such-model", "Hi"), metadata=auth(key), timeout=TIMEOUT_S),
        lambda: router.Chat(chat("tiny", "Hi", temperature=7.5), metadata=auth(key), timeout=5),
        lambda: router.Chat(chat("tiny", "Hi"), metadata=auth("sk-wrong"), timeout=TIMEOUT_S),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            bad()
        codes.append(caught.value.code())
    assert codes == [
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
    ]
    after = {service: scrape(url) for service, url in urls.items()}

    def added(service: str, metric: str, **labels: str) -> float:
        return total(after[service], metric, **labels) - total(before[service], metric, **labels)

    calls = "rpc_server_duration_milliseconds_count"
    for code, count in ((0, 3), (5, 1), (3, 1), (16, 1)):
        assert added("router", calls, rpc_method="Chat", rpc_grpc_status_code=str(code)) == count
    # Each answered chat made one call on the scheduler's InferMany stream and one cache lookup.
    assert added("scheduler", calls, rpc_method="InferMany", rpc_grpc_status_code="0") == 3
    assert added("cache", calls, rpc_method="Lookup", rpc_grpc_status_code="0") == 3

    prompt = sum(a.usage.prompt_tokens for a in answers)
    completion = sum(a.usage.completion_tokens for a in answers)
    usage = "gen_ai_client_token_usage_sum"
    model = {"gen_ai_request_model": "shepherd-tiny"}
    assert added("router", usage, gen_ai_token_type="input", **model) == prompt
    assert added("router", usage, gen_ai_token_type="output", **model) == completion
    duration = "gen_ai_client_operation_duration_seconds_count"
    assert added("router", duration, gen_ai_provider_name="triton", **model) >= 3
    assert added("router", duration, error_type="NOT_FOUND", gen_ai_request_model="_OTHER") == 1

    server = "gen_ai_server_request_duration_seconds_count"
    assert added("scheduler", server, **model) == 3
    assert added("scheduler", "gen_ai_server_time_to_first_token_seconds_count", **model) == 3

    assert added("cache", "shepherd_cache_events_total", event="miss") == 3

    # Billing's counters are per tenant: this tenant's are exactly this test's answers.
    billing = after["billing"]
    tokens = "shepherd_billing_tokens_total"
    assert total(billing, tokens, tenant=name, model="shepherd-tiny", type="input") == prompt
    assert total(billing, tokens, tenant=name, model="shepherd-tiny", type="output") == completion
    assert total(billing, "shepherd_billing_requests_total", tenant=name) == 3
    cost = sum(a.cost.nano_usd for a in answers) / 1e9
    assert total(billing, "shepherd_billing_cost_usd_total", tenant=name) == pytest.approx(cost)


def test_every_dashboard_query_names_a_metric_the_services_serve(
    mesh: LocalMesh, router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    """The Grafana dashboard parses, and nothing on it queries a name nobody exports."""
    _, key = tenant
    prompt = f"dashboard {uuid.uuid4().hex}"
    for _ in range(2):  # the second is a cache hit: the cache's saved-cost counter moves
        router.Chat(chat("tiny", prompt), metadata=auth(key), timeout=TIMEOUT_S)
    stream = router.ChatStream(
        router_pb2.ChatStreamRequest(
            model="tiny-stream",
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=prompt)],
        ),
        metadata=auth(key),
        timeout=TIMEOUT_S,
    )
    assert list(stream)[-1].HasField("final")
    served: set[str] = set()
    for service in mesh.config.metrics_ports:
        served |= set(scrape(metrics_url(mesh, service)))
    assert mesh.triton is not None
    served |= set(scrape(mesh.triton.config.metrics_url))
    dashboard = load_dashboard()
    expressions = queries(dashboard)
    assert expressions
    missing = {
        name: expr for expr in expressions for name in metric_names(expr) if name not in served
    }
    assert not missing, f"the dashboard queries metrics nobody serves: {missing}"


def test_the_router_logs_one_access_line_per_request_with_trace_and_tenant(
    mesh: LocalMesh, router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    name, key = tenant
    answer = router.Chat(
        chat("tiny", f"log me {uuid.uuid4().hex}"), metadata=auth(key), timeout=TIMEOUT_S
    )
    log = mesh.log_dir / "router.log"
    lines = [json.loads(line) for line in log.read_text().splitlines() if answer.trace_id in line]
    access = [line for line in lines if line["logger"] == "shepherd.access"]
    assert len(access) == 1
    entry = access[0]
    assert entry["level"] == "INFO" and entry["msg"] == "access"
    assert entry["trace_id"] == answer.trace_id
    assert entry["tenant"] == name
    assert entry["method"] == "Chat"
    assert entry["status"] == "OK"
    assert entry["model"] == "shepherd-tiny"
    assert entry["request_id"] == answer.request_id
    assert entry["prompt_tokens"] == answer.usage.prompt_tokens
    assert entry["completion_tokens"] == answer.usage.completion_tokens
    assert entry["cost_nano_usd"] == answer.cost.nano_usd
    assert entry["cache_hit"] is False
    assert entry["placement"] == answer.placement.deployment
    assert entry["latency_ms"] > 0

    # A refused request is logged too, with its status and what is known of it.
    with pytest.raises(grpc.RpcError):
        router.Chat(chat("tiny", "Hi", temperature=9.0), metadata=auth(key), timeout=TIMEOUT_S)
    refused = [
        json.loads(line)
        for line in log.read_text().splitlines()
        if '"shepherd.access"' in line and '"INVALID_ARGUMENT"' in line
    ]
    assert refused and refused[-1]["tenant"] == name and "trace_id" in refused[-1]
