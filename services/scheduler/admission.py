"""Admission: queue a request, spill it to a hosted API, or refuse it at once.

Refusing early is the point. Triton's own queue timeouts fire late or not at all under bursts
and a full Triton queue answers a bare error; here every request is judged on arrival:

* A request that must stay on self-hosted nodes (its own flag, or its tenant's policy in the
  catalog) for a model that only runs on hosted APIs is refused with FAILED_PRECONDITION.
* For a self-hosted model, the batcher estimates how long this request would wait. When that
  would miss the request's deadline, or the queue is full with nothing lower to shed, the
  request spills over to the model's hosted deployment if it has one and the request may
  leave; otherwise it is refused with RESOURCE_EXHAUSTED and a RetryInfo saying when to retry.
* Otherwise it joins the queue (which may shed a lower-priority request to make room).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import grpc

from libs.catalog import Catalog, Model
from libs.errors import ShepherdError, resource_exhausted
from services.scheduler.batcher import Batcher
from services.scheduler.dispatch import Dispatcher
from services.scheduler.queue import PendingRequest

# The shortest RetryInfo delay: retrying sooner than this only adds load.
MIN_RETRY_S = 0.05


class Admission:
    """Decides where each request goes and hands it there."""

    def __init__(
        self, catalog: Catalog, batchers: Mapping[str, Batcher], dispatcher: Dispatcher
    ) -> None:
        self._catalog = catalog
        self._batchers = batchers
        self._dispatcher = dispatcher

    async def admit(self, model: Model, item: PendingRequest) -> None:
        """Route the request; its answer arrives on `item.future`. Raises when refused."""
        if self._catalog.tenant(item.tenant).self_hosted_only:
            item.self_hosted_only = True
        if item.self_hosted_only and not model.self_hosted:
            raise ShepherdError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {model.name} runs only on hosted APIs, but this request must stay on "
                "self-hosted nodes (tenant policy or self_hosted_only); choose a self-hosted "
                "model such as "
                + ", ".join(m.name for m in self._catalog.models.values() if m.self_hosted),
            )
        batcher = self._batchers[model.name]
        if model.self_hosted:
            remaining = item.deadline - time.monotonic()
            wait_s = batcher.estimated_wait_s(item.rank)
            too_slow = wait_s > remaining
            full = batcher.queue.would_refuse(item.rank)
            if too_slow or full:
                reason = (
                    f"the estimated GPU queue wait of {wait_s * 1000:.0f} ms exceeds the "
                    f"{remaining * 1000:.0f} ms left before the request's deadline"
                    if too_slow
                    else f"the queue of model {model.name} is full"
                )
                if model.hosted and not item.self_hosted_only:
                    await self._dispatcher.spill(model, item, reason)
                    return
                if too_slow:
                    batcher.queue.count("rejected")
                    raise resource_exhausted(
                        f"{reason}; retry later, with a longer deadline, or at higher priority",
                        max(MIN_RETRY_S, wait_s - remaining),
                    )
            retry_s = max(MIN_RETRY_S, wait_s)
        else:
            retry_s = max(MIN_RETRY_S, batcher.stats.dispatch_ema_s)
        batcher.submit(item, retry_s)
