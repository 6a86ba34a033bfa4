"""The RouterService RPCs: thin gRPC adapters over the transport-neutral chat pipeline.

Chat collects the pipeline's events into one answer; ChatStream forwards them as they come
(services/router/pipeline.py owns the request path itself); Embed runs the same path for an
embedding model (services/router/embeddings.py). ListModels and GetUsage read the catalog
and the caller's own usage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from shepherd.billing.v1 import billing_pb2, billing_pb2_grpc
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2, router_pb2_grpc

from libs.catalog import Catalog
from libs.errors import from_rpc_error
from libs.server import outbound_timeout
from services.router.auth import Authenticator
from services.router.config import RouterConfig
from services.router.embeddings import EmbedPipeline
from services.router.pipeline import FINISH_TEXT, ChatPipeline, Ending, Text

_TASKS = {"chat": router_pb2.MODEL_TASK_CHAT, "embedding": router_pb2.MODEL_TASK_EMBEDDING}


def _final(ending: Ending) -> router_pb2.ChatFinal:
    return router_pb2.ChatFinal(
        request_id=ending.request_id,
        model=ending.model,
        finish_reason=ending.finish_reason,
        usage=ending.usage,
        cost=ending.cost,
        placement=ending.placement,
        cache_hit=ending.cache_hit,
        trace_id=ending.trace_id,
        usage_estimated=ending.usage_estimated,
        seed=ending.seed,
        coalesced=ending.coalesced,
        document_ids=ending.document_ids,
    )


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    """Shepherd's public API."""

    def __init__(
        self,
        config: RouterConfig,
        catalog: Catalog,
        authenticator: Authenticator,
        pipeline: ChatPipeline,
        billing: billing_pb2_grpc.BillingServiceStub,
        embeddings: EmbedPipeline | None = None,
    ) -> None:
        self._config = config
        self._catalog = catalog
        self._auth = authenticator
        self._pipeline = pipeline
        self._billing = billing
        self._embeddings = embeddings or EmbedPipeline.beside(pipeline)

    async def Chat(
        self, request: router_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ChatResponse:
        parts: list[str] = []
        ending: Ending | None = None
        async for event in self._pipeline.run(
            request, context.invocation_metadata() or (), context.time_remaining(), deltas=False
        ):
            if isinstance(event, Text):
                parts.append(event.text)
            else:
                ending = event
        assert ending is not None, "the pipeline always ends with an Ending or an error"
        return router_pb2.ChatResponse(
            request_id=ending.request_id,
            model=ending.model,
            text="".join(parts),
            finish_reason=FINISH_TEXT.get(ending.finish_reason, "stop"),
            usage=ending.usage,
            cost=ending.cost,
            placement=ending.placement,
            cache_hit=ending.cache_hit,
            trace_id=ending.trace_id,
            seed=ending.seed,
            coalesced=ending.coalesced,
            document_ids=ending.document_ids,
        )

    async def Embed(
        self, request: router_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.EmbedResponse:
        ending = await self._embeddings.embed(
            request, context.invocation_metadata() or (), context.time_remaining()
        )
        return router_pb2.EmbedResponse(
            request_id=ending.request_id,
            model=ending.model,
            embeddings=ending.embeddings,
            usage=ending.usage,
            cost=ending.cost,
            placement=ending.placement,
            cache_hit=ending.cache_hit,
            trace_id=ending.trace_id,
            coalesced=ending.coalesced,
        )

    async def ChatStream(
        self, request: router_pb2.ChatStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.ChatStreamResponse]:
        async for event in self._pipeline.run(
            request, context.invocation_metadata() or (), context.time_remaining()
        ):
            if isinstance(event, Text):
                yield router_pb2.ChatStreamResponse(delta=router_pb2.ChatDelta(text=event.text))
            else:
                yield router_pb2.ChatStreamResponse(final=_final(event))

    async def ListModels(
        self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListModelsResponse:
        await self._auth.tenant_for(context.invocation_metadata())
        return router_pb2.ListModelsResponse(
            models=[
                router_pb2.ModelInfo(
                    name=model.name,
                    aliases=model.aliases,
                    family=model.family,
                    input_price_per_million=common_pb2.Money(
                        nano_usd=model.price.input_nano_per_million
                    ),
                    output_price_per_million=common_pb2.Money(
                        nano_usd=model.price.output_nano_per_million
                    ),
                    deployments=[d.name for d in model.deployments],
                    task=_TASKS[model.task],
                )
                for model in self._catalog.models.values()
            ]
        )

    async def GetUsage(
        self, request: router_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.GetUsageResponse:
        tenant = await self._auth.tenant_for(context.invocation_metadata())
        try:
            report = await self._billing.GetUsage(
                billing_pb2.GetUsageRequest(
                    tenant=tenant, start_day=request.start_day, end_day=request.end_day
                ),
                timeout=outbound_timeout(context, self._config.billing_timeout_s),
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, "billing") from error
        # What the tenant's GPU time cost Shepherd, and what hosting it elsewhere would have,
        # are the operator's figures (AdminService/GetTenantReport): a tenant sees its own
        # GPU time, as its answers show it, and what it was billed.
        for bucket in report.buckets:
            for name in ("gpu_cost", "hosted_equivalent_cost", "savings"):
                bucket.ClearField(name)
        return router_pb2.GetUsageResponse(
            tenant=tenant, buckets=report.buckets, total_cost=report.total_cost
        )
