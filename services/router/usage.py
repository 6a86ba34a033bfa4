"""Usage records to billing in groups: the router's side of RecordUsageBatch.

Why: every answer's usage used to be one RecordUsage call, and a gRPC call costs the router
and billing more CPU than the work it carries (docs/BENCHMARKS.md, gateway overhead). This is
group commit, as databases do it for their logs: at most `max_inflight` calls are in flight;
a record that arrives while they are busy waits for the next call, together with every other
record that arrived meanwhile. An idle router therefore sends a lone record at once (no added
latency), and a busy one sends one call per group instead of one per answer.

Each caller still waits for its own record's outcome, and an answer is returned only once its
usage is billed, exactly as with RecordUsage: a record that billing refuses fails alone, and a
failed call fails every record it carried with the call's status, for the caller to retry
(billing is idempotent on tenant and request id, so a retry never bills twice).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from shepherd.billing.v1 import billing_pb2, billing_pb2_grpc

from libs.errors import ShepherdError, from_rpc_error, status_code

_log = logging.getLogger(__name__)


@dataclass
class _Pending:
    record: billing_pb2.RecordUsageRequest
    deadline: float  # loop time by which the caller gives up on this attempt
    outcome: asyncio.Future[billing_pb2.RecordUsageResponse]


class UsageRecorder:
    """Bills usage records through RecordUsageBatch, grouped while calls are in flight."""

    def __init__(
        self,
        billing: billing_pb2_grpc.BillingServiceStub,
        *,
        max_batch: int = 256,
        max_inflight: int = 2,
    ) -> None:
        self._billing = billing
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._queue: list[_Pending] = []
        self._inflight: set[asyncio.Task[None]] = set()

    async def record(
        self, record: billing_pb2.RecordUsageRequest, timeout_s: float
    ) -> billing_pb2.RecordUsageResponse:
        """Bill one record; raises ShepherdError with the status billing (or the call) gave."""
        loop = asyncio.get_running_loop()
        pending = _Pending(record, loop.time() + timeout_s, loop.create_future())
        self._queue.append(pending)
        self._pump()
        return await pending.outcome

    async def close(self) -> None:
        """Wait for the calls in flight (their callers are waiting for them too)."""
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    def _pump(self) -> None:
        """Start calls while there is work and room for another call in flight."""
        while self._queue and len(self._inflight) < self._max_inflight:
            # Records whose caller stopped waiting go too: the usage happened all the same.
            group = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            task = asyncio.create_task(self._send(group))
            self._inflight.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("usage group failed unexpectedly", exc_info=task.exception())
        self._pump()

    async def _send(self, group: list[_Pending]) -> None:
        """One RecordUsageBatch call for `group`; every record's outcome is settled after it."""
        loop = asyncio.get_running_loop()
        timeout = max(0.0, min(p.deadline for p in group) - loop.time())
        try:
            response = await self._billing.RecordUsageBatch(
                billing_pb2.RecordUsageBatchRequest(records=[p.record for p in group]),
                timeout=timeout,
            )
        except grpc.aio.AioRpcError as error:
            failure = from_rpc_error(error, "billing")
            for pending in group:
                _settle(pending, failure)
            return
        except BaseException as error:
            for pending in group:
                _settle(
                    pending,
                    ShepherdError(grpc.StatusCode.UNAVAILABLE, f"billing call failed: {error!r}"),
                )
            raise
        if len(response.outcomes) != len(group):
            mismatch = ShepherdError(
                grpc.StatusCode.UNAVAILABLE,
                f"billing answered {len(response.outcomes)} outcomes for {len(group)} records",
            )
            for pending in group:
                _settle(pending, mismatch)
            return
        for pending, outcome in zip(group, response.outcomes, strict=True):
            if outcome.HasField("recorded"):
                _settle(pending, outcome.recorded)
            else:
                code = status_code(outcome.failure.code)
                _settle(pending, ShepherdError(code, outcome.failure.message))


def _settle(pending: _Pending, result: billing_pb2.RecordUsageResponse | ShepherdError) -> None:
    if pending.outcome.done():
        return  # the caller went away
    if isinstance(result, ShepherdError):
        pending.outcome.set_exception(result)
    else:
        pending.outcome.set_result(result)
