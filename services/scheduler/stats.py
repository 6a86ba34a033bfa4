"""What the scheduler measures: per-model counts, batch sizes, queue wait and dispatch latency.

The same observations feed two readers: GetStats (exact counts since start-up and percentiles
over a recent window, for an operator with grpcurl) and OpenTelemetry metrics (exported over
OTLP next to the traces, for dashboards). Recording is a few integer increments and a deque
append, cheap enough to do on every request.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from opentelemetry import metrics

_meter = metrics.get_meter("shepherd.scheduler")
_requests = _meter.create_counter(
    "shepherd.scheduler.requests", unit="{request}", description="Requests by outcome."
)
_batch_size = _meter.create_histogram(
    "shepherd.scheduler.batch.size",
    unit="{request}",
    description="Requests per dispatched batch.",
    explicit_bucket_boundaries_advisory=[1, 2, 4, 8, 16, 32, 64, 128],
)
_queue_wait = _meter.create_histogram(
    "shepherd.scheduler.queue.wait", unit="ms", description="Time a request waited in queue."
)
_dispatch_latency = _meter.create_histogram(
    "shepherd.scheduler.dispatch.latency", unit="ms", description="Time a batch took to run."
)
_placement = _meter.create_counter(
    "shepherd.scheduler.placement.events", unit="{event}", description="Model loads and unloads."
)

WINDOW = 4096  # recent samples kept for percentiles


def percentile(samples: Iterable[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; 0 with no samples."""
    ordered = sorted(samples)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class ModelStats:
    """Counters of one model since start-up and recent latency samples in milliseconds."""

    model: str
    completed: int = 0
    spilled_over: int = 0
    batches: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    queue_wait_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    dispatch_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    dispatch_ema_s: float = 0.0

    def outcome(self, outcome: str, count: int = 1) -> None:
        """Count requests that ended in `outcome` (completed, rejected, shed, ...)."""
        if outcome == "completed":
            self.completed += count
        elif outcome == "spilled_over":
            self.spilled_over += count
        _requests.add(count, {"model": self.model, "outcome": outcome})

    def batch(self, size: int, waits_ms: Iterable[float]) -> None:
        """A batch of `size` left the queue; `waits_ms` are its requests' queue waits."""
        self.batches += 1
        self.batch_sizes[size] += 1
        attributes = {"model": self.model}
        _batch_size.record(size, attributes)
        for wait in waits_ms:
            self.queue_wait_ms.append(wait)
            _queue_wait.record(wait, attributes)

    def dispatched(self, latency_s: float, where: str, primary: bool) -> None:
        """A batch came back from `where` after `latency_s`.

        Only the primary deployment's latency feeds the EMA that admission uses to estimate
        queue waits: a spilled request's hosted latency says nothing about the GPU queue.
        """
        self.dispatch_ms.append(latency_s * 1000)
        if primary:
            self.dispatch_ema_s = (
                latency_s
                if self.dispatch_ema_s == 0
                else 0.2 * latency_s + 0.8 * self.dispatch_ema_s
            )
        _dispatch_latency.record(latency_s * 1000, {"model": self.model, "backend": where})


def placement_event(node: str, model: str, action: str) -> None:
    """Count a placement action in the exported metrics."""
    _placement.add(1, {"node": node, "model": model, "action": action})


def observe_queue_depth(read: Callable[[], Iterable[tuple[str, int]]]) -> None:
    """Export each model's queue depth as an observable gauge read at collection time."""

    def callback(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        return [metrics.Observation(depth, {"model": model}) for model, depth in read()]

    _meter.create_observable_gauge(
        "shepherd.scheduler.queue.depth",
        callbacks=[callback],
        unit="{request}",
        description="Requests waiting per model.",
    )
