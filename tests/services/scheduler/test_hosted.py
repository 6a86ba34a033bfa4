"""HostedClient and HostedBackend against the real provider simulator process.

Why a real process rather than a mock transport: streaming, retries, deadlines, closing a
stream and trace propagation only matter on the wire (SSE chunks, headers, status codes,
sockets, real sleeps), so that is what we test. The simulator's `/_sim/` hooks inject failures,
switch the usage chunk off, slow the token stream down and count streams closed early.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import INVALID_SPAN_CONTEXT
from shepherd.common.v1 import common_pb2

from deploy.local.ports import free_port
from deploy.local.provider_sim import SimProcess
from libs.catalog import Deployment
from libs.retry import RetryPolicy
from services.scheduler.breaker import BreakerConfig, BreakerState, CircuitBreaker
from services.scheduler.events import Delta, Event, Failed, Final
from services.scheduler.hosted import (
    API_KEY_ENV,
    HostedBackend,
    HostedClient,
    HostedConfig,
    HostedError,
    HostedResult,
    _Tally,
    count_tokens,
    estimate_prompt_tokens,
)
from services.scheduler.queue import PendingRequest

API_KEY = "sk-hosted-test"
MESSAGES = (("system", "Be brief."), ("user", "How many sheep are in the mesh?"))
DEPLOYMENT = Deployment(name="sim/gpt-4.1", kind="hosted", backend_model="gpt-4.1", provider="sim")


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    proc = SimProcess(api_key=API_KEY, rpm=100_000, latency_ms=1).start()
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


def sim_config(sim: SimProcess, **settings: object) -> None:
    httpx.post(f"{sim.root_url}/_sim/config", json=settings).raise_for_status()


async def wait_for_stats(sim: SimProcess, key: str, value: int, timeout_s: float = 3.0) -> dict:
    """The simulator's counters once `key` reached `value` (the server notices a close late)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = await asyncio.to_thread(stats, sim)
        if found[key] >= value or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


def plain_answer(sim: SimProcess, seed: int, max_tokens: int = 64) -> dict:
    """The simulator's non-streaming answer to the same request."""
    response = httpx.post(
        f"{sim.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={
            "model": "gpt-4.1",
            "messages": [{"role": r, "content": c} for r, c in MESSAGES],
            "max_tokens": max_tokens,
            "seed": seed,
        },
    )
    response.raise_for_status()
    return response.json()


def make_client(sim: SimProcess, **overrides: object) -> HostedClient:
    settings: dict = {
        "base_url": sim.base_url,
        "api_key": API_KEY,
        "provider": "sim",
        "retry": RetryPolicy(attempts=4, base_s=0.01, max_s=8.0, attempt_timeout_s=5.0),
        "breaker": BreakerConfig(failure_threshold=5, open_cooldown_s=1.0),
    }
    settings.update(overrides)
    return HostedClient.create(HostedConfig(**settings))


def retry(**settings: object) -> RetryPolicy:
    defaults: dict = {"attempts": 4, "base_s": 0.01, "max_s": 8.0, "attempt_timeout_s": 5.0}
    return RetryPolicy(**{**defaults, **settings})


async def chat(
    client: HostedClient,
    deadline: float | None = None,
    model: str = "gpt-4.1",
    deltas: list[Delta] | None = None,
) -> HostedResult:
    return await client.chat(
        model,
        MESSAGES,
        max_tokens=64,
        temperature=0.2,
        top_p=None,
        seed=11,
        deadline=deadline if deadline is not None else time.monotonic() + 10,
        on_delta=deltas.append if deltas is not None else None,
    )


def pending(seed: int = 11, max_tokens: int = 64, deadline_s: float = 10.0) -> PendingRequest:
    params = common_pb2.GenerationParams(max_tokens=max_tokens, temperature=0.2, seed=seed)
    return PendingRequest(
        request_id=f"req-{seed}-{max_tokens}",
        tenant="acme",
        messages=MESSAGES,
        params=params,
        deadline=time.monotonic() + deadline_s,
        span_context=INVALID_SPAN_CONTEXT,
    )


async def collect(backend: HostedBackend, batch: list[PendingRequest]) -> dict[int, list[Event]]:
    events: dict[int, list[Event]] = {row: [] for row in range(len(batch))}
    async for row, event in backend.run(DEPLOYMENT, batch):
        events[row].append(event)
    return events


# -- streaming --------------------------------------------------------------------------------


async def test_deltas_then_final_with_the_providers_usage(sim: SimProcess) -> None:
    backend = HostedBackend({"sim": make_client(sim)})
    batch = [pending(seed=1), pending(seed=2), pending(seed=3, max_tokens=2)]
    try:
        events = await collect(backend, batch)
    finally:
        await backend.close()

    for row, seed, max_tokens in ((0, 1, 64), (1, 2, 64), (2, 3, 2)):
        *deltas, final = events[row]
        assert deltas and all(isinstance(d, Delta) for d in deltas)
        assert isinstance(final, Final) and not final.estimated
        plain = plain_answer(sim, seed, max_tokens)
        completion = final.completion
        text = "".join(d.text for d in deltas)
        assert text == completion.text == plain["choices"][0]["message"]["content"]
        assert completion.finish_reason == plain["choices"][0]["finish_reason"]
        assert completion.usage.prompt_tokens == plain["usage"]["prompt_tokens"]
        assert completion.usage.completion_tokens == plain["usage"]["completion_tokens"]
        assert completion.usage.total_tokens == plain["usage"]["total_tokens"]
        # Usage inside the deltas is cumulative and ends where the provider's does.
        counts = [d.usage.completion_tokens for d in deltas]
        assert counts == sorted(counts) and counts[-1] == completion.usage.completion_tokens
        assert completion.placement == common_pb2.Placement(
            deployment="sim/gpt-4.1",
            kind=common_pb2.BACKEND_KIND_HOSTED,
            node=sim.base_url,
            backend_model="gpt-4.1",
            batch_size=3,
        )
    assert events[0][-1].completion.finish_reason == "stop"  # type: ignore[union-attr]
    cut = events[2][-1]
    assert isinstance(cut, Final)
    assert cut.completion.finish_reason == "length" and cut.completion.usage.completion_tokens == 2
    s = stats(sim)
    assert s["streams_started"] == 3 and s["streams_completed"] == 3


async def test_usage_is_counted_and_marked_estimated_without_a_usage_chunk(
    sim: SimProcess,
) -> None:
    sim_config(sim, stream_usage=False)
    backend = HostedBackend({"sim": make_client(sim)})
    try:
        events = await collect(backend, [pending(seed=5)])
    finally:
        await backend.close()
    final = events[0][-1]
    assert isinstance(final, Final)
    assert final.estimated, "no usage chunk came: the usage is ours and says so"
    plain = plain_answer(sim, 5)
    # The counting rule is the simulator's, so here the estimate is exact.
    assert final.completion.usage.prompt_tokens == plain["usage"]["prompt_tokens"]
    assert final.completion.usage.completion_tokens == plain["usage"]["completion_tokens"]
    assert final.completion.text == plain["choices"][0]["message"]["content"]


def test_tokens_are_counted_on_the_text_not_per_chunk() -> None:
    tally = _Tally(prompt_tokens=0)
    for piece in ("Hel", "lo", ", wor", "ld", "!", " 4", "2 sheep", " ", "x"):
        tally.add(piece)
    assert tally.text == "Hello, world! 42 sheep x"
    assert tally.completion_tokens == count_tokens(tally.text) == 7
    assert len(tally.pieces) == 9, "nine chunks, seven tokens"
    assert estimate_prompt_tokens(MESSAGES) == 3 + (3 + 3) + (3 + 8)


# -- keys, errors and retries ------------------------------------------------------------------


async def test_a_call_nobody_streams_is_one_json_answer_with_the_providers_usage(
    sim: SimProcess,
) -> None:
    client = make_client(sim)
    try:
        result = await chat(client)
    finally:
        await client.aclose()

    plain = plain_answer(sim, 11)
    assert result.text == plain["choices"][0]["message"]["content"]
    assert result.finish_reason == plain["choices"][0]["finish_reason"]
    assert (result.prompt_tokens, result.completion_tokens) == (
        plain["usage"]["prompt_tokens"],
        plain["usage"]["completion_tokens"],
    )
    assert not result.estimated and result.upstream_model == plain["model"]
    s = stats(sim)
    assert s["streams_started"] == 0, "a caller that reads no deltas is not sent a stream"


async def test_empty_key_fails_before_any_request(sim: SimProcess) -> None:
    client = make_client(sim, api_key="", api_key_env="HOLYSHEEP_API_KEY")
    backend = HostedBackend({"sim": client})
    try:
        with pytest.raises(HostedError) as info:
            await chat(client)
        events = await collect(backend, [pending()])
    finally:
        await backend.close()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "HOLYSHEEP_API_KEY" in info.value.message and "'sim'" in info.value.message
    (failed,) = events[0]
    assert isinstance(failed, Failed) and failed.error.code == grpc.StatusCode.UNAVAILABLE
    assert stats(sim)["requests_received"] == 0


async def test_wrong_key_is_unavailable_without_retry(sim: SimProcess) -> None:
    client = make_client(sim, api_key="sk-wrong")
    try:
        with pytest.raises(HostedError) as info:
            await chat(client)
    finally:
        await client.aclose()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert API_KEY_ENV in info.value.message
    assert "HTTP 401" in info.value.message
    assert stats(sim)["requests_received"] == 1
    assert client.breaker.state is BreakerState.HEALTHY, "a 401 says the provider is up"


async def test_429_before_the_first_byte_is_retried_after_retry_after(sim: SimProcess) -> None:
    fail_next(sim, 429, 1, retry_after=1)
    client = make_client(sim)
    deltas: list[Delta] = []
    try:
        started = time.monotonic()
        result = await chat(client, deltas=deltas)
        elapsed = time.monotonic() - started
    finally:
        await client.aclose()
    assert result.attempts == 2
    assert elapsed >= 1.0, "Retry-After: 1 is a floor, not a hint"
    assert "".join(d.text for d in deltas) == result.text, "each token reached the caller once"
    s = stats(sim)
    assert s["status_counts"] == {"429": 1, "200": 1}


async def test_429s_beyond_the_attempts_are_resource_exhausted_with_retry_info(
    sim: SimProcess,
) -> None:
    fail_next(sim, 429, 10, retry_after=0)
    client = make_client(sim, retry=retry(attempts=3))
    try:
        with pytest.raises(HostedError) as info:
            await chat(client)
    finally:
        await client.aclose()
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "gave up after 3 attempt(s)" in info.value.message
    assert info.value.retry_after_s is not None
    assert any(isinstance(d, error_details_pb2.RetryInfo) for d in info.value.details)
    assert stats(sim)["requests_received"] == 3


async def test_resource_exhausted_carries_the_providers_retry_after(sim: SimProcess) -> None:
    fail_next(sim, 429, 1, retry_after=2)
    client = make_client(sim, retry=retry(attempts=1))
    try:
        with pytest.raises(HostedError) as info:
            await chat(client)
    finally:
        await client.aclose()
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.retry_after_s == pytest.approx(2.0)
    (detail,) = info.value.details
    assert isinstance(detail, error_details_pb2.RetryInfo)
    assert detail.retry_delay.seconds == 2


async def test_a_retry_after_past_the_deadline_fails_at_once(sim: SimProcess) -> None:
    fail_next(sim, 429, 5, retry_after=3)
    client = make_client(sim)
    try:
        started = time.monotonic()
        with pytest.raises(HostedError) as info:
            await chat(client, deadline=started + 0.5)
        elapsed = time.monotonic() - started
    finally:
        await client.aclose()
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.retry_after_s == pytest.approx(3.0)
    assert "deadline" in info.value.message
    assert elapsed < 2.0, "it waited for the retry-after (3 s) it could not use"
    assert stats(sim)["requests_received"] == 1


async def test_expired_deadline_is_deadline_exceeded(sim: SimProcess) -> None:
    client = make_client(sim)
    try:
        with pytest.raises(HostedError) as info:
            await chat(client, deadline=time.monotonic() - 0.01)
    finally:
        await client.aclose()
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stats(sim)["requests_received"] == 0


async def test_slow_provider_first_byte_timeout_and_deadline() -> None:
    with SimProcess(api_key=API_KEY, latency_ms=2000) as slow:
        # No byte within the attempt timeout: abandoned and retried, then UNAVAILABLE.
        client = make_client(slow, retry=retry(attempts=2, attempt_timeout_s=0.2))
        try:
            started = time.monotonic()
            with pytest.raises(HostedError) as unavailable:
                await chat(client, deadline=started + 5)
            elapsed_retry = time.monotonic() - started
            # The deadline bounds the call whatever the attempt timeout.
            started = time.monotonic()
            with pytest.raises(HostedError) as late:
                await chat(client, deadline=started + 0.3)
            elapsed_deadline = time.monotonic() - started
        finally:
            await client.aclose()
        received = stats(slow)["requests_received"]
    assert unavailable.value.code == grpc.StatusCode.UNAVAILABLE
    assert "no byte within 0.200s" in unavailable.value.message
    assert 0.4 <= elapsed_retry < 1.5
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed_deadline < 1.8, "the deadline (0.3 s), not the reply (2 s), ended the call"
    assert received == 4, "two attempts each: the second call's deadline cut its retry short"


async def test_5xx_is_retried_then_unavailable(sim: SimProcess) -> None:
    fail_next(sim, 500, 1)
    fail_next(sim, 503, 1)
    client = make_client(sim, retry=retry(attempts=4))
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


async def test_connection_refused_is_unavailable() -> None:
    config = HostedConfig(
        base_url=f"http://127.0.0.1:{free_port()}/v1",
        api_key=API_KEY,
        retry=retry(attempts=2, attempt_timeout_s=1.0),
    )
    client = HostedClient.create(config)
    try:
        with pytest.raises(HostedError) as info:
            await chat(client)
    finally:
        await client.aclose()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "connection failed" in info.value.message


async def test_traceparent_reaches_provider(sim: SimProcess) -> None:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    fail_next(sim, 503, 1)  # the retry carries it too: the last call seen is the second
    client = make_client(sim)
    try:
        with trace.get_tracer("test").start_as_current_span("scheduler.request") as parent:
            await chat(client)
            trace_id = parent.get_span_context().trace_id
    finally:
        await client.aclose()
        exporter.shutdown()

    s = stats(sim)
    assert s["requests_received"] == 2
    traceparent = s["last_traceparent"]
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
    assert hosted.attributes["shepherd.hosted.attempts"] == 2
    assert hosted.attributes["shepherd.hosted.usage_estimated"] is False


# -- cancellation -----------------------------------------------------------------------------


async def test_a_cancelled_row_closes_its_stream_and_yields_nothing_more(
    sim: SimProcess,
) -> None:
    sim_config(sim, stream_interval_ms=20)  # about 0.5 s per stream
    backend = HostedBackend({"sim": make_client(sim)})
    gone_before = pending(seed=9)
    gone_before.events.outcome.cancel()  # its caller left before the batch ran
    batch = [pending(seed=1), pending(seed=2), gone_before]
    events: dict[int, list[Event]] = {0: [], 1: [], 2: []}
    after_cancel: list[Event] = []
    try:
        async for row, event in backend.run(DEPLOYMENT, batch):
            if batch[0].events.done and row == 0:
                after_cancel.append(event)
            events[row].append(event)
            if row == 0 and isinstance(event, Delta) and not batch[0].events.done:
                batch[0].events.outcome.cancel()  # the caller goes away mid-stream
    finally:
        await backend.close()
    assert after_cancel == [], "a cancelled row yields nothing more"
    assert len(events[0]) == 1 and isinstance(events[0][0], Delta)
    assert isinstance(events[1][-1], Final), "the other row is untouched"
    assert events[2] == [], "a row done before the run is never called"
    s = await wait_for_stats(sim, "streams_closed_early", 1)
    assert s["streams_started"] == 2
    assert s["streams_closed_early"] == 1 and s["streams_completed"] == 1


async def test_closing_the_run_early_closes_every_stream(sim: SimProcess) -> None:
    sim_config(sim, stream_interval_ms=20)
    backend = HostedBackend({"sim": make_client(sim)})
    try:
        run = backend.run(DEPLOYMENT, [pending(seed=1), pending(seed=2)])
        async for _row, event in run:
            assert isinstance(event, Delta)
            break
        await run.aclose()
        s = await wait_for_stats(sim, "streams_closed_early", 2)
    finally:
        await backend.close()
    assert s["streams_closed_early"] == 2 and s["streams_completed"] == 0


async def test_a_deadline_mid_stream_fails_the_row_with_the_usage_so_far(
    sim: SimProcess,
) -> None:
    sim_config(sim, stream_interval_ms=50)
    backend = HostedBackend({"sim": make_client(sim)})
    try:
        events = await collect(backend, [pending(seed=1, deadline_s=0.4)])
    finally:
        await backend.close()
    *deltas, failed = events[0]
    assert deltas and isinstance(failed, Failed)
    assert failed.error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert failed.usage.completion_tokens == deltas[-1].usage.completion_tokens > 0
    assert failed.usage.prompt_tokens == estimate_prompt_tokens(MESSAGES)
    s = await wait_for_stats(sim, "streams_closed_early", 1)
    assert s["requests_received"] == 1, "nothing is retried once a byte has arrived"


# -- circuit breaker --------------------------------------------------------------------------


async def test_the_breaker_opens_after_n_failures_fails_fast_then_probes(
    sim: SimProcess,
) -> None:
    client = make_client(
        sim,
        retry=retry(attempts=1),
        breaker=BreakerConfig(failure_threshold=3, open_cooldown_s=0.5),
    )
    backend = HostedBackend({"sim": client})
    fail_next(sim, 503, 3)
    try:
        for _ in range(3):
            with pytest.raises(HostedError, match="HTTP 503"):
                await chat(client)
        assert client.breaker.state is BreakerState.OPEN
        started = time.monotonic()
        events = await collect(backend, [pending(seed=1), pending(seed=2)])
        fast_s = time.monotonic() - started
        assert stats(sim)["requests_received"] == 3, "an open circuit calls nobody"
        await asyncio.sleep(0.6)
        probe = await chat(client)  # the cool-down is over: one probe, and it works
    finally:
        await backend.close()
    assert fast_s < 1.0, "an open circuit fails at once, without waiting for anybody"
    for row in (0, 1):
        # Failed and nothing before it: the dispatcher may fall back to another deployment.
        (failed,) = events[row]
        assert isinstance(failed, Failed)
        assert failed.error.code == grpc.StatusCode.UNAVAILABLE
        assert "hosted provider 'sim'" in failed.error.message
        assert "next probe in" in failed.error.message
    assert probe.text and client.breaker.state is BreakerState.HEALTHY


def test_breaker_states_doubling_cool_down_and_a_single_probe() -> None:
    now = [0.0]
    breaker = CircuitBreaker(
        BreakerConfig(failure_threshold=2, open_cooldown_s=1.0, max_cooldown_s=3.0),
        clock=lambda: now[0],
    )
    assert breaker.allow() and breaker.state is BreakerState.UNKNOWN
    assert breaker.failed() is False  # one failure: still closed
    assert breaker.failed() is True and breaker.state is BreakerState.OPEN
    assert not breaker.allow() and breaker.blocked_until() == 1.0
    now[0] = 1.0
    assert breaker.allow(), "the cool-down is over: the probe goes"
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow(), "only one probe at a time"
    breaker.release()  # the probe was cancelled: no verdict, the next caller probes
    assert breaker.allow()
    breaker.failed()  # the probe failed: open again, cool-down doubled
    assert breaker.cooldown_s == 2.0 and breaker.retry_at == 3.0
    now[0] = 3.0
    assert breaker.allow()
    breaker.failed()
    assert breaker.cooldown_s == 3.0, "capped"
    now[0] = 6.0
    assert breaker.allow()
    assert breaker.succeeded() is True
    assert breaker.state is BreakerState.HEALTHY and breaker.failures == 0
    assert breaker.cooldown_s == 0.0 and breaker.allow() and breaker.allow()
