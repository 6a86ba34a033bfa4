"""Load for the chaos suite: concurrent callers that behave as a careful client does.

Each caller sends chats with its own request ids through two router replicas, alternating,
and on a retryable status retries the same request (same id) on the other replica with
backoff, within a per-request budget. A quarter of the chats repeat an earlier prompt (cache
hits), a quarter stream (ChatStream), and a fifth go to a hosted model. Everything a caller
sees is kept, so the test can set it against the ledger: which ids were answered, at what
price, after how many attempts, and every failed attempt's status and time.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2, router_pb2_grpc

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}
ATTEMPT_TIMEOUT_S = 5.0
REQUEST_BUDGET_S = 20.0
REPEATED_PROMPTS = 8


@dataclass
class Attempt:
    """One call: when it started and ended, and its status."""

    started: float
    ended: float
    code: grpc.StatusCode
    detail: str = ""

    @property
    def thrown_away(self) -> bool:
        """The router computed this answer and then withheld it, because it could not bill it."""
        return "computed but could not be billed" in self.detail


@dataclass
class Outcome:
    """What the caller of one request id saw, over all its attempts."""

    request_id: str
    model: str
    answers: int = 0  # OK responses received for this id
    cost_nano: int = 0
    answered_id: str = ""  # the request id the answer carried
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.answers > 0

    @property
    def final_code(self) -> grpc.StatusCode:
        return self.attempts[-1].code if self.attempts else grpc.StatusCode.UNKNOWN


class Load:
    """`clients` concurrent callers of `routers` until `stop()`; see the module docstring."""

    def __init__(
        self,
        routers: Sequence[str],
        api_key: str,
        tag: str,
        *,
        clients: int = 12,
        local_model: str = "tiny",
        hosted_model: str = "gpt-4.1",
        max_requests: int = 5_000,
    ) -> None:
        self._channels = [grpc.aio.insecure_channel(address) for address in routers]
        self._stubs = [router_pb2_grpc.RouterServiceStub(c) for c in self._channels]
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._tag = tag
        self._clients = clients
        self._models = (local_model, hosted_model)
        self._max_requests = max_requests
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.outcomes: list[Outcome] = []

    def start(self) -> Load:
        self._tasks = [asyncio.create_task(self._client(n)) for n in range(self._clients)]
        return self

    async def stop(self) -> list[Outcome]:
        """Stop starting requests, let those in progress finish (and retry), return all."""
        self._stopping.set()
        await asyncio.gather(*self._tasks)
        for channel in self._channels:
            await channel.close()
        return self.outcomes

    async def _client(self, client: int) -> None:
        n = 0
        while not self._stopping.is_set() and len(self.outcomes) < self._max_requests:
            n += 1
            model = self._models[1] if n % 5 == 0 else self._models[0]
            prompt = (
                f"chaos {self._tag} repeated {n % REPEATED_PROMPTS}"
                if n % 4 == 1
                else f"chaos {self._tag} client {client} request {n}"
            )
            outcome = Outcome(request_id=f"{self._tag}-{client}-{n}", model=model)
            self.outcomes.append(outcome)
            await self._request(outcome, prompt, stream=n % 4 == 2, first=n + client)

    async def _request(self, outcome: Outcome, prompt: str, *, stream: bool, first: int) -> None:
        """One request id until it is answered, refused for good, or out of budget."""
        give_up = time.monotonic() + REQUEST_BUDGET_S
        delay = 0.05
        for attempt in range(1_000):
            stub = self._stubs[(first + attempt) % len(self._stubs)]
            started = time.monotonic()
            try:
                if stream:
                    cost, answered_id = await self._stream(stub, outcome, prompt)
                else:
                    cost, answered_id = await self._chat(stub, outcome, prompt)
            except grpc.aio.AioRpcError as error:
                outcome.attempts.append(
                    Attempt(started, time.monotonic(), error.code(), error.details() or "")
                )
                if error.code() not in RETRYABLE or time.monotonic() + delay > give_up:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            outcome.attempts.append(Attempt(started, time.monotonic(), grpc.StatusCode.OK))
            outcome.answers += 1
            outcome.cost_nano = cost
            outcome.answered_id = answered_id
            return

    def _request_of(self, outcome: Outcome, prompt: str) -> router_pb2.ChatRequest:
        return router_pb2.ChatRequest(
            model=outcome.model,
            request_id=outcome.request_id,
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=prompt)],
            params=common_pb2.GenerationParams(max_tokens=8, temperature=0.0),
        )

    async def _chat(
        self, stub: router_pb2_grpc.RouterServiceStub, outcome: Outcome, prompt: str
    ) -> tuple[int, str]:
        answer = await stub.Chat(
            self._request_of(outcome, prompt), metadata=self._metadata, timeout=ATTEMPT_TIMEOUT_S
        )
        return answer.cost.nano_usd, answer.request_id

    async def _stream(
        self, stub: router_pb2_grpc.RouterServiceStub, outcome: Outcome, prompt: str
    ) -> tuple[int, str]:
        chat = self._request_of(outcome, prompt)
        request = router_pb2.ChatStreamRequest(
            model=chat.model,
            request_id=chat.request_id,
            messages=chat.messages,
            params=chat.params,
        )
        final: router_pb2.ChatFinal | None = None
        async for chunk in stub.ChatStream(
            request, metadata=self._metadata, timeout=ATTEMPT_TIMEOUT_S
        ):
            if chunk.HasField("final"):
                final = chunk.final
        assert final is not None, "a ChatStream ended OK without its final chunk"
        return final.cost.nano_usd, final.request_id


def failures_by_status(outcomes: Sequence[Outcome]) -> dict[str, int]:
    """Failed attempts (later retried or not) by status name."""
    return dict(
        Counter(a.code.name for o in outcomes for a in o.attempts if a.code != grpc.StatusCode.OK)
    )
