"""The provider simulator must be indistinguishable from OpenAI for the official client.

Why: the simulator replaces the hosted SaaS in every offline test; if it drifted from the wire
format, our hosted client could pass tests and still fail against the real provider.
"""

from __future__ import annotations

import http.client
import json
import statistics
import time
import urllib.parse
from collections.abc import Iterator

import httpx
import openai
import pytest

from deploy.local.provider_sim import SimProcess, count_tokens

API_KEY = "sk-sim-test-key"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to the shepherd, please!"},
]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    proc = SimProcess(api_key=API_KEY, rpm=600, latency_ms=1).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture()
def client(sim: SimProcess) -> Iterator[openai.OpenAI]:
    httpx.post(f"{sim.root_url}/_sim/reset").raise_for_status()
    c = openai.OpenAI(base_url=sim.base_url, api_key=API_KEY, max_retries=0, timeout=10)
    try:
        yield c
    finally:
        c.close()


def test_completion_is_deterministic_with_usage(client: openai.OpenAI, sim: SimProcess) -> None:
    first = client.chat.completions.create(model="gpt-4.1", messages=MESSAGES, seed=7)
    second = client.chat.completions.create(model="gpt-4.1", messages=MESSAGES, seed=7)
    other_seed = client.chat.completions.create(model="gpt-4.1", messages=MESSAGES, seed=8)

    assert first.id.startswith("chatcmpl-")
    assert first.object == "chat.completion"
    assert first.model == "gpt-4.1"
    assert first.system_fingerprint
    choice = first.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert choice.message.content == second.choices[0].message.content
    assert choice.message.content != other_seed.choices[0].message.content
    assert first.usage is not None
    # 3 priming + 2 messages * (3 overhead + content tokens).
    expected_prompt = 3 + sum(3 + count_tokens(m["content"]) for m in MESSAGES)
    assert first.usage.prompt_tokens == expected_prompt
    assert first.usage.completion_tokens == count_tokens(choice.message.content or "")
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens

    stats = httpx.get(f"{sim.root_url}/_sim/stats").json()
    assert stats["requests_received"] == 3
    assert stats["requests_served"] == 3
    assert stats["per_model"] == {"gpt-4.1": 3}


def test_max_tokens_cuts_with_length(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="deepseek-v3.2", messages=MESSAGES, seed=1)
    cut = client.chat.completions.create(
        model="deepseek-v3.2", messages=MESSAGES, seed=1, max_completion_tokens=4
    )
    legacy = client.chat.completions.create(
        model="deepseek-v3.2", messages=MESSAGES, seed=1, max_tokens=4
    )
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage is not None and cut.usage.completion_tokens == 4
    assert (full.choices[0].message.content or "").startswith(cut.choices[0].message.content or "")
    assert legacy.choices[0].message.content == cut.choices[0].message.content


def test_streaming_reassembles_and_reports_usage(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model="claude-sonnet-4.5", messages=MESSAGES, seed=3)
    stream = client.chat.completions.create(
        model="claude-sonnet-4.5",
        messages=MESSAGES,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    finish_reasons: list[str] = []
    usage_chunks = []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage_chunks.append(chunk.usage)
            assert chunk.choices == []
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    assert "".join(pieces) == plain.choices[0].message.content
    assert finish_reasons == ["stop"]
    assert len(usage_chunks) == 1
    assert plain.usage is not None
    assert usage_chunks[0].prompt_tokens == plain.usage.prompt_tokens
    assert usage_chunks[0].completion_tokens == plain.usage.completion_tokens


def test_list_models(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert ids == {"gpt-4.1", "claude-sonnet-4.5", "gemini-2.5-flash", "deepseek-v3.2"}


def test_wrong_key_is_authentication_error(sim: SimProcess) -> None:
    with openai.OpenAI(base_url=sim.base_url, api_key="sk-wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            bad.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"


def test_missing_key_is_401_with_openai_error_shape(sim: SimProcess) -> None:
    resp = httpx.post(f"{sim.base_url}/chat/completions", json={"model": "gpt-4.1"})
    assert resp.status_code == 401
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_api_key"
    assert error["param"] is None


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9000", messages=MESSAGES)
    assert info.value.code == "model_not_found"


def test_bad_body_is_bad_request(client: openai.OpenAI, sim: SimProcess) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4.1", messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4.1", messages=MESSAGES, temperature=5)
    resp = httpx.post(
        f"{sim.base_url}/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_injected_429_is_rate_limit_error_with_retry_after(
    client: openai.OpenAI, sim: SimProcess
) -> None:
    httpx.post(
        f"{sim.root_url}/_sim/fail", json={"status": 429, "count": 1, "retry_after": 2}
    ).raise_for_status()
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    assert info.value.response.headers["Retry-After"] == "2"
    assert info.value.code == "rate_limit_exceeded"
    # Only `count` calls fail; the next one succeeds.
    ok = client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    assert ok.choices[0].message.content


def test_injected_5xx(client: openai.OpenAI, sim: SimProcess) -> None:
    httpx.post(f"{sim.root_url}/_sim/fail", json={"status": 503, "count": 1}).raise_for_status()
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    assert info.value.status_code == 503
    stats = httpx.get(f"{sim.root_url}/_sim/stats").json()
    assert stats["status_counts"] == {"503": 1}


def test_rpm_limit_triggers_429() -> None:
    with SimProcess(api_key=API_KEY, rpm=3, latency_ms=0) as limited:
        with openai.OpenAI(base_url=limited.base_url, api_key=API_KEY, max_retries=0) as c:
            for _ in range(3):
                c.chat.completions.create(model="gemini-2.5-flash", messages=MESSAGES)
            with pytest.raises(openai.RateLimitError) as info:
                c.chat.completions.create(model="gemini-2.5-flash", messages=MESSAGES)
        headers = info.value.response.headers
        assert 1 <= int(headers["Retry-After"]) <= 60
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.returncode == 0  # SIGTERM shuts it down cleanly


def test_stream_switches_and_counters(client: openai.OpenAI, sim: SimProcess) -> None:
    """`/_sim/config` leaves out the usage chunk and paces tokens; streams are counted."""
    config = httpx.post(
        f"{sim.root_url}/_sim/config", json={"stream_usage": False, "stream_interval_ms": 5}
    )
    assert config.json() == {"stream_usage": False, "stream_interval_ms": 5.0}
    started = time.monotonic()
    stream = client.chat.completions.create(
        model="gpt-4.1",
        messages=MESSAGES,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert time.monotonic() - started >= 5 * 12 / 1000, "at least 12 tokens, 5 ms apart"
    assert all(chunk.usage is None for chunk in chunks), "asked for, but left out"
    assert chunks[-1].choices[0].finish_reason == "stop"

    # A client that goes away mid-stream is counted as closing it early.
    early = client.chat.completions.create(model="gpt-4.1", messages=MESSAGES, stream=True)
    next(iter(early))
    early.close()
    deadline = time.monotonic() + 3
    stats = httpx.get(f"{sim.root_url}/_sim/stats").json()
    while stats["streams_closed_early"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = httpx.get(f"{sim.root_url}/_sim/stats").json()
    assert stats["streams_started"] == 2
    assert stats["streams_completed"] == 1
    assert stats["streams_closed_early"] == 1

    # A reset restores the usage chunk and the full speed.
    httpx.post(f"{sim.root_url}/_sim/reset").raise_for_status()
    again = client.chat.completions.create(
        model="gpt-4.1",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert [c.usage for c in again if c.usage is not None]


def test_sim_config_refuses_bad_settings(sim: SimProcess) -> None:
    for body in ({"stream_usage": "no"}, {"stream_interval_ms": -1}, {"speed": 2}, [1]):
        response = httpx.post(f"{sim.root_url}/_sim/config", json=body)
        assert response.status_code == 400, body


def test_kept_alive_requests_do_not_wait_for_a_delayed_ack() -> None:
    """Every request on one kept-alive connection answers at once, not ~40 ms late.

    Why: a response goes out in two writes (headers, then body). Unless the accepted socket has
    TCP_NODELAY, Nagle's algorithm holds the second write until the client ACKs the first, and
    the client delays that ACK by about 40 ms: every request after a connection's first took
    40 ms more (the listening socket was made without IPPROTO_TCP, so asyncio never set the
    option). The stall is a timer, not load, so the median of several follow-up requests stays
    far below it on any machine that answers at all, and far above it when the bug is back.
    """
    body = json.dumps({"model": "gpt-4.1", "messages": MESSAGES, "max_tokens": 8})
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    with SimProcess(api_key=API_KEY, rpm=10_000, latency_ms=0) as fast:
        url = urllib.parse.urlsplit(fast.base_url)
        connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
        try:
            elapsed_ms = []
            local_ends = set()
            for _ in range(10):
                began = time.perf_counter()
                connection.request("POST", f"{url.path}/chat/completions", body, headers)
                response = connection.getresponse()
                payload = json.loads(response.read())
                elapsed_ms.append((time.perf_counter() - began) * 1000)
                assert response.status == 200, payload
                assert payload["usage"]["completion_tokens"] > 0
                assert connection.sock is not None
                local_ends.add(connection.sock.getsockname())
        finally:
            connection.close()
        stats = httpx.get(f"{fast.root_url}/_sim/stats").json()
    assert stats["requests_served"] == 10
    assert len(local_ends) == 1, "http.client reconnected: the connection was not kept alive"
    follow_ups = elapsed_ms[1:]
    assert statistics.median(follow_ups) < 25, f"ms per request: {elapsed_ms}"
