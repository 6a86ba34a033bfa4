"""Offline simulator of a hosted OpenAI-compatible chat API (e.g. the "HolySheep" API).

Why this exists: Shepherd forwards some traffic to a hosted SaaS that speaks the OpenAI wire
format. Tests and the offline demo have no internet, so this process stands in for that SaaS
and *only* for it. It reproduces the parts of the wire contract the scheduler depends on:

* ``POST /v1/chat/completions`` (JSON and SSE streaming), ``GET /v1/models``;
* OpenAI-shaped error bodies (``{"error": {"message", "type", "code", "param"}}``) with the
  status codes the official ``openai`` client maps to its exception classes (401, 404, 400,
  429 with ``Retry-After``, 5xx);
* a per-API-key sliding 60 s request-rate limit with ``x-ratelimit-*`` headers;
* deterministic completions derived from (model, messages, seed), so tests can assert on text
  and token counts without a model.

Simulator-only test hooks live under ``/_sim/`` and are NOT part of the OpenAI API:

* ``POST /_sim/fail``  ``{"cut_after": 3, "count": 1}`` instead cuts the next ``count`` streams
  after that many content chunks: the connection drops mid-body, as a provider's does when it
  fails mid-answer;
* ``POST /_sim/fail``  ``{"status": 429, "count": 2, "retry_after": 1}`` makes the next ``count``
  chat calls (after authentication) fail with that status (429 adds ``Retry-After``);
* ``GET /_sim/stats``  counters plus the last ``traceparent`` header, to prove W3C trace context
  propagation; ``streams_started``/``streams_completed``/``streams_closed_early`` count SSE
  bodies, the last those whose client went away before ``[DONE]``;
* ``POST /_sim/config`` ``{"stream_usage": false, "stream_interval_ms": 20}`` changes how
  streams are sent until the next reset: ``stream_usage: false`` leaves out the usage chunk
  even when ``stream_options.include_usage`` asks for it (as some OpenAI-compatible providers
  do), and ``stream_interval_ms`` waits that long before each content chunk, like a model
  generating tokens;
* ``POST /_sim/reset`` clears counters, pending failures, rate-limit windows and the config.

Run: ``python -m deploy.local.provider_sim --host 127.0.0.1 --port 0 --api-key KEY``. ``--port 0``
picks a free port; the actual URL is printed on stdout as
``provider-sim listening on http://127.0.0.1:N/v1`` once the socket accepts connections.
``--rpm`` (``SIM_RPM``) is the per-key limit of requests per minute, 600 by default, like a
provider's modest tier, so the tests of 429 handling need no setting; ``SimProcess`` defaults to
the same. The local launcher (``deploy/local/launcher.py``) asks for 60,000, so a load test
through ``make run`` is not rate limited. ``SimProcess`` runs it as a subprocess for tests and
the demo.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from deploy.local.processes import spawn, stop
from libs.config import REPO_ROOT

LOG = logging.getLogger("provider_sim")

DEFAULT_MODELS: tuple[str, ...] = (
    "gpt-4.1",
    "claude-sonnet-4.5",
    "gemini-2.5-flash",
    "deepseek-v3.2",
)
WINDOW_S = 60.0
MESSAGE_OVERHEAD_TOKENS = 3
REPLY_PRIMING_TOKENS = 3
SYSTEM_FINGERPRINT = "fp_shepherd_sim"
READY_PREFIX = "provider-sim listening on "
VALID_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_VOCABULARY: tuple[str, ...] = (
    "the", "shepherd", "routes", "tokens", "across", "a", "mesh", "of", "models", "and",
    "every", "request", "finds", "its", "way", "home", "quickly", "while", "latency", "stays",
    "low", "cache", "hits", "save", "money", "gpu", "batches", "grow", "streams", "flow",
    "gently", "through", "clusters", "under", "clear", "skies", "with", "careful", "budgets",
    "answers", "arrive", "on", "time", "for", "users", "who", "wait", "patiently", "in", "line",
)  # fmt: skip


def count_tokens(text: str) -> int:
    """Deterministic stand-in tokenizer: words and individual punctuation marks.

    Why: tests and billing need stable, reproducible counts; the real BPE tokenizer is
    irrelevant to the wire contract.
    """
    return len(_TOKEN_RE.findall(text))


def _content_text(content: Any) -> str:
    """Flatten OpenAI message content (string or list of content parts) to plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for part in content:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            parts.append(part["text"])
    return " ".join(parts)


def count_prompt_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """Prompt tokens: content tokens + a fixed per-message overhead + reply priming.

    Mirrors the shape of OpenAI's accounting (per-message framing tokens) deterministically.
    """
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += MESSAGE_OVERHEAD_TOKENS + count_tokens(_content_text(message.get("content")))
    return total


def completion_tokens_for(
    model: str, messages: Sequence[dict[str, Any]], seed: int | None
) -> list[str]:
    """The full (uncut) list of completion tokens for a request.

    Why a hash-seeded RNG: the same (model, messages, seed) must yield the same text across
    processes and runs (Python's ``hash`` is salted, so sha256 is used instead).
    """
    canonical = json.dumps(
        {
            "model": model,
            "messages": [
                {"role": m.get("role"), "content": _content_text(m.get("content"))}
                for m in messages
            ],
            "seed": seed,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    digest = hashlib.sha256(canonical.encode("utf-8")).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    n_words = rng.randint(12, 40)
    words = [rng.choice(_VOCABULARY) for _ in range(n_words)]
    words[0] = words[0].capitalize()
    return [*words, "."]


def render_tokens(tokens: Sequence[str]) -> str:
    """Join tokens into text such that ``count_tokens(render_tokens(t)) == len(t)``."""
    pieces = [tok if i == 0 or not tok[0].isalnum() else " " + tok for i, tok in enumerate(tokens)]
    return "".join(pieces)


def stream_pieces(tokens: Sequence[str]) -> list[str]:
    """Per-token content deltas for streaming; concatenated they equal ``render_tokens``."""
    return [tok if i == 0 or not tok[0].isalnum() else " " + tok for i, tok in enumerate(tokens)]


def openai_error(
    status: int,
    message: str,
    *,
    err_type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An error response in OpenAI's exact JSON shape (the official client parses it)."""
    body = {"error": {"message": message, "type": err_type, "code": code, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


class BadRequest(Exception):
    """Raised by body validation; rendered as an OpenAI 400."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class SimConfig:
    """Simulator settings; frozen so the running app can't drift from what was printed."""

    host: str = "127.0.0.1"
    port: int = 0
    api_key: str = "sim-key"
    rpm: int = 600
    latency_ms: float = 5.0
    models: tuple[str, ...] = DEFAULT_MODELS


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat completion request."""

    model: str
    messages: tuple[dict[str, Any], ...]
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class FailSpec:
    """One pending injected failure (from ``POST /_sim/fail``)."""

    status: int
    retry_after: float | None


@dataclass
class SimState:
    """Mutable simulator state: counters, injected failures, rate windows (single event loop)."""

    requests_received: int = 0
    requests_served: int = 0
    requests_failed: int = 0
    models_requests: int = 0
    per_model: collections.Counter[str] = field(default_factory=collections.Counter)
    status_counts: collections.Counter[str] = field(default_factory=collections.Counter)
    last_traceparent: str | None = None
    pending_cuts: collections.deque[int] = field(default_factory=collections.deque)
    last_tracestate: str | None = None
    last_headers: dict[str, str] = field(default_factory=dict)
    pending_failures: collections.deque[FailSpec] = field(default_factory=collections.deque)
    windows: dict[str, collections.deque[float]] = field(default_factory=dict)
    streams_started: int = 0
    streams_completed: int = 0
    streams_closed_early: int = 0
    # Behaviour switches set by POST /_sim/config.
    stream_usage: bool = True
    stream_interval_ms: float = 0.0

    def reset(self) -> None:
        """Return to a freshly started state (keeps the config)."""
        fresh = SimState()
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(fresh, f.name))


def _parse_int(body: dict[str, Any], name: str, *, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"Invalid type for '{name}': expected an integer.", name, "invalid_type")
    if value < minimum:
        raise BadRequest(
            f"Invalid '{name}': integer below minimum value. Expected a value >= {minimum}, "
            f"but got {value} instead.",
            name,
            "integer_below_min_value",
        )
    return value


def _parse_float(body: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"Invalid type for '{name}': expected a number.", name, "invalid_type")
    if not lo <= float(value) <= hi:
        raise BadRequest(
            f"Invalid '{name}': expected a value between {lo} and {hi}, but got {value} instead.",
            name,
            "invalid_value",
        )
    return float(value)


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate an OpenAI chat completion body the way the real API does (subset)."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest(
            "you must provide a model parameter", "model", "missing_required_parameter"
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(
            "Invalid 'messages': expected a non-empty array of messages.",
            "messages",
            "invalid_value",
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"Invalid 'messages[{i}]': expected an object.", f"messages[{i}]")
        role = message.get("role")
        if role not in VALID_ROLES:
            raise BadRequest(
                f"Invalid value for 'messages[{i}].role': {role!r}.",
                f"messages[{i}].role",
                "invalid_value",
            )
        content = message.get("content")
        if not (content is None or isinstance(content, (str, list))):
            raise BadRequest(
                f"Invalid type for 'messages[{i}].content': expected a string or an array.",
                f"messages[{i}].content",
                "invalid_type",
            )
    max_tokens = _parse_int(body, "max_completion_tokens", minimum=1)
    if max_tokens is None:
        max_tokens = _parse_int(body, "max_tokens", minimum=1)
    n = _parse_int(body, "n", minimum=1)
    if n is not None and n != 1:
        raise BadRequest("The simulator only supports n=1.", "n", "invalid_value")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("Invalid type for 'seed': expected an integer.", "seed", "invalid_type")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("Invalid type for 'stream': expected a boolean.", "stream", "invalid_type")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise BadRequest(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "stream_options",
                "invalid_value",
            )
        if not isinstance(stream_options, dict):
            raise BadRequest("Invalid type for 'stream_options'.", "stream_options", "invalid_type")
        include_usage = bool(stream_options.get("include_usage", False))
    return ChatRequest(
        model=model,
        messages=tuple(messages),
        max_tokens=max_tokens,
        temperature=_parse_float(body, "temperature", 0.0, 2.0),
        top_p=_parse_float(body, "top_p", 0.0, 1.0),
        seed=seed,
        stream=stream,
        include_usage=include_usage,
    )


def _mask_key(key: str) -> str:
    if len(key) <= 8:
        return "*" * len(key)
    return f"{key[:3]}{'*' * 8}{key[-4:]}"


class ProviderSim:
    """The simulator application: config + state + Starlette routes."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.state = SimState()
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/_sim/fail", self.sim_fail, methods=["POST"]),
                Route("/_sim/stats", self.sim_stats, methods=["GET"]),
                Route("/_sim/config", self.sim_config, methods=["POST"]),
                Route("/_sim/reset", self.sim_reset, methods=["POST"]),
            ]
        )

    # -- auth / rate limiting -------------------------------------------------------------

    def _authenticate(self, request: Request) -> tuple[str | None, JSONResponse | None]:
        """Return (api_key, None) when valid, else (None, 401 response) like OpenAI."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None, openai_error(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="invalid_api_key",
            )
        if token != self.config.api_key:
            return None, openai_error(
                401, f"Incorrect API key provided: {_mask_key(token)}.", code="invalid_api_key"
            )
        return token, None

    def _rate_check(self, api_key: str) -> tuple[dict[str, str], int | None]:
        """Sliding-window check; returns (x-ratelimit headers, retry_after or None if admitted)."""
        now = time.monotonic()
        window = self.state.windows.setdefault(api_key, collections.deque())
        while window and window[0] <= now - WINDOW_S:
            window.popleft()
        limit = self.config.rpm
        retry_after: int | None = None
        if len(window) >= limit:
            retry_after = max(1, math.ceil(window[0] + WINDOW_S - now))
        else:
            window.append(now)
        reset_s = max(0.0, window[0] + WINDOW_S - now) if window else 0.0
        headers = {
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(max(0, limit - len(window))),
            "x-ratelimit-reset-requests": f"{reset_s:.3f}s",
        }
        return headers, retry_after

    # -- handlers -----------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        """``POST /v1/chat/completions``: auth -> injected failure -> rate limit -> validate."""
        st = self.state
        st.requests_received += 1
        st.last_traceparent = request.headers.get("traceparent")
        st.last_tracestate = request.headers.get("tracestate")
        st.last_headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        if self.config.latency_ms > 0:
            await asyncio.sleep(self.config.latency_ms / 1000.0)
        response = await self._chat(request)
        st.status_counts[str(response.status_code)] += 1
        if response.status_code == 200:
            st.requests_served += 1
        else:
            st.requests_failed += 1
        return response

    async def _chat(self, request: Request) -> Response:
        api_key, auth_error = self._authenticate(request)
        if auth_error is not None or api_key is None:
            return auth_error or openai_error(401, "unauthenticated", code="invalid_api_key")
        if self.state.pending_failures:
            return self._injected_failure(self.state.pending_failures.popleft())
        rl_headers, retry_after = self._rate_check(api_key)
        if retry_after is not None:
            return openai_error(
                429,
                f"Rate limit reached for requests: Limit {self.config.rpm} / min. "
                f"Please try again in {retry_after}s.",
                err_type="requests",
                code="rate_limit_exceeded",
                headers={**rl_headers, "Retry-After": str(retry_after)},
            )
        try:
            raw = await request.body()
            body = json.loads(raw) if raw else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return openai_error(
                400,
                "We could not parse the JSON body of your request.",
                headers=rl_headers,
            )
        try:
            chat = parse_chat_request(body)
        except BadRequest as exc:
            return openai_error(
                400, exc.message, code=exc.code, param=exc.param, headers=rl_headers
            )
        if chat.model not in self.config.models:
            return openai_error(
                404,
                f"The model `{chat.model}` does not exist or you do not have access to it.",
                code="model_not_found",
                headers=rl_headers,
            )
        self.state.per_model[chat.model] += 1
        return self._completion_response(chat, rl_headers)

    def _injected_failure(self, spec: FailSpec) -> JSONResponse:
        if spec.status == 429:
            retry_after = spec.retry_after if spec.retry_after is not None else 1.0
            return openai_error(
                429,
                "Rate limit reached for requests (simulated). "
                f"Please try again in {retry_after:g}s.",
                err_type="requests",
                code="rate_limit_exceeded",
                headers={
                    "Retry-After": str(math.ceil(retry_after)),
                    "x-ratelimit-limit-requests": str(self.config.rpm),
                    "x-ratelimit-remaining-requests": "0",
                    "x-ratelimit-reset-requests": f"{retry_after:.3f}s",
                },
            )
        headers = {"Retry-After": str(math.ceil(spec.retry_after))} if spec.retry_after else None
        if spec.status == 503:
            return openai_error(
                503,
                "The engine is currently overloaded, please try again later. (simulated)",
                err_type="server_error",
                code="service_unavailable",
                headers=headers,
            )
        if spec.status >= 500:
            return openai_error(
                spec.status,
                "The server had an error while processing your request. Sorry about that! "
                "(simulated)",
                err_type="server_error",
                headers=headers,
            )
        return openai_error(spec.status, f"Simulated HTTP {spec.status} error.", headers=headers)

    def _completion_response(self, chat: ChatRequest, headers: dict[str, str]) -> Response:
        tokens = completion_tokens_for(chat.model, chat.messages, chat.seed)
        finish_reason = "stop"
        if chat.max_tokens is not None and chat.max_tokens < len(tokens):
            tokens = tokens[: chat.max_tokens]
            finish_reason = "length"
        prompt_tokens = count_prompt_tokens(chat.messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_tokens + len(tokens),
        }
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        headers = {**headers, "x-request-id": f"req_{uuid.uuid4().hex}"}
        if chat.stream:
            return _EventStream(
                self._stream(chat, completion_id, created, tokens, finish_reason, usage),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache"},
            )
        body = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": chat.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": render_tokens(tokens),
                        "refusal": None,
                    },
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage,
        }
        return JSONResponse(body, headers=headers)

    async def _stream(
        self,
        chat: ChatRequest,
        completion_id: str,
        created: int,
        tokens: Sequence[str],
        finish_reason: str,
        usage: dict[str, int],
    ) -> AsyncIterator[bytes]:
        """SSE body: role chunk, one chunk per token, finish chunk, optional usage, [DONE].

        Counts itself as started, then completed or closed early (the client went away).
        """
        st = self.state
        include_usage = chat.include_usage and st.stream_usage
        interval_s = st.stream_interval_ms / 1000.0

        def chunk(choices: list[dict[str, Any]], with_usage: dict[str, int] | None) -> bytes:
            payload: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": chat.model,
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": choices,
            }
            if include_usage:
                payload["usage"] = with_usage
            return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()

        def delta(d: dict[str, Any], reason: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}]

        st.streams_started += 1
        cut_after = st.pending_cuts.popleft() if st.pending_cuts else None
        completed = False
        try:
            yield chunk(delta({"role": "assistant", "content": "", "refusal": None}), None)
            for sent, piece in enumerate(stream_pieces(tokens)):
                if sent == cut_after:
                    raise ConnectionAbortedError("injected: the stream is cut mid-answer")
                await asyncio.sleep(interval_s)
                yield chunk(delta({"content": piece}), None)
            yield chunk(delta({}, finish_reason), None)
            if include_usage:
                yield chunk([], usage)
            yield b"data: [DONE]\n\n"
            completed = True
        finally:
            if completed:
                st.streams_completed += 1
            else:
                st.streams_closed_early += 1

    async def list_models(self, request: Request) -> Response:
        """``GET /v1/models`` (authenticated, like OpenAI)."""
        self.state.models_requests += 1
        _, auth_error = self._authenticate(request)
        if auth_error is not None:
            return auth_error
        created = 1_700_000_000
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": "provider-sim"}
            for m in self.config.models
        ]
        return JSONResponse({"object": "list", "data": data})

    # -- simulator-only hooks -------------------------------------------------------------

    async def sim_fail(self, request: Request) -> Response:
        """``POST /_sim/fail``: queue ``count`` failures with ``status`` (simulator-only)."""
        try:
            body = json.loads(await request.body() or b"{}")
            if "cut_after" in body:
                cut_after, count = int(body["cut_after"]), int(body.get("count", 1))
                if cut_after < 0 or count < 0:
                    raise ValueError("cut_after and count must be >= 0")
                self.state.pending_cuts.extend([cut_after] * count)
                return JSONResponse({"queued_cuts": len(self.state.pending_cuts)})
            status = int(body.get("status", 500))
            count = int(body.get("count", 1))
            retry_after_raw = body.get("retry_after")
            retry_after = None if retry_after_raw is None else float(retry_after_raw)
        except (ValueError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            return JSONResponse({"error": f"bad /_sim/fail body: {exc}"}, status_code=400)
        if not 400 <= status <= 599 or count < 0 or (retry_after is not None and retry_after < 0):
            return JSONResponse(
                {"error": "status must be 4xx/5xx, count >= 0, retry_after >= 0"}, status_code=400
            )
        for _ in range(count):
            self.state.pending_failures.append(FailSpec(status, retry_after))
        return JSONResponse({"queued": len(self.state.pending_failures)})

    async def sim_stats(self, request: Request) -> Response:
        """``GET /_sim/stats``: counters for tests (simulator-only)."""
        st = self.state
        return JSONResponse(
            {
                "requests_received": st.requests_received,
                "requests_served": st.requests_served,
                "requests_failed": st.requests_failed,
                "models_requests": st.models_requests,
                "per_model": dict(st.per_model),
                "status_counts": dict(st.status_counts),
                "pending_failures": len(st.pending_failures),
                "streams_started": st.streams_started,
                "streams_completed": st.streams_completed,
                "streams_closed_early": st.streams_closed_early,
                "stream_usage": st.stream_usage,
                "stream_interval_ms": st.stream_interval_ms,
                "last_traceparent": st.last_traceparent,
                "last_tracestate": st.last_tracestate,
                "last_headers": st.last_headers,
            }
        )

    async def sim_config(self, request: Request) -> Response:
        """``POST /_sim/config``: change how streams are sent until the next reset."""
        try:
            body = json.loads(await request.body() or b"{}")
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
            unknown = set(body) - {"stream_usage", "stream_interval_ms"}
            if unknown:
                raise ValueError(f"unknown settings {sorted(unknown)}")
            stream_usage = body.get("stream_usage", self.state.stream_usage)
            interval = float(body.get("stream_interval_ms", self.state.stream_interval_ms))
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            return JSONResponse({"error": f"bad /_sim/config body: {exc}"}, status_code=400)
        if not isinstance(stream_usage, bool) or not 0 <= interval <= 10_000:
            return JSONResponse(
                {"error": "stream_usage must be a boolean, stream_interval_ms 0-10000"},
                status_code=400,
            )
        self.state.stream_usage = stream_usage
        self.state.stream_interval_ms = interval
        return JSONResponse({"stream_usage": stream_usage, "stream_interval_ms": interval})

    async def sim_reset(self, request: Request) -> Response:
        """``POST /_sim/reset``: forget counters, failures and rate windows (simulator-only)."""
        self.state.reset()
        return JSONResponse({"reset": True})


class _EventStream(StreamingResponse):
    """An SSE response that closes its body generator when the response ends, however it ends.

    Starlette leaves a generator whose client went away to the garbage collector; closing it
    here runs its ``finally`` at once, so ``streams_closed_early`` is exact when a test reads it.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            body = self.body_iterator
            if hasattr(body, "aclose"):
                await body.aclose()


def create_app(config: SimConfig) -> Starlette:
    """Build the ASGI app (handy for in-process use)."""
    return ProviderSim(config).app


async def serve(config: SimConfig) -> None:
    """Bind, announce the real URL on stdout once accepting, and serve until SIGTERM/SIGINT.

    Why bind the socket ourselves: ``--port 0`` then works race-free and the printed URL carries
    the port the kernel chose. uvicorn installs SIGTERM/SIGINT handlers for graceful shutdown.
    """
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP. Without
    # it every keep-alive response (headers and body are two writes) waits ~40 ms for the
    # client's delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
    )

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.01)
        sys.stdout.write(f"{READY_PREFIX}http://{config.host}:{port}/v1\n")
        sys.stdout.flush()
        LOG.info(
            "provider-sim ready port=%d models=%s rpm=%d latency_ms=%g",
            port,
            ",".join(config.models),
            config.rpm,
            config.latency_ms,
        )

    announcer = asyncio.create_task(announce())
    try:
        await server.serve(sockets=[sock])
    finally:
        announcer.cancel()
        sock.close()
    LOG.info("provider-sim stopped")


def parse_args(argv: Sequence[str] | None = None) -> SimConfig:
    """CLI flags, each defaulting to an env var (SIM_HOST, SIM_PORT, SIM_API_KEY, ...)."""
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local.provider_sim",
        description="Offline OpenAI-compatible provider simulator (stands in for the hosted API).",
    )
    parser.add_argument("--host", default=env.get("SIM_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env.get("SIM_PORT", "0")))
    parser.add_argument("--api-key", default=env.get("SIM_API_KEY", ""))
    parser.add_argument(
        "--rpm",
        type=int,
        default=int(env.get("SIM_RPM", "600")),
        help="requests per minute allowed per API key, a sliding 60 s window (600)",
    )
    parser.add_argument("--latency-ms", type=float, default=float(env.get("SIM_LATENCY_MS", "5")))
    parser.add_argument("--models", default=env.get("SIM_MODELS", ",".join(DEFAULT_MODELS)))
    args = parser.parse_args(argv)
    if not args.api_key:
        parser.error("--api-key (or SIM_API_KEY) is required")
    if args.rpm < 1:
        parser.error("--rpm must be >= 1")
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if not models:
        parser.error("--models must list at least one model")
    return SimConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        rpm=args.rpm,
        latency_ms=max(0.0, args.latency_ms),
        models=models,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m deploy.local.provider_sim``."""
    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("SIM_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = parse_args(argv)

    def _terminate(signum: int, frame: object) -> None:
        # uvicorn handles SIGTERM itself while serving (graceful drain), then re-raises the
        # captured signal once stopped; ending here turns that into a clean exit status 0.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _terminate)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config))
    return 0


class SimProcess:
    """Runs the simulator as a real subprocess (tests, offline demo).

    Why a subprocess: it exercises the real HTTP stack and signal handling, and keeps the
    simulator's event loop independent of the code under test.
    """

    def __init__(
        self,
        *,
        api_key: str = "sim-key",
        rpm: int = 600,
        latency_ms: float = 5.0,
        models: Sequence[str] = DEFAULT_MODELS,
        host: str = "127.0.0.1",
        port: int = 0,
        log_path: Path | None = None,
        startup_timeout_s: float = 20.0,
    ) -> None:
        self.api_key = api_key
        self._argv = [
            sys.executable,
            "-m",
            "deploy.local.provider_sim",
            "--host",
            host,
            "--port",
            str(port),
            "--api-key",
            api_key,
            "--rpm",
            str(rpm),
            "--latency-ms",
            str(latency_ms),
            "--models",
            ",".join(models),
        ]
        self._log_path = log_path
        self._startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._returncode: int | None = None
        self.base_url = ""
        self.root_url = ""

    def start(self) -> SimProcess:
        """Spawn and block until the ready line is printed; raises if it never appears."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        self._proc = spawn(self._argv, env=env, log_path=self._log_path, stdout=subprocess.PIPE)
        assert self._proc.stdout is not None
        deadline = time.monotonic() + self._startup_timeout_s
        line = b""
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            ready, _, _ = select.select([self._proc.stdout], [], [], 0.1)
            if ready:
                line = self._proc.stdout.readline()
                if line.startswith(READY_PREFIX.encode()):
                    break
        text = line.decode().strip()
        if not text.startswith(READY_PREFIX):
            self.stop()
            raise RuntimeError(f"provider simulator failed to start (last output: {text!r})")
        self.base_url = text[len(READY_PREFIX) :]
        self.root_url = self.base_url.removesuffix("/v1")
        return self

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL as a last resort."""
        proc = self._proc
        if proc is None:
            return
        stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()
        self._returncode = proc.returncode
        self._proc = None

    @property
    def returncode(self) -> int | None:
        """Exit status once stopped (None while running or never started)."""
        return self._returncode if self._proc is None else self._proc.poll()

    def __enter__(self) -> SimProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    raise SystemExit(main())
