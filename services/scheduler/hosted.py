"""Client for the hosted OpenAI-compatible chat API (e.g. HolySheep) used by the scheduler.

Why a hand-rolled httpx client instead of the ``openai`` SDK: the scheduler needs precise
control over (a) the per-request deadline propagated from gRPC, (b) the retry policy and how
its outcome maps onto gRPC status codes the router understands, and (c) W3C trace-context
injection on every HTTP attempt. The wire format is the plain OpenAI chat-completions JSON.

Error mapping (``HostedError.code``):

* empty API key                 -> UNAVAILABLE, before any HTTP request (names the env var);
* HTTP 401/403                  -> UNAVAILABLE, no retry (the key is wrong; retrying won't help);
* HTTP 429                      -> retried with backoff honouring ``Retry-After``; when retries
  are exhausted, the next wait would pass the deadline, or ``Retry-After`` exceeds
  ``backoff_max_s`` -> RESOURCE_EXHAUSTED with ``retry_after_s`` so callers can shed or reroute;
* HTTP 5xx / 408 / connection errors / per-attempt timeouts -> retried, then UNAVAILABLE;
* deadline reached before or during an attempt -> DEADLINE_EXCEEDED;
* HTTP 404 -> NOT_FOUND, other 4xx -> INVALID_ARGUMENT, carrying the provider's message.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import httpx
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind
from shepherd.common.v1 import common_pb2

from libs.catalog import Deployment
from libs.errors import ShepherdError, retry_info
from services.scheduler.queue import PendingRequest

API_KEY_ENV = "SHEPHERD_HOSTED_API_KEY"

_tracer = trace.get_tracer(__name__)


@dataclass(frozen=True)
class HostedConfig:
    """Static settings for the hosted API; frozen so all requests see one consistent policy."""

    base_url: str
    api_key: str = ""
    request_timeout_s: float = 30.0
    max_retries: int = 3
    backoff_base_s: float = 0.25
    backoff_max_s: float = 8.0


@dataclass(frozen=True)
class HostedResult:
    """A successful completion, with the token usage the provider billed."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    upstream_model: str
    attempts: int


class HostedError(ShepherdError):
    """A hosted-API failure already translated to the gRPC status the scheduler should return.

    ``retry_after_s`` is set when the provider told us (or we estimate) when to come back;
    it travels to the caller as google.rpc.RetryInfo, so back-pressure propagates instead of
    callers hammering the provider.
    """

    def __init__(
        self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(
            code, message, [retry_info(retry_after_s)] if retry_after_s is not None else []
        )
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return (
            f"HostedError(code={self.code.name}, message={self.message!r}, "
            f"retry_after_s={self.retry_after_s!r})"
        )


class _Retryable(Exception):
    """Internal: an attempt failed in a way worth retrying; carries the final error to raise."""

    def __init__(self, error: HostedError, retry_after_s: float | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after_s = retry_after_s


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Parse ``Retry-After`` as delta-seconds or an HTTP-date; None when absent or garbage."""
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


def _provider_message(response: httpx.Response) -> str:
    """The provider's ``error.message`` (OpenAI shape), else a short body excerpt."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
    text = response.text.strip()
    return text[:200] if text else response.reason_phrase


class HostedClient:
    """Calls ``POST {base_url}/chat/completions`` with retries, deadlines and tracing.

    Takes ownership of the ``httpx.AsyncClient`` passed in (``aclose`` closes it). The client
    is created once at start-up so connections are pooled and kept alive across requests.
    """

    def __init__(
        self,
        config: HostedConfig,
        http: httpx.AsyncClient,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._http = http
        self._rng = rng or random.Random()
        self._url = config.base_url.rstrip("/") + "/chat/completions"

    @classmethod
    def create(cls, config: HostedConfig) -> HostedClient:
        """Build a client with a pooled keep-alive ``httpx.AsyncClient``."""
        return cls(config, cls.make_http_client(config))

    @staticmethod
    def make_http_client(config: HostedConfig) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` with bounded pool and HTTP keep-alive for the hosted API."""
        return httpx.AsyncClient(
            timeout=httpx.Timeout(
                config.request_timeout_s, connect=min(10.0, config.request_timeout_s)
            ),
            limits=httpx.Limits(
                max_connections=64, max_keepalive_connections=16, keepalive_expiry=30.0
            ),
            headers={"Accept": "application/json", "User-Agent": "shepherd-scheduler/hosted"},
        )

    @property
    def config(self) -> HostedConfig:
        """The immutable configuration this client was built with."""
        return self._config

    async def aclose(self) -> None:
        """Close the pooled HTTP connections."""
        await self._http.aclose()

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
    ) -> HostedResult:
        """Run one chat completion; ``deadline`` is an absolute ``time.monotonic()`` instant.

        Raises ``HostedError`` (see module docstring for the mapping). Never sleeps past the
        deadline: if the next backoff would, the last error is raised immediately.
        """
        if not self._config.api_key:
            raise HostedError(
                grpc.StatusCode.UNAVAILABLE,
                f"hosted API key is not configured: set {API_KEY_ENV}",
            )
        body: dict[str, Any] = {
            "model": upstream_model,
            "messages": [{"role": role, "content": content} for role, content in messages],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": False,
        }
        if top_p is not None:
            body["top_p"] = top_p
        if seed is not None:
            body["seed"] = seed

        # Captured before our span so that, if no SDK TracerProvider is installed (our span is
        # then invalid), the caller's incoming trace context is still forwarded upstream.
        parent_ctx = otel_context.get_current()
        with _tracer.start_as_current_span("hosted.chat", kind=SpanKind.CLIENT) as span:
            span.set_attribute("gen_ai.request.model", upstream_model)
            span.set_attribute("shepherd.hosted.upstream_model", upstream_model)
            span.set_attribute("server.address", self._http_host())
            attempts = 0
            try:
                while True:
                    attempts += 1
                    span.set_attribute("shepherd.hosted.attempts", attempts)
                    try:
                        result = await self._attempt(body, deadline, attempts, span, parent_ctx)
                    except _Retryable as retry:
                        delay = self._next_delay(attempts, retry.retry_after_s)
                        if attempts > self._config.max_retries:
                            raise self._exhausted(retry, attempts, delay) from None
                        if (
                            retry.retry_after_s is not None
                            and retry.retry_after_s > self._config.backoff_max_s
                        ):
                            # The provider asks for a longer pause than we would ever back off;
                            # holding the request that long only ties up the caller.
                            raise self._exhausted(retry, attempts, delay, too_long=True) from None
                        remaining = _remaining(deadline)
                        if remaining is not None and delay >= remaining:
                            raise self._exhausted(
                                retry, attempts, delay, deadline_hit=True
                            ) from None
                        span.add_event(
                            "hosted.retry",
                            {"attempt": attempts, "delay_s": delay, "reason": retry.error.message},
                        )
                        await asyncio.sleep(delay)
                        continue
                    span.set_attribute("gen_ai.usage.input_tokens", result.prompt_tokens)
                    span.set_attribute("gen_ai.usage.output_tokens", result.completion_tokens)
                    return result
            except HostedError as err:
                span.set_attribute("shepherd.hosted.grpc_code", err.code.name)
                raise

    # -- internals ---------------------------------------------------------------------------

    def _http_host(self) -> str:
        return httpx.URL(self._url).host

    def _next_delay(self, attempt: int, retry_after_s: float | None) -> float:
        """Exponential backoff with equal jitter, never shorter than the provider's Retry-After.

        Equal jitter (half fixed, half random) spreads synchronized retries from many
        scheduler replicas while keeping a minimum wait that actually relieves the provider.
        """
        cfg = self._config
        ceiling = min(cfg.backoff_max_s, cfg.backoff_base_s * (2 ** (attempt - 1)))
        backoff = ceiling / 2 + self._rng.uniform(0.0, ceiling / 2)
        if retry_after_s is not None:
            return max(retry_after_s, backoff)
        return backoff

    def _exhausted(
        self,
        retry: _Retryable,
        attempts: int,
        delay: float,
        *,
        deadline_hit: bool = False,
        too_long: bool = False,
    ) -> HostedError:
        """The error to surface once no further retry is possible."""
        err = retry.error
        if deadline_hit:
            why = f"retrying in {delay:.2f}s would pass the request deadline"
        elif too_long:
            why = f"Retry-After {delay:.2f}s exceeds backoff_max_s {self._config.backoff_max_s}s"
        else:
            why = f"gave up after {attempts} attempt(s)"
        if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            retry_after = retry.retry_after_s if retry.retry_after_s is not None else delay
            return HostedError(err.code, f"{err.message} ({why})", retry_after)
        return HostedError(err.code, f"{err.message} ({why})", err.retry_after_s)

    async def _attempt(
        self,
        body: dict[str, Any],
        deadline: float | None,
        attempt: int,
        span: trace.Span,
        parent_ctx: otel_context.Context,
    ) -> HostedResult:
        """One HTTP call bounded by min(request_timeout_s, time left before the deadline)."""
        remaining = _remaining(deadline)
        if remaining is not None and remaining <= 0:
            raise HostedError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline exceeded before hosted API attempt {attempt}",
            )
        timeout = self._config.request_timeout_s
        deadline_bound = remaining is not None and remaining < timeout
        if remaining is not None:
            timeout = min(timeout, remaining)

        headers = {
            "Authorization": f"Bearer {self._config.api_key}",
            "Content-Type": "application/json",
        }
        if span.get_span_context().is_valid:
            propagate.inject(headers)
        else:
            propagate.inject(headers, context=parent_ctx)

        try:
            async with asyncio.timeout(timeout):
                response = await self._http.post(
                    self._url, json=body, headers=headers, timeout=httpx.Timeout(timeout)
                )
        except (TimeoutError, httpx.TimeoutException) as exc:
            if deadline_bound:
                raise HostedError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"deadline exceeded waiting for the hosted API ({timeout:.3f}s left)",
                ) from exc
            raise _Retryable(
                HostedError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"hosted API timed out after {timeout:.3f}s",
                ),
                None,
            ) from exc
        except httpx.TransportError as exc:
            raise _Retryable(
                HostedError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"hosted API connection failed: {type(exc).__name__}: {exc}",
                ),
                None,
            ) from exc

        status = response.status_code
        span.set_attribute("http.response.status_code", status)
        if status == 200:
            return self._parse_success(response, body["model"], attempt)
        message = _provider_message(response)
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if status in (401, 403):
            raise HostedError(
                grpc.StatusCode.UNAVAILABLE,
                f"hosted API rejected the configured API key (HTTP {status}): check {API_KEY_ENV}",
            )
        if status == 429:
            raise _Retryable(
                HostedError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"hosted API rate limited the request (HTTP 429): {message}",
                    retry_after,
                ),
                retry_after,
            )
        if status >= 500 or status == 408:
            raise _Retryable(
                HostedError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"hosted API error (HTTP {status}): {message}",
                    retry_after,
                ),
                retry_after,
            )
        if status == 404:
            raise HostedError(grpc.StatusCode.NOT_FOUND, f"hosted API (HTTP 404): {message}")
        raise HostedError(
            grpc.StatusCode.INVALID_ARGUMENT, f"hosted API (HTTP {status}): {message}"
        )

    @staticmethod
    def _parse_success(
        response: httpx.Response, requested_model: str, attempts: int
    ) -> HostedResult:
        """Extract text/usage; a malformed 200 is treated as the provider being unavailable."""
        try:
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            usage = data.get("usage") or {}
            return HostedResult(
                text=str(text),
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
                finish_reason=str(choice.get("finish_reason") or "stop"),
                upstream_model=str(data.get("model") or requested_model),
                attempts=attempts,
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise HostedError(
                grpc.StatusCode.UNAVAILABLE,
                f"hosted API returned a malformed completion: {type(exc).__name__}: {exc}",
            ) from exc


def _remaining(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (monotonic), or None when there is no deadline."""
    return None if deadline is None else deadline - time.monotonic()


class HostedBackend:
    """Runs a batch on a hosted API as concurrent calls, one per request.

    A hosted API has no batch endpoint, so a batch buys nothing upstream; it still flows
    through the same queue so that priorities, deadlines and accounting work the same way.
    When every call of a batch fails as unavailable, the whole batch is reported unavailable
    so the scheduler can fall back to the model's next deployment.
    """

    def __init__(self, clients: Mapping[str, HostedClient]) -> None:
        self._clients = clients

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()

    async def run(
        self, deployment: Deployment, batch: Sequence[PendingRequest]
    ) -> list[common_pb2.Completion | ShepherdError]:
        client = self._clients[deployment.provider]
        outcomes = await asyncio.gather(
            *(self._one(client, deployment, item, len(batch)) for item in batch)
        )
        errors = [o for o in outcomes if isinstance(o, ShepherdError)]
        if errors and len(errors) == len(outcomes):
            if all(e.code == grpc.StatusCode.UNAVAILABLE for e in errors):
                raise errors[0]
        return outcomes

    async def _one(
        self, client: HostedClient, deployment: Deployment, item: PendingRequest, batch_size: int
    ) -> common_pb2.Completion | ShepherdError:
        params = item.params
        try:
            result = await client.chat(
                deployment.backend_model,
                item.messages,
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p or None,
                seed=params.seed if params.HasField("seed") else None,
                deadline=item.deadline,
            )
        except HostedError as error:
            return error
        return common_pb2.Completion(
            text=result.text,
            finish_reason=result.finish_reason,
            usage=common_pb2.Usage(
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                total_tokens=result.prompt_tokens + result.completion_tokens,
            ),
            placement=common_pb2.Placement(
                deployment=deployment.name,
                kind=common_pb2.BACKEND_KIND_HOSTED,
                node=client.config.base_url,
                backend_model=result.upstream_model,
                batch_size=batch_size,
            ),
        )
