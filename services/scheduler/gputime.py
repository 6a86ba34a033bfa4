"""GPU time per request: each Triton execution's time, as Triton itself reports it, split
among the requests of the batch that ran in it.

The measure. Triton's statistics extension keeps, per model and per batch size, how many
executions it ran and how long they took (`ModelStatistics.batch_stats[size]`): compute_input
(inputs copied to the GPU), compute_infer (the model's execute) and compute_output (outputs
copied back). Their sum is an execution's time on the GPU, from the only party that saw it
start and end; it excludes the time the batch queued inside Triton, the network and the
client. That is why it is the measure here and the call's wall time is not: with several
batches in flight per node (`max_inflight_batches`) a batch's wall time includes waiting for
the one before it, so wall times add up to more than the GPU ever worked.
`inference_stats` is no substitute either: it is accumulated per request, so an execution
that merged several requests would be counted once per request. Every Shepherd batch is one
Triton request of N rows, and Triton executes it once, recording it under batch size N.

How a batch learns its time. Triton does not return timings with a response, so after a
batch ends its node is asked for the model's statistics, and the increase since the previous
read is the time of the executions that finished in between. One meter per (node, Triton
model) keeps the last read; at most one read is in flight per meter, so batches that end while
one is under way share the next read, and under load a read serves several batches. A batch
is known to its meter from the moment it is sent, and the increase of each batch size goes to
the unserved batches of that size in the order they were sent (Triton runs one instance's
executions in arrival order); several of one size in one read share it in proportion to their
own wall time (from its start, or the end of the meter's previous batch if later, to its end).
The two ends do not see the end at the same moment: Triton records an execution when its
execute() returns, which can be a moment after the client received the last response, or,
when the client is busy, a moment before. So a read may serve a batch whose answer is still on
its way (its time is ready when it ends), and a batch that ended before Triton recorded it
waits for the next read, polled at once and then with a short backoff. Every nanosecond a read
shows is attributed to some batch or counted as `other_ns` (executions of a size no batch of
ours has: another scheduler replica sharing the node, or a batch that failed before Shepherd
learned it ran), so Σ attributed time over a period equals Triton's own sum for it.
Nanoseconds become microseconds on the meter's running total (floor of the cumulative sum),
so rounding never drifts.

Splitting a batch. A batch's GPU time goes to its rows in proportion to the tokens each row
processed, prompt plus completion: a transformer does the same work per token for every row
of a batch (one position in the prefill, one decoding step per generated token), so a row
that brought a longer prompt or generated more tokens kept the GPU busy longer. The split is
exact in integer microseconds: each row gets the floor of its share, and the microseconds
left over go one each to the rows with the largest remainders, ties to the earlier row, so
the rows add up to the batch's time exactly and the same batch always splits the same way. A
batch of one gets the whole; a batch whose rows processed no tokens splits evenly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException

from libs.tasks import log_failure

_log = logging.getLogger(__name__)

# How long a finished batch may wait for Triton to record its execution before it is given
# 0 (and the time goes to whichever batch the next read serves): far above the moment Triton
# takes, so only a node that stopped answering reaches it.
RECORD_TIMEOUT_S = 10.0
# The pause between reads while a finished batch's execution is not recorded yet: doubling
# from the first to the last.
FIRST_POLL_S = 0.001
MAX_POLL_S = 0.05
READ_TIMEOUT_S = 5.0


def split(total: int, weights: Sequence[int]) -> list[int]:
    """Split `total` into integers proportional to `weights` that add up to `total` exactly.

    Largest remainder: each part is the floor of its share; what is left goes one unit each
    to the parts with the largest remainders, the earlier part first on a tie. All weights
    zero (or none positive) splits evenly the same way.
    """
    if not weights:
        return []
    if any(w < 0 for w in weights):
        raise ValueError("weights must not be negative")
    weights = list(weights) if sum(weights) > 0 else [1] * len(weights)
    whole = sum(weights)
    parts = [total * w // whole for w in weights]
    remainders = [total * w % whole for w in weights]
    left = total - sum(parts)
    for index in sorted(range(len(weights)), key=lambda i: (-remainders[i], i))[:left]:
        parts[index] += 1
    return parts


@dataclass(frozen=True)
class Execution:
    """Triton's counters of one batch size: executions and their total time in ns."""

    count: int
    ns: int


def executions(model_stats: Sequence[Any]) -> dict[int, Execution]:
    """Per batch size, Triton's execution count and compute time (input + infer + output),
    over every version of the model it reported."""
    result: dict[int, Execution] = {}
    for stats in model_stats:
        for entry in stats.batch_stats:
            infer = entry.compute_infer
            before = result.get(int(entry.batch_size), Execution(0, 0))
            result[int(entry.batch_size)] = Execution(
                before.count + int(infer.count),
                before.ns
                + int(entry.compute_input.ns)
                + int(infer.ns)
                + int(entry.compute_output.ns),
            )
    return result


@dataclass(eq=False)
class Metered:
    """One batch a meter knows of: sent at `started`, ended at `ended` (monotonic seconds).
    `execution_us` resolves with its execution time in microseconds."""

    rows: int
    started: float
    ended: float | None = None
    own_s: float = 0.0  # its own share of wall time, to split one batch size's increase
    execution_us: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class ExecutionMeter:
    """The execution time of each batch one Triton node runs for one model (see above).

    `start()` once before the first batch; `begin()` when a batch is sent, and `end()` when
    it is over, or `abandon()` when it failed before its first response.
    """

    def __init__(self, client: triton.InferenceServerClient, address: str, model: str) -> None:
        self.client = client
        self.address = address
        self.model = model
        self._seen: dict[int, Execution] | None = None
        self._baseline: asyncio.Future[dict[int, Execution]] | None = None
        self._unserved: list[Metered] = []  # in the order they were sent
        self._reader: asyncio.Task[None] | None = None
        self._last_end = 0.0
        self._ns = 0  # attributed so far: batches' microseconds are cut from this running sum
        self.other_ns = 0
        self.reads = 0
        self.batches = 0  # batches given their time by a read
        self._failing = False

    async def _read(self) -> dict[int, Execution]:
        self.reads += 1
        response = await self.client.get_inference_statistics(
            self.model, client_timeout=READ_TIMEOUT_S
        )
        return executions(response.model_stats)

    async def start(self) -> None:
        """Take the baseline (the model's counters before this process's first batch).

        Raises InferenceServerException when the node cannot be asked: the node is in no
        state to run the batch either.
        """
        if self._seen is not None:
            return
        if self._baseline is None:
            self._baseline = asyncio.ensure_future(self._read())
        baseline = self._baseline
        try:
            seen = await asyncio.shield(baseline)
        except BaseException:
            if baseline.done() and self._baseline is baseline:
                self._baseline = None  # failed: the next batch asks again
                if not baseline.cancelled():
                    baseline.exception()  # retrieved: logged by the caller that raised
            raise
        if self._seen is None:
            self._seen = seen

    def begin(self, rows: int) -> Metered:
        """A batch of `rows` rows is being sent now."""
        batch = Metered(rows, time.monotonic())
        self._unserved.append(batch)
        return batch

    def end(self, batch: Metered) -> asyncio.Future[int]:
        """The batch is over (its last response came, or it was cancelled): read its time."""
        batch.ended = time.monotonic()
        batch.own_s = max(batch.ended - max(batch.started, self._last_end), 1e-6)
        self._last_end = max(self._last_end, batch.ended)
        if not batch.execution_us.done() and (self._reader is None or self._reader.done()):
            self._reader = asyncio.get_running_loop().create_task(
                self._run(), name=f"gputime:{self.address}/{self.model}"
            )
            self._reader.add_done_callback(log_failure)
        return batch.execution_us

    def abandon(self, batch: Metered) -> None:
        """The batch failed before Shepherd learned that it ran: expect no time for it."""
        if batch in self._unserved:
            self._unserved.remove(batch)
        batch.execution_us.cancel()

    async def settled(self, timeout_s: float) -> None:
        """Wait, at most `timeout_s`, until every batch that ended has its time.

        Why: a model's counters go with it when it is unloaded, so a read after that cannot
        see the batches that ended just before; placement waits for this first (placement.py).
        """
        waiting = [
            batch.execution_us
            for batch in self._unserved
            if batch.ended is not None and not batch.execution_us.done()
        ]
        if waiting:
            await asyncio.wait(waiting, timeout=timeout_s)

    def _ended(self) -> bool:
        return any(batch.ended is not None for batch in self._unserved)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for batch in self._unserved:
            if not batch.execution_us.done():
                batch.execution_us.set_result(0)
        self._unserved.clear()

    async def _run(self) -> None:
        """Read until every batch that ended has its time; one read in flight at a time."""
        pause = 0.0
        while self._ended():
            if pause:
                await asyncio.sleep(pause)
            try:
                current = await self._read()
            except InferenceServerException as error:
                if not self._failing:
                    self._failing = True
                    _log.warning(
                        "cannot read Triton statistics; GPU time waits",
                        extra={"node": self.address, "model": self.model, "error": str(error)},
                    )
                pause = min(max(pause * 2, 0.1), 1.0)
                self._expire()
                continue
            self._failing = False
            served = self._apply(current)
            if self._ended():
                pause = FIRST_POLL_S if served else min(max(pause * 2, FIRST_POLL_S), MAX_POLL_S)
                self._expire()

    def _expire(self) -> None:
        """Give 0 to batches whose execution Triton never recorded in time."""
        now = time.monotonic()
        for batch in list(self._unserved):
            if batch.ended is not None and now - batch.ended > RECORD_TIMEOUT_S:
                self._unserved.remove(batch)
                _log.warning(
                    "Triton never recorded a batch's execution; it is attributed no GPU time",
                    extra={"node": self.address, "model": self.model, "rows": batch.rows},
                )
                if not batch.execution_us.done():
                    batch.execution_us.set_result(0)

    def _apply(self, current: Mapping[int, Execution]) -> bool:
        """Attribute the increase since the last read; True if some batch got its time."""
        seen = self._seen if self._seen is not None else {}
        now = time.monotonic()
        served: list[tuple[Metered, int]] = []
        for size, counters in sorted(current.items()):
            before = seen.get(size, Execution(0, 0))
            if counters.count < before.count or counters.ns < before.ns:
                before = Execution(0, 0)  # the model was reloaded: its counters restarted
            count, ns = counters.count - before.count, counters.ns - before.ns
            if count <= 0:
                continue
            ours = [batch for batch in self._unserved if batch.rows == size][:count]
            if not ours:
                self.other_ns += ns
                continue
            if count > len(ours):
                # Executions of this size that are not ours (another replica on the node):
                # ours get the mean time of one, the rest is someone else's.
                mine = ns * len(ours) // count
                self.other_ns += ns - mine
                ns = mine
            weights = [
                max(1, round(1e6 * (b.own_s if b.ended else now - max(b.started, self._last_end))))
                for b in ours
            ]
            for batch, part in zip(ours, split(ns, weights), strict=True):
                self._unserved.remove(batch)
                served.append((batch, part))
        self._seen = dict(current)
        served.sort(key=lambda pair: pair[0].started)
        self.batches += len(served)
        for batch, ns in served:
            us = (self._ns + ns) // 1000 - self._ns // 1000
            self._ns += ns
            if not batch.execution_us.done():
                batch.execution_us.set_result(us)
        return bool(served)
