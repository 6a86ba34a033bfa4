"""RouterService/Embed: the chat request path, run for an embedding model.

Why the same path: an Embed request needs everything a chat does (the API key, the model's
alias, budgets and rate limits reserved before any work, the cache with single-flight, the
scheduler's batching, billing and its spool) and differs in two places only, so it reuses
ChatPipeline (services/router/pipeline.py) and replaces those two:

* validation: the inputs (1 to 256, each with some text) instead of messages and sampling
  parameters; there are none, so the parameters are empty and the request is deterministic;
* the compute step: SchedulerService/Embed instead of InferStream; the scheduler queues each
  input as one row of the embedding model's batches and gathers the vectors.

The inputs travel the path as user messages, one per input, so the cache keys, fingerprints
and the worst-case reservation (every input's UTF-8 bytes, at the input price) are the chat
path's own. An identical request (same model, same inputs in the same order) is answered
from the cache at no cost. Usage is the inputs' tokens (prompt tokens; nothing is generated),
billed at the model's price per million input tokens. The vectors are all or nothing: a
failed Embed bills nothing and releases its reservation.

An HTTP edge (POST /v1/embeddings) is one more adapter over `embed`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
from shepherd.cache.v1 import cache_pb2
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2
from shepherd.scheduler.v1 import scheduler_pb2

from libs import genai
from libs.catalog import Model
from libs.errors import ShepherdError, from_rpc_error, invalid_argument
from libs.generation import (
    cache_policy_violations,
    embedding_violations,
    priority_violations,
)
from services.router.flight import Leadership
from services.router.pipeline import (
    ChatEvent,
    ChatLike,
    ChatPipeline,
    Ending,
    Metadata,
    _before,
    _Request,
)
from services.router.validation import MAX_REQUEST_ID_CHARS


class EmbedPipeline(ChatPipeline):
    """The router's Embed path: ChatPipeline with embedding validation and compute."""

    task = "embedding"
    operation = genai.OPERATION_EMBEDDINGS

    @classmethod
    def beside(cls, chat: ChatPipeline) -> EmbedPipeline:
        """An Embed path sharing a chat path's collaborators (quota, cache, billing, spool)."""
        return cls(
            chat._config,
            chat._catalog,
            chat._auth,
            chat._quota,
            chat._scheduler,
            chat._cache,
            chat._usage,
            chat._spool,
        )

    async def embed(
        self, request: router_pb2.EmbedRequest, metadata: Metadata, time_remaining_s: float | None
    ) -> Ending:
        """The vectors of `request.inputs` (Ending.embeddings), what they cost, where they ran."""
        chat = router_pb2.ChatRequest(
            model=request.model,
            messages=[
                common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)
                for text in request.inputs
            ],
            priority=request.priority,
            cache_policy=request.cache_policy,
            request_id=request.request_id,
            self_hosted_only=request.self_hosted_only,
        )
        ending: Ending | None = None
        async for event in self.run(chat, metadata, time_remaining_s, deltas=False, method="Embed"):
            if isinstance(event, Ending):
                ending = event
        assert ending is not None, "the pipeline always ends with an Ending or an error"
        return ending

    def _params(self, request: ChatLike, model: Model) -> common_pb2.GenerationParams:
        """Every problem with the inputs at once, named as EmbedRequest names them."""
        violations = embedding_violations([m.content for m in request.messages])
        violations.extend(priority_violations(request.priority))
        violations.extend(cache_policy_violations(request.cache_policy))
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            violations.append(("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters"))
        if violations:
            raise invalid_argument(violations)
        return common_pb2.GenerationParams()  # nothing is sampled: always deterministic

    async def _compute(
        self,
        request: ChatLike,
        chat: _Request,
        lookup: cache_pb2.LookupResponse,
        deltas: bool,
        leadership: Leadership | None,
    ) -> AsyncIterator[ChatEvent]:
        """Embed through the scheduler, bill the input tokens, store the vectors."""
        embed_request = scheduler_pb2.EmbedRequest(
            request_id=chat.request_id,
            tenant=chat.tenant,
            model=chat.model.name,
            inputs=[m.content for m in request.messages],
            priority=request.priority,
            self_hosted_only=request.self_hosted_only,
        )
        try:
            # To the model's owner; once more if it refused as not the owner or was gone
            # (services/router/schedulers.py), as the chat path does.
            for attempt in range(2):
                replica, scheduler, metadata = self._scheduler.route(chat.model.name)
                try:
                    response = await scheduler.Embed(
                        embed_request,
                        timeout=_before(
                            self._remaining(chat.deadline, self._config.default_timeout_s)
                        ),
                        metadata=metadata,
                    )
                    break
                except grpc.aio.AioRpcError as error:
                    if attempt or not self._scheduler.retryable(replica, error):
                        raise
                    with contextlib.suppress(Exception):  # Redis down: the last view will do
                        await self._scheduler.refresh()
        except grpc.aio.AioRpcError as error:
            await self._quota.release(chat.ticket)
            raise from_rpc_error(error, "scheduler") from error
        except BaseException:
            await self._quota.release(chat.ticket)  # the caller went away: nothing to bill
            raise
        completion = response.completion
        if len(completion.embeddings) != len(request.messages):
            await self._quota.release(chat.ticket)
            raise ShepherdError(
                grpc.StatusCode.INTERNAL,
                f"the scheduler returned {len(completion.embeddings)} vectors for"
                f" {len(request.messages)} inputs",
            )
        cost = await self._bill(chat, completion.usage, completion.placement, cache_hit=False)
        if leadership is not None:
            await leadership.finish(completion, keep=lookup.cacheable, ttl_s=chat.model.cache_ttl_s)
        elif lookup.cacheable:
            await self._store(chat, lookup.key, completion)
        yield self._ending(
            chat,
            common_pb2.FINISH_REASON_STOP,
            completion.usage,
            cost,
            completion.placement,
            cache_hit=False,
            embeddings=completion.embeddings,
        )
