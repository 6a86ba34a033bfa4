"""Running a formed batch: pick the deployment, call the backend, fan results back.

A model lists its deployments in order of preference. A batch goes to the first; when that
deployment is unavailable as a whole (every Triton node down, the hosted API unreachable or
refusing Shepherd's key), the same batch goes to the next, and only when all have failed is
each request answered UNAVAILABLE with what was tried. One span per batch is parented to the
oldest request's trace and linked to every request span it serves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import grpc
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan
from shepherd.common.v1 import common_pb2

from libs.catalog import Deployment, Model
from libs.errors import ShepherdError
from services.scheduler.batcher import PendingRequest

_tracer = trace.get_tracer(__name__)


class Backend(Protocol):
    """A kind of backend that runs a batch on one deployment."""

    async def run(
        self, deployment: Deployment, batch: Sequence[PendingRequest]
    ) -> list[common_pb2.Completion | ShepherdError]: ...

    async def close(self) -> None: ...


class Dispatcher:
    """Sends batches to backends by deployment kind, with fallback between deployments."""

    def __init__(self, backends: Mapping[str, Backend]) -> None:
        self._backends = backends

    async def run_batch(self, model: Model, batch: list[PendingRequest]) -> None:
        parent = trace.set_span_in_context(NonRecordingSpan(batch[0].span_context))
        links = [Link(item.span_context) for item in batch]
        with _tracer.start_as_current_span("scheduler.batch", context=parent, links=links) as span:
            span.set_attribute("shepherd.model", model.name)
            span.set_attribute("shepherd.batch.size", len(batch))
            failures = []
            for deployment in model.deployments:
                backend = self._backends.get(deployment.kind)
                if backend is None:
                    failures.append(f"{deployment.name}: no {deployment.kind} backend configured")
                    continue
                try:
                    outcomes = await backend.run(deployment, batch)
                except ShepherdError as error:
                    if error.code != grpc.StatusCode.UNAVAILABLE:
                        for item in batch:
                            item.settle(error)
                        return
                    failures.append(f"{deployment.name}: {error.message}")
                    span.add_event("deployment.unavailable", {"deployment": deployment.name})
                    continue
                span.set_attribute("shepherd.deployment", deployment.name)
                for item, outcome in zip(batch, outcomes, strict=True):
                    item.settle(outcome)
                return
            error = ShepherdError(
                grpc.StatusCode.UNAVAILABLE,
                f"no healthy backend for model {model.name}: " + " | ".join(failures),
            )
            span.set_status(trace.StatusCode.ERROR, error.message)
            for item in batch:
                item.settle(error)

    async def close(self) -> None:
        for backend in self._backends.values():
            await backend.close()
