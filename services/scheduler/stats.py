"""What the scheduler measures: per-model counts, batch sizes, queue wait and dispatch latency.

The same observations feed two readers: GetStats (exact counts since start-up and percentiles
over a recent window, for an operator with grpcurl) and OpenTelemetry metrics (/metrics for
Prometheus, and OTLP next to the traces, for dashboards). Recording is a few integer
increments and a deque append, cheap enough to do on every request. Request duration, time to
first token and time per output token are exported in the GenAI conventions' names and units
(`gen_ai.server.*`, seconds; libs/genai.py), recorded once per request as it ends (`served`).

Per tenant, GetStats also shows admitted and completed counts and queue waits, so an operator
can see whether fair share holds (one tenant's flood must not show up in another's waits).
These are not exported as metrics: tenant names would make unbounded label sets. Memory stays
bounded: each tenant keeps a small sample window, and a model tracks at most `MAX_TENANTS`
tenants, forgetting the least recently seen beyond that.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics
from shepherd.common.v1 import common_pb2

from libs import genai, histograms

_meter = metrics.get_meter("shepherd.scheduler")
_batch_size = histograms.histogram(
    "shepherd.scheduler",
    "shepherd.scheduler.batch.size",
    unit="{request}",
    description="Requests per dispatched batch.",
    boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
)
_queue_wait = histograms.histogram(
    "shepherd.scheduler",
    "shepherd.scheduler.queue.wait",
    unit="ms",
    description="Time a request waited in queue.",
)
_dispatch_latency = histograms.histogram(
    "shepherd.scheduler",
    "shepherd.scheduler.dispatch.latency",
    unit="ms",
    description="Time a batch took to run.",
)
_batch_fill = histograms.histogram(
    "shepherd.scheduler",
    "shepherd.scheduler.batch.fill",
    unit="1",
    description="Requests per dispatched batch over the model's max batch size.",
    boundaries=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
)


_request_duration = genai.histogram("shepherd.scheduler.genai", genai.SERVER_REQUEST_DURATION)
_ttft = genai.histogram("shepherd.scheduler.genai", genai.SERVER_TIME_TO_FIRST_TOKEN)
_tpot = genai.histogram("shepherd.scheduler.genai", genai.SERVER_TIME_PER_OUTPUT_TOKEN)
_placement = _meter.create_counter(
    "shepherd.scheduler.placement.events", unit="{event}", description="Model loads and unloads."
)

WINDOW = 4096  # recent samples kept for percentiles
TENANT_WINDOW = 256  # recent queue waits kept per tenant
MAX_TENANTS = 1024  # tenants tracked per model; the least recently seen are forgotten


def percentile(samples: Iterable[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; 0 with no samples."""
    ordered = sorted(samples)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class TenantStats:
    """One tenant's requests through one model's queue, since it was last (re)tracked."""

    admitted: int = 0
    completed: int = 0
    queue_wait_ms: deque[float] = field(default_factory=lambda: deque(maxlen=TENANT_WINDOW))


@dataclass
class ModelStats:
    """Counters of one model since start-up and recent latency samples in milliseconds."""

    model: str
    max_batch_size: int = 0  # for the batch fill ratio; 0: not exported
    completed: int = 0
    spilled_over: int = 0
    batches: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    queue_wait_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    dispatch_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    dispatch_ema_s: float = 0.0
    ttft_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    tpot_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    # Least recently seen first; bounded by MAX_TENANTS.
    tenants: OrderedDict[str, TenantStats] = field(default_factory=OrderedDict)
    # Every outcome since start-up, read by the exported counter when metrics are collected.
    outcomes: Counter[str] = field(default_factory=Counter)

    def tenant(self, name: str) -> TenantStats:
        """A tenant's entry, marked as just seen; beyond MAX_TENANTS the stalest is dropped."""
        entry = self.tenants.get(name)
        if entry is None:
            entry = self.tenants[name] = TenantStats()
            while len(self.tenants) > MAX_TENANTS:
                self.tenants.popitem(last=False)
        else:
            self.tenants.move_to_end(name)
        return entry

    def tenant_admitted(self, tenant: str) -> None:
        """A request of `tenant` joined the queue."""
        self.tenant(tenant).admitted += 1

    def tenants_completed(self, tenants: Iterable[str]) -> None:
        """Requests of these tenants, taken from the queue, were answered with a completion."""
        for tenant in tenants:
            self.tenant(tenant).completed += 1

    def outcome(self, outcome: str, count: int = 1) -> None:
        """Count requests that ended in `outcome` (completed, rejected, shed, ...)."""
        if outcome == "completed":
            self.completed += count
        elif outcome == "spilled_over":
            self.spilled_over += count
        self.outcomes[outcome] += count

    def batch(self, size: int, waits_ms: Iterable[tuple[str, float]]) -> None:
        """A batch of `size` left the queue; `waits_ms` are its requests' (tenant, queue wait)."""
        self.batches += 1
        self.batch_sizes[size] += 1
        attributes = {"model": self.model}
        _batch_size.record(size, attributes)
        if self.max_batch_size:
            _batch_fill.record(size / self.max_batch_size, attributes)
        for tenant, wait in waits_ms:
            self.queue_wait_ms.append(wait)
            self.tenant(tenant).queue_wait_ms.append(wait)
            _queue_wait.record(wait, attributes)

    def first_token(self, since_admitted_s: float) -> None:
        """A request sent its first text, `since_admitted_s` after it was admitted."""
        self.ttft_ms.append(since_admitted_s * 1000)

    def finished(self, first_at: float | None, now: float, completion: Any) -> None:
        """A request ended; time per output token after the first, when it streamed several."""
        tokens = completion.usage.completion_tokens
        if first_at is None or tokens < 2:
            return
        per_token_ms = (now - first_at) * 1000 / (tokens - 1)
        self.tpot_ms.append(per_token_ms)

    def served(
        self,
        seconds: float,
        provider: str,
        *,
        completion: common_pb2.Completion | None = None,
        ttft_s: float | None = None,
        tpot_s: float | None = None,
        error_type: str = "",
    ) -> None:
        """A request ended after `seconds`: the GenAI server metrics (libs/genai.py).

        Time to first token and per output token are the conventions' "for successful
        responses", so they come only with a `completion`.
        """
        attributes: dict[str, str] = {
            genai.OPERATION_NAME: genai.OPERATION_CHAT,
            genai.PROVIDER_NAME: provider,
            genai.REQUEST_MODEL: self.model,
        }
        if completion is not None:
            model = completion.placement.backend_model
            if model:
                attributes[genai.RESPONSE_MODEL] = model
            if ttft_s is not None:
                _ttft.record(ttft_s, attributes)
            if tpot_s is not None:
                _tpot.record(tpot_s, attributes)
        if error_type:
            attributes[genai.ERROR_TYPE] = error_type
        _request_duration.record(seconds, attributes)

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


def observe_outcomes(read: Callable[[], Iterable[ModelStats]]) -> None:
    """Export every model's outcome counts as a counter read at collection time: counting an
    outcome on the request path is then an integer addition."""

    def callback(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        return [
            metrics.Observation(count, {"model": stats.model, "outcome": outcome})
            for stats in read()
            for outcome, count in list(stats.outcomes.items())
        ]

    _meter.create_observable_counter(
        "shepherd.scheduler.requests",
        callbacks=[callback],
        unit="{request}",
        description="Requests by outcome.",
    )


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
