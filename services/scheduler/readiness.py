"""The scheduler's readiness: which models it can serve now, and whether it can serve any.

Each model gets a health name of its own, `shepherd.scheduler.v1.SchedulerService/<model>`,
SERVING while at least one of its deployments is usable: a Triton pool with a node that
answers its health checks and holds the model (or, under explicit model control, has the
memory to load it), or a hosted provider with an API key whose circuit breaker is not open.

The scheduler as a whole (`""` and the service's name, which Kubernetes' readinessProbe asks)
is SERVING while at least one model is usable, not only while all are. Every scheduler
replica watches the same Triton nodes and the same providers, so they all reach the same
verdict at the same moment: requiring every model would take every replica out of rotation
when one model's only node goes down, and the router could then reach none of them, failing
every other model's requests too. A model without a usable backend is answered by the
scheduler itself, at once, with UNAVAILABLE naming the cause (nodes.py, dispatch.py), which
is what its callers should see.
"""

from __future__ import annotations

from collections.abc import Mapping

from shepherd.scheduler.v1 import scheduler_pb2

from libs.catalog import Model
from libs.health import Verdict
from services.scheduler.dispatch import Dispatcher

SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name


def model_health_name(model: str) -> str:
    """The health name that tells whether `model` can be served."""
    return f"{SERVICE}/{model}"


class ModelsProbe:
    """Readiness of the scheduler from the backends of every catalog model (in memory)."""

    name = "backends"

    def __init__(self, models: Mapping[str, Model], dispatcher: Dispatcher) -> None:
        self._models = models
        self._dispatcher = dispatcher

    async def check(self) -> Verdict:
        usable = {name: self._dispatcher.usable(model) for name, model in self._models.items()}
        return Verdict(
            any(usable.values()),
            "no model has a usable backend (Triton node or hosted provider)",
            {model_health_name(name): ok for name, ok in usable.items()},
        )

    async def close(self) -> None:
        """Nothing to close: the probe reads state the scheduler keeps anyway."""
