"""The hosted OpenAI-compatible chat API (e.g. HolySheep), streamed through the official SDK.

Why the `openai` SDK: it owns the wire format (request bodies, SSE framing, the chunk and
error shapes, the exception per status code), which we would otherwise re-implement and keep
in step with the provider. What the SDK would decide for us, we take back:

* retries: the SDK's are off (`max_retries=0`); we retry with the mesh's one `RetryPolicy`
  (libs/retry.py), which honours Retry-After, never sleeps past the request's deadline, and
  retries only before the first byte of a stream, so a caller never gets a token twice;
* timeouts: each call's timeout is what is left of the request's deadline, and an attempt
  that has sent no byte within the policy's `attempt_timeout_s` is abandoned and retried;
* trace context: the W3C `traceparent` of our client span goes in the headers of every call
  (`extra_headers`), so the provider's trace (if it keeps one) joins ours;
* health: one circuit breaker per provider (breaker.py, the one Triton nodes have). While it is
  open, calls fail UNAVAILABLE at once, naming the provider and when it will be probed, so
  the dispatcher falls back to the model's next deployment instead of every request paying
  a timeout. 5xx, 408, connection failures, timeouts before the first byte and streams that
  break count as failures; any other answer (a 4xx included) shows the provider is up.

One `AsyncOpenAI` client per provider is made at start-up and closed at shutdown, so its
connections are pooled and kept alive. Its transport is aiohttp (`openai.DefaultAioHttpClient`)
rather than the SDK's default httpx: it costs less CPU per call against the provider simulator
(`make bench-hosted`, bench/hosted_transport.py, figures in docs/BENCHMARKS.md).

Streaming: every call is `stream=True` with `stream_options={"include_usage": True}`. Each
content chunk becomes `Delta(text, usage so far)`, and the end a `Final(Completion)` whose
usage is the provider's usage chunk. The usage inside deltas, and the final usage when the
provider sends none, is counted here with the rule the provider simulator uses, so it matches
the simulator exactly and is a stated approximation for real providers (whose BPE tokenizers
typically give somewhat more tokens than this rule for English text):

* completion tokens: the number of words (runs of letters, digits and `_`) plus the number of
  other non-space characters (punctuation, symbols) in the generated text. Counted on the
  text, not per chunk: a chunk may hold several tokens, or half a word;
* prompt tokens: 3 for reply priming, plus for each message 3 for its framing and its
  content's tokens by the same rule.

A Final with counted usage is marked `estimated=True`. Finish reasons are normalised to
"stop", "length" or "content_filter".

Error mapping (`HostedError.code`):

* empty API key                 -> UNAVAILABLE before any call, naming the provider's env var;
* circuit breaker open          -> UNAVAILABLE at once, naming the provider and the next probe;
* HTTP 401/403                  -> UNAVAILABLE, no retry (the key is wrong; retrying won't help);
* HTTP 429                      -> retried with backoff honouring `Retry-After`; when retries
  are exhausted, the next wait would pass the deadline, or `Retry-After` exceeds the policy's
  longest wait -> RESOURCE_EXHAUSTED with `retry_after_s` (google.rpc.RetryInfo);
* HTTP 5xx / 408 / connection errors / no first byte in time -> retried, then UNAVAILABLE;
* deadline reached before or during a call -> DEADLINE_EXCEEDED;
* HTTP 404 -> NOT_FOUND, other 4xx -> INVALID_ARGUMENT, carrying the provider's message;
* a stream that breaks after its first byte -> UNAVAILABLE, not retried, with the usage so far.

`HostedBackend.run` runs one streaming call per request of a batch, concurrently, and yields
their events merged as they come; see its docstring for cancellation.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import re
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import grpc
import httpx2
import openai
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind
from shepherd.common.v1 import common_pb2

from libs import genai
from libs.catalog import Deployment
from libs.errors import ShepherdError, retry_info
from libs.retry import RetryPolicy
from libs.telemetry import tracer
from services.scheduler.breaker import BreakerConfig, BreakerState, CircuitBreaker
from services.scheduler.events import Delta, Event, Failed, Final, usage
from services.scheduler.queue import PendingRequest

API_KEY_ENV = "SHEPHERD_HOSTED_API_KEY"
Transport = Literal["aiohttp", "httpx"]

_log = logging.getLogger(__name__)

# The token counting rule (module docstring); the provider simulator counts the same way.
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_WORD_START = re.compile(r"\w")
_WORD_END = re.compile(r"\w\Z")
MESSAGE_OVERHEAD_TOKENS = 3
REPLY_PRIMING_TOKENS = 3
_FINISH_REASONS = frozenset({"stop", "length", "content_filter"})


def count_tokens(text: str) -> int:
    """Tokens of `text` by the documented rule: words, plus other non-space characters."""
    return len(_TOKEN_RE.findall(text))


def estimate_prompt_tokens(messages: Sequence[tuple[str, str]]) -> int:
    """Prompt tokens by the documented rule: priming, plus framing and content per message."""
    return REPLY_PRIMING_TOKENS + sum(
        MESSAGE_OVERHEAD_TOKENS + count_tokens(content) for _role, content in messages
    )


@dataclass(frozen=True)
class _Reported:
    """The usage a one-shot JSON answer reported (a stream's is the SDK's own object)."""

    prompt_tokens: int
    completion_tokens: int


class _Tally:
    """The text of one stream so far and its completion tokens, counted as chunks arrive.

    Counting each chunk alone would count a word split across two chunks twice; counting
    the whole text on every chunk would be quadratic. Two texts joined have the sum of their
    tokens, less one when the first ends and the second starts inside a word.
    """

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.pieces: list[str] = []
        self._in_word = False

    def add(self, piece: str) -> None:
        tokens = count_tokens(piece)
        if tokens and self._in_word and _WORD_START.match(piece):
            tokens -= 1
        self.completion_tokens += tokens
        self._in_word = _WORD_END.search(piece) is not None
        self.pieces.append(piece)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def usage(self) -> common_pb2.Usage:
        return usage(self.prompt_tokens, self.completion_tokens)


@dataclass(frozen=True)
class HostedConfig:
    """One provider's settings; frozen so all requests see one consistent policy.

    `retry.attempt_timeout_s` bounds the wait for the first byte of each attempt; the whole
    call is bounded by the request's deadline. `breaker` opens the provider's circuit.
    """

    base_url: str
    api_key: str = ""
    api_key_env: str = API_KEY_ENV
    provider: str = "hosted"
    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(attempt_timeout_s=60.0))
    breaker: BreakerConfig = field(
        default_factory=lambda: BreakerConfig(failure_threshold=5, open_cooldown_s=1.0)
    )
    transport: Transport = "aiohttp"
    # Streams hold a connection for their whole answer, so the pool is sized for the
    # scheduler's concurrent hosted calls, not for short request/response exchanges.
    max_connections: int = 256
    max_keepalive_connections: int = 64


@dataclass(frozen=True)
class HostedResult:
    """A finished completion: text, usage (the provider's, or counted when `estimated`)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    upstream_model: str
    attempts: int
    estimated: bool = False


class HostedError(ShepherdError):
    """A hosted-API failure already translated to the gRPC status the scheduler should return.

    `retry_after_s` is set when the provider told us (or we estimate) when to come back; it
    travels to the caller as google.rpc.RetryInfo, so back-pressure propagates instead of
    callers hammering the provider. `usage` is what a stream that broke had consumed.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        retry_after_s: float | None = None,
        usage: common_pb2.Usage | None = None,
    ) -> None:
        super().__init__(
            code, message, [retry_info(retry_after_s)] if retry_after_s is not None else []
        )
        self.retry_after_s = retry_after_s
        self.usage = usage if usage is not None else common_pb2.Usage()

    def __repr__(self) -> str:
        return (
            f"HostedError(code={self.code.name}, message={self.message!r}, "
            f"retry_after_s={self.retry_after_s!r})"
        )


Verdict = Literal["up", "down", "none"]


class _AttemptFailed(Exception):
    """Internal: one attempt failed; says whether it may be retried and what the breaker hears.

    `verdict`: "down" (the provider failed: 5xx, connection, timeout, broken stream), "up" (it
    answered, e.g. a 4xx), "none" (tells nothing: our deadline).
    """

    def __init__(
        self,
        error: HostedError,
        *,
        retryable: bool,
        verdict: Verdict,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.retryable = retryable
        self.verdict = verdict
        self.retry_after_s = retry_after_s


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Parse `Retry-After` as delta-seconds or an HTTP-date; None when absent or garbage."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    reference = now or datetime.now(UTC)
    return max(0.0, (when - reference).total_seconds())


def _retry_after(headers: httpx2.Headers) -> float | None:
    """The provider's wait: OpenAI's `retry-after-ms` when present, else `Retry-After`."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    return parse_retry_after(headers.get("retry-after"))


def _provider_message(error: openai.APIStatusError) -> str:
    """The provider's `error.message` (OpenAI shape), else the SDK's summary."""
    body = error.body
    if isinstance(body, dict):
        message = body.get("message")
        if isinstance(message, str) and message:
            return message
    if isinstance(body, str) and body:
        return body[:200]
    return error.message


def _cause(error: BaseException) -> str:
    cause = error.__cause__
    return f"{type(cause).__name__}: {cause}" if cause is not None else type(error).__name__


class HostedClient:
    """Streams chat completions from one provider, with retries, deadline, breaker and tracing.

    Owns its `AsyncOpenAI` client (`aclose` closes it). There is none when the key is empty:
    every call then fails before any I/O.
    """

    def __init__(
        self,
        config: HostedConfig,
        sdk: openai.AsyncOpenAI | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._sdk = sdk
        self._rng = rng or random.Random()
        self.breaker = CircuitBreaker(config.breaker)
        self._host = httpx2.URL(config.base_url).host

    @classmethod
    def create(cls, config: HostedConfig) -> HostedClient:
        """A client with its pooled SDK client (none when the key is empty)."""
        return cls(config, cls.make_sdk(config) if config.api_key else None)

    @staticmethod
    def make_sdk(config: HostedConfig) -> openai.AsyncOpenAI:
        """An `AsyncOpenAI` for the provider: our transport and pool, no SDK retries."""
        limits = httpx2.Limits(
            max_connections=config.max_connections,
            max_keepalive_connections=config.max_keepalive_connections,
            keepalive_expiry=30.0,
        )
        http: httpx2.AsyncClient
        if config.transport == "aiohttp":
            http = openai.DefaultAioHttpClient(limits=limits)
        else:
            http = openai.DefaultAsyncHttpxClient(limits=limits)
        return openai.AsyncOpenAI(
            api_key=config.api_key,
            base_url=config.base_url,
            max_retries=0,
            http_client=http,
            default_headers={"User-Agent": "shepherd-scheduler/hosted"},
        )

    @property
    def config(self) -> HostedConfig:
        """The immutable configuration this client was built with."""
        return self._config

    @property
    def sdk(self) -> openai.AsyncOpenAI | None:
        """The pooled SDK client (None without a key), e.g. for benchmarks."""
        return self._sdk

    async def aclose(self) -> None:
        """Close the pooled HTTP connections."""
        if self._sdk is not None:
            await self._sdk.close()

    async def chat(
        self,
        upstream_model: str,
        messages: Sequence[tuple[str, str]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float | None,
        seed: int | None,
        deadline: float | None,
        on_delta: Callable[[Delta], None] | None = None,
    ) -> HostedResult:
        """One chat completion; `deadline` is an absolute `time.monotonic()` instant.

        With `on_delta` the answer is streamed, and it gets each content chunk as it arrives
        (it must not block); without it, nobody reads deltas, so the call does not stream.
        Returns once the answer has ended and its connection is released; raises
        `HostedError` (see the module docstring), whose `usage` is what a broken stream had
        consumed. Cancelling the call closes the stream at once.
        """
        config = self._config
        if self._sdk is None or not config.api_key:
            raise HostedError(
                grpc.StatusCode.UNAVAILABLE,
                f"hosted API key for provider {config.provider!r} is not configured: "
                f"set {config.api_key_env}",
            )
        request: dict[str, Any] = {
            "model": upstream_model,
            "messages": [{"role": role, "content": content} for role, content in messages],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": on_delta is not None,
        }
        if on_delta is not None:
            request["stream_options"] = {"include_usage": True}
        if top_p is not None:
            request["top_p"] = top_p
        if seed is not None:
            request["seed"] = seed
        prompt_tokens = estimate_prompt_tokens(messages)

        # Captured before our span so that, if no SDK TracerProvider is installed (our span is
        # then invalid), the caller's incoming trace context is still forwarded upstream.
        parent_ctx = otel_context.get_current()
        with tracer(__name__).start_as_current_span("hosted.chat", kind=SpanKind.CLIENT) as span:
            span.set_attribute(genai.OPERATION_NAME, genai.OPERATION_CHAT)
            span.set_attribute(genai.PROVIDER_NAME, config.provider)
            span.set_attribute(genai.REQUEST_MODEL, upstream_model)
            span.set_attribute("shepherd.hosted.upstream_model", upstream_model)
            span.set_attribute("shepherd.hosted.provider", config.provider)
            span.set_attribute("server.address", self._host)
            attempt = 0
            result: HostedResult | None = None
            last_error = ""
            try:
                while result is None:
                    attempt += 1
                    span.set_attribute("shepherd.hosted.attempts", attempt)
                    self._admit(last_error)
                    verdict: Verdict = "none"
                    delay = 0.0
                    try:
                        result = await self._attempt(
                            request, prompt_tokens, deadline, attempt, span, parent_ctx, on_delta
                        )
                        verdict = "up"
                    except _AttemptFailed as failed:
                        verdict = failed.verdict
                        if not failed.retryable:
                            raise failed.error from None
                        next_delay = config.retry.next_delay(
                            attempt,
                            retry_after=failed.retry_after_s,
                            deadline=deadline,
                            rng=self._rng,
                        )
                        if next_delay is None:
                            raise self._exhausted(failed, attempt, deadline) from None
                        delay, last_error = next_delay, failed.error.message
                        span.add_event(
                            "hosted.retry",
                            {"attempt": attempt, "delay_s": delay, "reason": last_error},
                        )
                    finally:
                        # Always, so a cancelled probe cannot hold a HALF_OPEN breaker.
                        self._verdict(verdict, span)
                    if result is None:
                        await asyncio.sleep(delay)
            except HostedError as err:
                span.set_attribute("shepherd.hosted.grpc_code", err.code.name)
                raise
            span.set_attribute(genai.RESPONSE_MODEL, result.upstream_model)
            span.set_attribute(genai.USAGE_INPUT_TOKENS, result.prompt_tokens)
            span.set_attribute(genai.USAGE_OUTPUT_TOKENS, result.completion_tokens)
            span.set_attribute("shepherd.hosted.usage_estimated", result.estimated)
            return result

    # -- internals ---------------------------------------------------------------------------

    def _admit(self, last_error: str) -> None:
        """Fail fast while the provider's circuit is open (or its one probe is out)."""
        now = time.monotonic()
        breaker = self.breaker
        if breaker.allow(now):
            return
        if breaker.current(now) is BreakerState.OPEN:
            when = f"next probe in {max(0.0, breaker.retry_at - now):.1f}s"
        else:
            when = "a probe call is in flight and decides when it will close"
        raise HostedError(
            grpc.StatusCode.UNAVAILABLE,
            f"hosted provider {self._config.provider!r} is failing: its circuit is open after "
            f"{breaker.failures} consecutive failure(s), {when}; not calling it"
            + (f" (last error: {last_error})" if last_error else ""),
        )

    def _verdict(self, verdict: Verdict, span: trace.Span) -> None:
        """Tell the breaker what an attempt showed: up, down, or nothing (it must hear one)."""
        breaker = self.breaker
        if verdict == "up":
            if breaker.succeeded():
                _log.info("hosted provider healthy", extra={"provider": self._config.provider})
        elif verdict == "down":
            if breaker.failed():
                span.add_event("hosted.circuit_open", {"cooldown_s": breaker.cooldown_s})
                _log.warning(
                    "hosted provider circuit open",
                    extra={"provider": self._config.provider, "cooldown_s": breaker.cooldown_s},
                )
        else:
            breaker.release()

    def _exhausted(
        self, failed: _AttemptFailed, attempts: int, deadline: float | None
    ) -> HostedError:
        """The error to surface once the retry policy says no further attempt."""
        policy = self._config.retry
        retry_after = failed.retry_after_s
        if attempts >= policy.attempts:
            why = f"gave up after {attempts} attempt(s)"
        elif retry_after is not None and retry_after > policy.max_s:
            why = f"Retry-After {retry_after:.2f}s exceeds the longest wait {policy.max_s:g}s"
        else:
            left = 0.0 if deadline is None else max(0.0, deadline - time.monotonic())
            why = f"retrying would pass the request deadline ({left:.2f}s left)"
        err = failed.error
        if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            if retry_after is None:
                retry_after = policy.backoff(attempts, self._rng)
            return HostedError(err.code, f"{err.message} ({why})", retry_after)
        return HostedError(err.code, f"{err.message} ({why})", err.retry_after_s)

    def _trace_headers(self, span: trace.Span, parent_ctx: otel_context.Context) -> dict[str, str]:
        headers: dict[str, str] = {}
        if span.get_span_context().is_valid:
            propagate.inject(headers)
        else:
            propagate.inject(headers, context=parent_ctx)
        return headers

    async def _attempt(
        self,
        request: dict[str, Any],
        prompt_tokens: int,
        deadline: float | None,
        attempt: int,
        span: trace.Span,
        parent_ctx: otel_context.Context,
        on_delta: Callable[[Delta], None] | None,
    ) -> HostedResult:
        """One call: a stream's first byte within the attempt timeout, all of it by the deadline."""
        assert self._sdk is not None
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        left = None if deadline is None else deadline - now
        if left is not None and left <= 0:
            raise _AttemptFailed(
                HostedError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"deadline exceeded before hosted API attempt {attempt}",
                ),
                retryable=False,
                verdict="none",
            )
        deadline_at = None if left is None else loop.time() + left
        first_byte_s = self._config.retry.attempt_timeout(deadline, now)
        first_byte_at = None if first_byte_s is None else loop.time() + first_byte_s
        tally = _Tally(prompt_tokens)
        streaming = False  # the first chunk arrived: from here on, no retry
        reported: Any = None  # the provider's usage chunk
        finish: str | None = None
        model = ""

        def failure(
            message: str,
            code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
            *,
            verdict: Verdict = "down",
            retry_after_s: float | None = None,
            retryable: bool | None = None,
        ) -> _AttemptFailed:
            used = tally.usage() if tally.completion_tokens else None
            return _AttemptFailed(
                HostedError(code, message, retry_after_s, used),
                retryable=(not streaming) if retryable is None else retryable,
                verdict=verdict,
                retry_after_s=retry_after_s,
            )

        def past_deadline() -> bool:
            return deadline_at is not None and loop.time() >= deadline_at - 0.001

        try:
            if not request["stream"]:
                # Nobody reads deltas (a unary Chat): one JSON answer is far cheaper to parse
                # than a chunk per token. Its first byte comes with the whole answer, so the
                # attempt timeout bounds all of it.
                #
                # The SDK's own `post` for the endpoint, not `chat.completions.create`: the same
                # client, transport, errors and timeout, without `create`'s recursive transform
                # of the request and its pydantic model of the answer. Measured on one pooled
                # client against the simulator: 1.34 ms of CPU a call with `create`, 0.67 with
                # `post` (docs/BENCHMARKS.md, "Hosted API transport"). The few fields read
                # here are read from the JSON itself.
                async with asyncio.timeout_at(first_byte_at):
                    raw = await self._sdk.post(
                        "/chat/completions",
                        cast_to=httpx2.Response,
                        body=request,
                        options={
                            "timeout": left if left is not None else first_byte_s,
                            "headers": self._trace_headers(span, parent_ctx),
                        },
                    )
                span.set_attribute("http.response.status_code", raw.status_code)
                whole = raw.json()
                model = str(whole.get("model") or "")
                counted = whole.get("usage")
                if counted is not None:
                    reported = _Reported(
                        int(counted["prompt_tokens"]), int(counted["completion_tokens"])
                    )
                if whole.get("choices"):
                    choice = whole["choices"][0]
                    tally.add(choice["message"].get("content") or "")
                    finish = choice.get("finish_reason")
            else:
                async with asyncio.timeout_at(first_byte_at) as scope:
                    stream = await self._sdk.chat.completions.create(
                        **request,
                        timeout=left if left is not None else first_byte_s,
                        extra_headers=self._trace_headers(span, parent_ctx),
                    )
                    span.set_attribute("http.response.status_code", stream.response.status_code)
                    async with stream:
                        async for chunk in stream:
                            if not streaming:
                                streaming = True
                                scope.reschedule(deadline_at)
                            model = model or chunk.model
                            if chunk.usage is not None:
                                reported = chunk.usage
                            if not chunk.choices:
                                continue
                            choice = chunk.choices[0]
                            piece = choice.delta.content if choice.delta is not None else None
                            if piece:
                                tally.add(piece)
                                if on_delta is not None:
                                    on_delta(Delta(piece, tally.usage()))
                            if choice.finish_reason:
                                finish = choice.finish_reason
        except TimeoutError:
            if past_deadline():
                raise failure(
                    "deadline exceeded waiting for the hosted API"
                    + (" (mid-stream)" if streaming else ""),
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    verdict="none",
                    retryable=False,
                ) from None
            raise failure(f"hosted API sent no byte within {first_byte_s:.3f}s") from None
        except openai.APIStatusError as exc:
            raise self._status_failure(exc, span) from None
        except openai.APIConnectionError as exc:
            # aiohttp reports a refused connection as a connect timeout: tell by the clock.
            if isinstance(exc, openai.APITimeoutError) and past_deadline():
                raise failure(
                    "deadline exceeded waiting for the hosted API",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    verdict="none",
                    retryable=False,
                ) from None
            where = "stream broke" if streaming else "connection failed"
            raise failure(f"hosted API {where}: {_cause(exc)}") from None
        except openai.APIError as exc:  # an error event inside the stream
            raise failure(f"hosted API stream error: {exc.message}") from None
        except (ValueError, TypeError, AttributeError, KeyError) as exc:  # a chunk we cannot read
            raise failure(
                f"hosted API sent a malformed stream: {type(exc).__name__}: {exc}",
                retryable=False,
            ) from None
        if finish is None:
            raise failure("hosted API closed the stream before a finish reason", retryable=False)
        reason = finish if finish in _FINISH_REASONS else "stop"
        text = tally.text
        model = model or request["model"]
        if reported is not None:
            return HostedResult(
                text=text,
                prompt_tokens=int(reported.prompt_tokens),
                completion_tokens=int(reported.completion_tokens),
                finish_reason=reason,
                upstream_model=model,
                attempts=attempt,
            )
        return HostedResult(
            text=text,
            prompt_tokens=tally.prompt_tokens,
            completion_tokens=tally.completion_tokens,
            finish_reason=reason,
            upstream_model=model,
            attempts=attempt,
            estimated=True,
        )

    def _status_failure(self, exc: openai.APIStatusError, span: trace.Span) -> _AttemptFailed:
        """Map an HTTP error status (before any byte of a stream) to its error and retry."""
        status = exc.status_code
        span.set_attribute("http.response.status_code", status)
        message = _provider_message(exc)
        retry_after = _retry_after(exc.response.headers)
        env = self._config.api_key_env
        if status in (401, 403):
            return _AttemptFailed(
                HostedError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"hosted API rejected the configured API key (HTTP {status}): check {env}",
                ),
                retryable=False,
                verdict="up",
            )
        if status == 429:
            return _AttemptFailed(
                HostedError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"hosted API rate limited the request (HTTP 429): {message}",
                    retry_after,
                ),
                retryable=True,
                verdict="up",
                retry_after_s=retry_after,
            )
        if status >= 500 or status == 408:
            return _AttemptFailed(
                HostedError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"hosted API error (HTTP {status}): {message}",
                    retry_after,
                ),
                retryable=True,
                verdict="down",
                retry_after_s=retry_after,
            )
        code = grpc.StatusCode.NOT_FOUND if status == 404 else grpc.StatusCode.INVALID_ARGUMENT
        return _AttemptFailed(
            HostedError(code, f"hosted API (HTTP {status}): {message}"),
            retryable=False,
            verdict="up",
        )


class HostedBackend:
    """Runs a batch on a hosted API as concurrent streaming calls, one per request.

    A hosted API has no batch endpoint, so a batch buys nothing upstream; it still flows
    through the same queue so that priorities, deadlines and accounting work the same way.
    """

    def __init__(self, clients: Mapping[str, HostedClient]) -> None:
        self._clients = clients

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()

    def usable(self, deployment: Deployment) -> bool:
        """Whether a call to `deployment` could go out now: its provider has an API key and
        its circuit breaker is not open."""
        client = self._clients.get(deployment.provider)
        return (
            client is not None
            and client.sdk is not None
            and client.breaker.current() is not BreakerState.OPEN
        )

    def run(
        self, deployment: Deployment, batch: Sequence[PendingRequest]
    ) -> AsyncGenerator[tuple[int, Event], None]:
        """Yield `(row, event)` for the rows of `batch` (row = index into it) as they come.

        Every row that is still wanted ends with one `Final` or `Failed`; errors never
        escape as exceptions. A row whose request is done (its caller cancelled, or the
        dispatcher answered it) has its stream closed at once and yields nothing more; a
        row already done when the run starts is not called at all. Closing the iterator
        early (`aclose`, or leaving an `async for`) closes every open stream. A row that
        failed UNAVAILABLE before its first delta may be sent elsewhere by the dispatcher
        (it checks `batch[row].events.started`); this backend never tries another deployment.
        """
        return self._events(deployment, batch)

    async def _events(
        self, deployment: Deployment, batch: Sequence[PendingRequest]
    ) -> AsyncGenerator[tuple[int, Event], None]:
        client = self._clients[deployment.provider]
        queue: asyncio.Queue[tuple[int, Event | None]] = asyncio.Queue()
        tasks: list[tuple[PendingRequest, asyncio.Task[None], Callable[..., None]]] = []
        for row, item in enumerate(batch):
            if item.events.done:
                continue
            task = asyncio.create_task(
                self._row(client, deployment, row, item, len(batch), queue),
                name=f"hosted:{deployment.name}:{item.request_id}",
            )

            def stop(_outcome: Any, task: asyncio.Task[None] = task) -> None:
                task.cancel()  # the request is done: close its stream now

            item.events.outcome.add_done_callback(stop)
            tasks.append((item, task, stop))
        try:
            running = len(tasks)
            while running:
                row, event = await queue.get()
                if event is None:
                    running -= 1
                elif not batch[row].events.done:
                    yield row, event
        finally:
            for item, task, stop in tasks:
                item.events.outcome.remove_done_callback(stop)
                task.cancel()
            if tasks:
                await asyncio.gather(*(task for _, task, _ in tasks), return_exceptions=True)

    async def _row(
        self,
        client: HostedClient,
        deployment: Deployment,
        row: int,
        item: PendingRequest,
        batch_size: int,
        queue: asyncio.Queue[tuple[int, Event | None]],
    ) -> None:
        """One request's call; its events go to `queue`, then None when the row is over."""
        params = item.params
        try:
            try:
                result = await client.chat(
                    deployment.backend_model,
                    item.messages,
                    max_tokens=params.max_tokens,
                    temperature=params.temperature,
                    top_p=params.top_p or None,
                    seed=params.seed if params.HasField("seed") else None,
                    deadline=item.deadline,
                    on_delta=(lambda delta: queue.put_nowait((row, delta)))
                    if item.deltas
                    else None,
                )
            except HostedError as error:
                queue.put_nowait((row, Failed(error, error.usage)))
                return
            except Exception as error:  # a bug or an SDK surprise: answer the row, keep the rest
                _log.exception("hosted call failed unexpectedly")
                failure = HostedError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"hosted call failed unexpectedly: {type(error).__name__}: {error}",
                )
                queue.put_nowait((row, Failed(failure)))
                return
            completion = common_pb2.Completion(
                text=result.text,
                finish_reason=result.finish_reason,
                usage=usage(result.prompt_tokens, result.completion_tokens),
                placement=common_pb2.Placement(
                    deployment=deployment.name,
                    kind=common_pb2.BACKEND_KIND_HOSTED,
                    node=client.config.base_url,
                    backend_model=result.upstream_model,
                    batch_size=batch_size,
                ),
            )
            queue.put_nowait((row, Final(completion, estimated=result.estimated)))
        finally:
            queue.put_nowait((row, None))
