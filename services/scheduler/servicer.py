"""The SchedulerService RPCs: queue a request and wait for its batch's answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import grpc
from opentelemetry import trace
from shepherd.common.v1 import common_pb2
from shepherd.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from libs.catalog import Catalog
from libs.errors import ShepherdError, invalid_argument
from services.scheduler.batcher import Batcher, PendingRequest

_ROLES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
}


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Hands each request to its model's batcher."""

    def __init__(
        self, catalog: Catalog, batchers: Mapping[str, Batcher], default_timeout_s: float
    ) -> None:
        self._catalog = catalog
        self._batchers = batchers
        self._default_timeout_s = default_timeout_s

    async def Infer(
        self, request: scheduler_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.InferResponse:
        model = self._catalog.resolve(request.model)
        violations = []
        if not request.messages:
            violations.append(("messages", "at least one message is required"))
        if any(m.role not in _ROLES for m in request.messages):
            violations.append(("messages.role", "must be system, user or assistant"))
        if request.params.max_tokens < 1:
            violations.append(("params.max_tokens", "must be resolved to at least 1"))
        if violations:
            raise invalid_argument(violations)
        remaining = context.time_remaining()
        timeout_s = self._default_timeout_s if remaining is None else remaining
        item = PendingRequest(
            request_id=request.request_id,
            tenant=request.tenant,
            messages=tuple((_ROLES[m.role], m.content) for m in request.messages),
            params=request.params,
            deadline=time.monotonic() + timeout_s,
            future=asyncio.get_running_loop().create_future(),
            span_context=trace.get_current_span().get_span_context(),
        )
        self._batchers[model.name].submit(item)
        # If the caller cancels, awaiting cancels the future too, and the batcher skips it.
        try:
            completion = await asyncio.wait_for(item.future, timeout_s)
        except TimeoutError:
            raise ShepherdError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer from the {model.name} backends within {timeout_s:.1f}s",
            ) from None
        return scheduler_pb2.InferResponse(completion=completion)
