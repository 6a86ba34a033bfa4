"""HostedClient against the real provider simulator process.

Why a real process rather than a mock transport: the retry, deadline and trace-propagation
behaviour only matters on the wire (headers, status codes, real sleeps), so that is what we test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import grpc
import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from deploy.local.ports import free_port
from deploy.local.provider_sim import SimProcess
from services.scheduler.hosted import (
    API_KEY_ENV,
    HostedClient,
    HostedConfig,
    HostedError,
    parse_retry_after,
)

API_KEY = "sk-hosted-test"
MESSAGES = [("system", "Be brief."), ("user", "How many sheep are in the mesh?")]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    proc = SimProcess(api_key=API_KEY, rpm=1000, latency_ms=1).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(autouse=True)
def _reset(sim: SimProcess) -> None:
    httpx.post(f"{sim.root_url}/_sim/reset").raise_for_status()


def stats(sim: SimProcess) -> dict:
    return httpx.get(f"{sim.root_url}/_sim/stats").json()


def fail_next(sim: SimProcess, status: int, count: int, retry_after: float | None = None) -> None:
    body: dict = {"status": status, "count": count}
    if retry_after is not None:
        body["retry_after"] = retry_after
    httpx.post(f"{sim.root_url}/_sim/fail", json=body).raise_for_status()


def make_client(sim: SimProcess, **overrides: object) -> HostedClient:
    settings: dict = {
        "base_url": sim.base_url,
        "api_key": API_KEY,
        "request_timeout_s": 5.0,
        "max_retries": 3,
        "backoff_base_s": 0.01,
        "backoff_max_s": 8.0,
    }
    settings.update(overrides)
    return HostedClient.create(HostedConfig(**settings))


async def chat(client: HostedClient, deadline: float | None = None, model: str = "gpt-4.1"):
    return await client.chat(
        model, MESSAGES, max_tokens=64, temperature=0.2, top_p=None, seed=11, deadline=deadline
    )


@pytest.mark.asyncio
async def test_success_returns_tokens(sim: SimProcess) -> None:
    client = make_client(sim)
    try:
        result = await chat(client)
        again = await chat(client)
        cut = await client.chat(
            "deepseek-v3.2",
            MESSAGES,
            max_tokens=2,
            temperature=0.0,
            top_p=0.9,
            seed=1,
            deadline=time.monotonic() + 5,
        )
    finally:
        await client.aclose()
    assert result.text and result.text == again.text
    assert result.prompt_tokens > 0 and result.completion_tokens > 0
    assert result.finish_reason == "stop"
    assert result.upstream_model == "gpt-4.1"
    assert result.attempts == 1
    assert cut.finish_reason == "length" and cut.completion_tokens == 2
    assert stats(sim)["requests_served"] == 3


@pytest.mark.asyncio
async def test_empty_key_fails_before_any_request(sim: SimProcess) -> None:
    client = make_client(sim, api_key="")
    try:
        with pytest.raises(HostedError) as info:
            await chat(client)
    finally:
        await client.aclose()
    assert API_KEY_ENV in info.value.message
    assert stats(sim)["requests_received"] == 0


@pytest.mark.asyncio
async def test_wrong_key_is_unavailable_without_retry(sim: SimProcess) -> None:
    client = make_client(sim, api_key="sk-wrong")
    try:
        with pytest.raises(HostedError) as info:
            await chat(client)
    finally:
        await client.aclose()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "SHEPHERD_HOSTED_API_KEY" in info.value.message
    assert "HTTP 401" in info.value.message
    assert stats(sim)["requests_received"] == 1


@pytest.mark.asyncio
async def test_two_429s_then_success_on_third_attempt(sim: SimProcess) -> None:
    fail_next(sim, 429, 2, retry_after=0)
    client = make_client(sim)
    try:
        result = await chat(client, deadline=time.monotonic() + 10)
    finally:
        await client.aclose()
    assert result.attempts == 3
    s = stats(sim)
    assert s["requests_received"] == 3
    assert s["status_counts"] == {"429": 2, "200": 1}


@pytest.mark.asyncio
async def test_429s_beyond_max_retries_is_resource_exhausted(sim: SimProcess) -> None:
    fail_next(sim, 429, 10, retry_after=0)
    client = make_client(sim, max_retries=2)
    try:
        with pytest.raises(HostedError) as info:
            await chat(client)
    finally:
        await client.aclose()
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.retry_after_s is not None
    assert stats(sim)["requests_received"] == 3  # 1 + max_retries


@pytest.mark.asyncio
async def test_resource_exhausted_carries_provider_retry_after(sim: SimProcess) -> None:
    fail_next(sim, 429, 1, retry_after=2)
    client = make_client(sim, max_retries=0)
    try:
        with pytest.raises(HostedError) as info:
            await chat(client)
    finally:
        await client.aclose()
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.retry_after_s == pytest.approx(2.0)


@pytest.mark.asyncio
async def test_deadline_shorter_than_retry_after_fails_promptly(sim: SimProcess) -> None:
    fail_next(sim, 429, 5, retry_after=3)
    client = make_client(sim)
    try:
        started = time.monotonic()
        with pytest.raises(HostedError) as info:
            await chat(client, deadline=started + 0.5)
        elapsed = time.monotonic() - started
    finally:
        await client.aclose()
    assert info.value.code in (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert elapsed < 0.5
    assert stats(sim)["requests_received"] == 1


@pytest.mark.asyncio
async def test_expired_deadline_is_deadline_exceeded(sim: SimProcess) -> None:
    client = make_client(sim)
    try:
        with pytest.raises(HostedError) as info:
            await chat(client, deadline=time.monotonic() - 0.01)
    finally:
        await client.aclose()
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stats(sim)["requests_received"] == 0


@pytest.mark.asyncio
async def test_deadline_bounds_a_slow_provider() -> None:
    with SimProcess(api_key=API_KEY, latency_ms=2000) as slow:
        client = make_client(slow)
        try:
            started = time.monotonic()
            with pytest.raises(HostedError) as info:
                await chat(client, deadline=started + 0.3)
            elapsed = time.monotonic() - started
        finally:
            await client.aclose()
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.0


@pytest.mark.asyncio
async def test_5xx_is_retried_then_unavailable(sim: SimProcess) -> None:
    fail_next(sim, 500, 1)
    fail_next(sim, 503, 1)
    client = make_client(sim, max_retries=3)
    try:
        result = await chat(client)
        assert result.attempts == 3
        fail_next(sim, 502, 10)
        with pytest.raises(HostedError) as info:
            await chat(client)
    finally:
        await client.aclose()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "HTTP 502" in info.value.message


@pytest.mark.asyncio
async def test_unknown_model_is_not_found(sim: SimProcess) -> None:
    client = make_client(sim)
    try:
        with pytest.raises(HostedError) as info:
            await chat(client, model="gpt-9000")
    finally:
        await client.aclose()
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert "gpt-9000" in info.value.message
    assert stats(sim)["requests_received"] == 1


@pytest.mark.asyncio
async def test_connection_refused_is_unavailable() -> None:
    config = HostedConfig(
        base_url=f"http://127.0.0.1:{free_port()}/v1",
        api_key=API_KEY,
        request_timeout_s=1.0,
        max_retries=1,
        backoff_base_s=0.01,
    )
    client = HostedClient.create(config)
    try:
        with pytest.raises(HostedError) as info:
            await chat(client)
    finally:
        await client.aclose()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.asyncio
async def test_traceparent_reaches_provider(sim: SimProcess) -> None:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    client = make_client(sim)
    try:
        with trace.get_tracer("test").start_as_current_span("scheduler.request") as parent:
            await chat(client)
            trace_id = parent.get_span_context().trace_id
    finally:
        await client.aclose()
        exporter.shutdown()

    traceparent = stats(sim)["last_traceparent"]
    assert traceparent is not None
    version, tp_trace_id, span_id, _flags = traceparent.split("-")
    assert version == "00"
    assert int(tp_trace_id, 16) == trace_id

    spans = {s.name: s for s in exporter.get_finished_spans()}
    hosted = spans["hosted.chat"]
    assert hosted.kind == trace.SpanKind.CLIENT
    assert int(span_id, 16) == hosted.context.span_id  # upstream's parent is our client span
    assert hosted.attributes is not None
    assert hosted.attributes["shepherd.hosted.upstream_model"] == "gpt-4.1"
    assert hosted.attributes["http.response.status_code"] == 200
    assert hosted.attributes["shepherd.hosted.attempts"] == 1


def test_parse_retry_after_seconds_and_http_date() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    date = format_datetime(now + timedelta(seconds=7), usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(7.0)
    assert parse_retry_after(format_datetime(now - timedelta(seconds=5), usegmt=True), now=now) == 0
