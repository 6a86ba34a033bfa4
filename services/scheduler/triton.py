"""One batch as one KServe v2 inference on one Triton node, over gRPC.

A batch of N requests becomes one request with N rows, so Triton runs the model once for all
of them. Which node runs it is decided in nodes.py; retrying on another node in dispatch.py.
Triton's tensor contract for chat models is: inputs PROMPT (bytes), MAX_TOKENS (int32),
TEMPERATURE (fp32), SEED (int64); outputs TEXT (bytes), PROMPT_TOKENS and COMPLETION_TOKENS
(int32), FINISH_REASON (bytes); every tensor has shape [batch, 1].

Two kinds of model honour that contract, and `TritonBackend` serves both as events
(services/scheduler/events.py):

* a plain model answers the request once, with each row's whole completion (`infer`);
* a decoupled model (`model_transaction_policy { decoupled: true }`, e.g. tiny_lm_stream)
  streams over `ModelStreamInfer`: one response per decoding step, each carrying every row
  with the text that step added, the cumulative token counts and FINISH_REASON ("" until the
  row is done). Cancelling the gRPC stream cancels the Triton request, and the model stops
  decoding.

A chat model may also answer DOC_IDS [batch, k] (bytes): the documents a retrieval-augmented
model (the rag_tiny ensemble) answered from, returned as Completion.document_ids. An ensemble
(`platform: "ensemble"`) is one call like any model; the batch's span names its steps. A model
whose outputs include EMBEDDING follows the embedding contract instead (services/scheduler/
embeddings.py).

A call to Triton has no span of its own: the batch's span (dispatch.py) carries the node and
the model, and its trace context goes to Triton with every sampled call, so Triton's own spans
(the request, the model, its compute) hang under the batch span. A client span per call would
repeat the batch span's node, model and timing, at a span's CPU cost per batch
(bench/telemetry.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import tritonclient.grpc.aio as triton
from opentelemetry import trace
from shepherd.common.v1 import common_pb2
from tritonclient.utils import InferenceServerException

from libs.catalog import Deployment
from libs.errors import ShepherdError
from libs.tasks import spawn
from libs.telemetry import sampled_trace_headers
from services.scheduler.events import Delta, Event, Failed, Final, usage
from services.scheduler.gputime import ExecutionMeter, Metered, split
from services.scheduler.nodes import Lease
from services.scheduler.queue import PendingRequest

if TYPE_CHECKING:
    from services.scheduler.poolusage import PoolUsage

_log = logging.getLogger(__name__)

# Failures that say "this node cannot serve now", worth trying another node for. A deadline
# is not among them: the node may have run the batch, and a retry could not finish in time.
_NODE_DOWN = {"StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"}
_OUTPUTS = ("TEXT", "PROMPT_TOKENS", "COMPLETION_TOKENS", "FINISH_REASON")
DOC_IDS = "DOC_IDS"  # optional: the documents a RAG model retrieved, per row
EMBEDDING = "EMBEDDING"  # the output that makes a model an embedding model
# The longest a batch's answers wait for its GPU time (normally one statistics read, about a
# millisecond) before they go without it.
ATTRIBUTION_WAIT_S = 2.0
# How long an unload waits for the model's last batches to have their GPU time read.
SETTLE_TIMEOUT_S = 2.0
# How long a stream whose rows all ended is given to send Triton's final response.
DRAIN_S = 5.0
_ROLE_TAGS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}


def render_prompt(messages: Sequence[tuple[str, str]]) -> str:
    """Flatten a conversation into the prompt text the self-hosted chat models expect."""
    turns = [f"{_ROLE_TAGS.get(role, role)}\n{content}" for role, content in messages]
    return "\n".join([*turns, _ROLE_TAGS["assistant"]]) + "\n"


def _inputs(batch: Sequence[PendingRequest]) -> list[triton.InferInput]:
    rows = len(batch)
    prompts = np.array(
        [[render_prompt(item.messages).encode()] for item in batch], dtype=np.object_
    )
    max_tokens = np.array([[item.params.max_tokens] for item in batch], dtype=np.int32)
    temperature = np.array([[item.params.temperature] for item in batch], dtype=np.float32)
    seeds = np.array(
        [[item.params.seed if item.params.HasField("seed") else 0] for item in batch],
        dtype=np.int64,
    )
    tensors = []
    for name, dtype, data in (
        ("PROMPT", "BYTES", prompts),
        ("MAX_TOKENS", "INT32", max_tokens),
        ("TEMPERATURE", "FP32", temperature),
        ("SEED", "INT64", seeds),
    ):
        tensor = triton.InferInput(name, [rows, 1], dtype)
        tensor.set_data_from_numpy(data)
        tensors.append(tensor)
    return tensors


class NodeUnavailable(ShepherdError):
    """The node could not run the batch at all; the batch may be retried on another node."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)


def _node_error(status: str, address: str, message: str) -> ShepherdError:
    """What a failed call to a node means to the dispatcher, from its gRPC status name.

    Unreachable or refusing: NodeUnavailable (another node may serve it). Out of time:
    DEADLINE_EXCEEDED. Anything else is the model's or the node's fault: INTERNAL.
    """
    if status in _NODE_DOWN:
        return NodeUnavailable(message)
    if status == "StatusCode.DEADLINE_EXCEEDED":
        return ShepherdError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"Triton node {address} did not answer within the request's deadline",
        )
    return ShepherdError(grpc.StatusCode.INTERNAL, message)


def _placement(address: str, deployment: Deployment, batch_size: int) -> common_pb2.Placement:
    return common_pb2.Placement(
        deployment=deployment.name,
        kind=common_pb2.BACKEND_KIND_TRITON,
        node=address,
        backend_model=deployment.backend_model,
        batch_size=batch_size,
    )


async def infer(
    client: triton.InferenceServerClient,
    address: str,
    deployment: Deployment,
    batch: Sequence[PendingRequest],
    timeout_s: float,
    *,
    steps: Sequence[str] = (),
    outputs: Sequence[str] = _OUTPUTS,
) -> list[common_pb2.Completion | ShepherdError]:
    """Run the batch as one inference on one node and fan the rows back out.

    `steps` are the composing models when the model is an ensemble (for the trace);
    `outputs` the outputs to ask for (the four, and DOC_IDS where the model has it).
    Raises NodeUnavailable when the node is unreachable or refuses (worth one retry on another
    node), DEADLINE_EXCEEDED when it did not answer in time, INTERNAL for anything else.
    """
    # The batch's span is the call's: Triton's own spans hang under it (see the module).
    span = trace.get_current_span()
    span.set_attribute("shepherd.triton.model", deployment.backend_model)
    if steps:
        span.set_attribute("shepherd.triton.ensemble_steps", list(steps))
    try:
        result = await client.infer(
            deployment.backend_model,
            _inputs(batch),
            outputs=[triton.InferRequestedOutput(name) for name in outputs],
            client_timeout=max(0.001, timeout_s),
            headers=sampled_trace_headers(),
        )
    except InferenceServerException as error:
        status = error.status()
        message = (
            f"Triton node {address} failed model {deployment.backend_model}: {error.message()}"
        )
        raise _node_error(status, address, message) from error
    texts = result.as_numpy("TEXT").reshape(-1)
    prompt_tokens = result.as_numpy("PROMPT_TOKENS").reshape(-1)
    completion_tokens = result.as_numpy("COMPLETION_TOKENS").reshape(-1)
    finish = result.as_numpy("FINISH_REASON").reshape(-1)
    doc_ids = result.as_numpy(DOC_IDS) if DOC_IDS in outputs else None
    placement = _placement(address, deployment, len(batch))
    completions: list[common_pb2.Completion | ShepherdError] = []
    for row in range(len(batch)):
        prompt, completion = int(prompt_tokens[row]), int(completion_tokens[row])
        completions.append(
            common_pb2.Completion(
                text=texts[row].decode(),
                finish_reason=finish[row].decode(),
                usage=common_pb2.Usage(
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    total_tokens=prompt + completion,
                ),
                placement=placement,
                document_ids=[] if doc_ids is None else [d.decode() for d in doc_ids[row]],
            )
        )
    return completions


class _StreamFailed(Exception):
    """The stream broke; `error` is what its unfinished rows are answered with."""

    def __init__(self, error: ShepherdError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(frozen=True)
class GpuTime:
    """A batch's GPU time and each row's share of it, in GPU-microseconds."""

    batch_id: str
    batch_us: int
    rows: list[int]

    def stamp(self, placement: common_pb2.Placement, row: int) -> None:
        placement.gpu_us = self.rows[row]
        placement.batch_gpu_us = self.batch_us
        placement.batch_id = self.batch_id


class TritonBackend:
    """Runs a batch on a leased Triton node and yields each row's events (events.Backend).

    Whether a deployment's model streams is Triton's business, not the catalog's: the model
    config says it (`model_transaction_policy.decoupled`), so it is asked once per node and
    model and remembered. A lookup that fails is not remembered, so a model reloaded with
    another config is asked again after its first failure.

    Every batch's GPU time is measured (services/scheduler/gputime.py): when the batch ends,
    its node slot is given back at once, and the rows' Finals wait for the node's statistics
    to say how long the execution took, which each row's Placement then carries. `usage`,
    when given, hears of every execution (services/scheduler/poolusage.py).
    """

    def __init__(self, usage: PoolUsage | None = None) -> None:
        self._decoupled: dict[tuple[str, str], bool] = {}
        # What else the config says, per (node, model): an ensemble's steps, whether the
        # model answers DOC_IDS, whether it is an embedding model.
        self._steps: dict[tuple[str, str], tuple[str, ...]] = {}
        self._outputs: dict[tuple[str, str], tuple[str, ...]] = {}
        self._embedding: set[tuple[str, str]] = set()
        self._meters: dict[tuple[str, str], ExecutionMeter] = {}
        self._usage = usage
        self._batch_prefix = secrets.token_hex(4)
        self._batch_numbers = itertools.count(1)
        # Streams whose rows all ended, read to their end in the background (`_drain`).
        self._closing: set[asyncio.Task[Any]] = set()

    def metering(self, address: str) -> tuple[int, int]:
        """(statistics reads, batches measured) on one node since start-up, for GetStats."""
        meters = [m for (node, _), m in self._meters.items() if node == address]
        return sum(m.reads for m in meters), sum(m.batches for m in meters)

    async def settle(self, address: str, model: str) -> None:
        """Before `model` is unloaded from the node at `address`: let its meter read the time
        of the batches that just ended, while Triton still has the model's counters (at most
        SETTLE_TIMEOUT_S: an unload is not held up for long by a node that does not answer)."""
        meter = self._meters.get((address, model))
        if meter is not None:
            await meter.settled(SETTLE_TIMEOUT_S)

    async def close(self) -> None:
        """Stop every meter's reads (batches still waiting for their time get 0) and every
        stream still being read to its end."""
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
        for meter in self._meters.values():
            await meter.close()

    def _meter(self, lease: Lease) -> ExecutionMeter:
        key = (lease.address, lease.deployment.backend_model)
        meter = self._meters.get(key)
        if meter is None or meter.client is not lease.node.client:
            # New, or the node was dropped and found again (DNS) with a new client.
            meter = ExecutionMeter(lease.node.client, *key)
            self._meters[key] = meter
        return meter

    async def _start_meter(self, meter: ExecutionMeter, lease: Lease) -> None:
        try:
            await meter.start()
        except InferenceServerException as error:
            raise _node_error(
                error.status(),
                lease.address,
                f"Triton node {lease.address} failed model {meter.model}: {error.message()}",
            ) from error

    def _begin(self, meter: ExecutionMeter, lease: Lease, rows: int) -> Metered:
        """Tell the meter a batch is sent; every execution it hears of reaches `usage`."""
        metered = meter.begin(rows)
        if self._usage is not None:
            usage, deployment = self._usage, lease.deployment

            def executed(future: asyncio.Future[int]) -> None:
                if not future.cancelled():
                    usage.executed(deployment, rows, future.result() * deployment.gpus)

            metered.execution_us.add_done_callback(executed)
        return metered

    def _end(self, meter: ExecutionMeter, lease: Lease, metered: Metered) -> None:
        """The batch is over: its meter reads its time, and the node slot is given back
        before the answers wait for that read."""
        meter.end(metered)
        lease.release(latency_s=(metered.ended or metered.started) - metered.started)

    async def _gpu_time(
        self,
        metered: Metered,
        deployment: Deployment,
        batch: Sequence[PendingRequest],
        tokens: Sequence[int],
    ) -> GpuTime:
        """The batch's GPU time split among its rows by tokens processed (gputime.split).

        Waited for at most ATTRIBUTION_WAIT_S, and never past the moment an answer would
        miss its deadline: an answer is worth more than its GPU figure, which then says 0
        (the pool's figures still count the execution when it is read).
        """
        waiting = [item.deadline for item in batch if not item.events.done]
        limit = ATTRIBUTION_WAIT_S
        if waiting:
            left = min(waiting) - time.monotonic()
            limit = min(limit, max(0.0, left - min(0.05, left / 10)))
        batch_id = f"{self._batch_prefix}-{next(self._batch_numbers)}"
        try:
            execution_us = await asyncio.wait_for(asyncio.shield(metered.execution_us), limit)
        except TimeoutError:
            _log.warning(
                "a batch was answered before its GPU time was known",
                extra={"batch_id": batch_id, "rows": len(batch)},
            )
            execution_us = 0
        total = execution_us * deployment.gpus
        return GpuTime(batch_id, total, split(total, tokens))

    async def run(
        self, lease: Lease, batch: Sequence[PendingRequest]
    ) -> AsyncIterator[tuple[int, Event]]:
        """Yield (row, event) for the rows of `batch`: deltas, then one Final or Failed each.

        Raises before yielding anything when the node cannot run the batch: NodeUnavailable
        (the dispatcher may retry on another node), DEADLINE_EXCEEDED or INTERNAL. A row whose
        caller went away (`events.done`) gets no more events; when none is left the Triton
        stream is cancelled, and so is it when the consumer closes this generator early.
        """
        deployment = lease.deployment
        key = (lease.address, deployment.backend_model)
        deadline = max(item.deadline for item in batch)
        decoupled = self._decoupled.get(key)
        if decoupled is None:
            decoupled = await self._lookup(lease, deadline - time.monotonic())
        meter = self._meter(lease)
        try:
            await self._start_meter(meter, lease)
            if decoupled:
                # aclosing: when our consumer closes us early, the stream is cancelled now,
                # not whenever the inner generator happens to be collected.
                stream = self._stream(lease, batch, deadline - time.monotonic(), meter)
                async with contextlib.aclosing(stream) as events:
                    async for pair in events:
                        yield pair
                return
            metered = self._begin(meter, lease, len(batch))
            try:
                if key in self._embedding:
                    # Imported here: embeddings.py builds on this module's helpers.
                    from services.scheduler.embeddings import embed

                    outcomes = await embed(
                        lease.node.client,
                        lease.address,
                        deployment,
                        batch,
                        deadline - time.monotonic(),
                    )
                else:
                    outcomes = await infer(
                        lease.node.client,
                        lease.address,
                        deployment,
                        batch,
                        deadline - time.monotonic(),
                        steps=self._steps.get(key, ()),
                        outputs=self._outputs.get(key, _OUTPUTS),
                    )
            except BaseException:
                meter.abandon(metered)
                raise
        except ShepherdError:
            self._decoupled.pop(key, None)
            raise
        self._end(meter, lease, metered)
        gpu = await self._gpu_time(
            metered,
            deployment,
            batch,
            [o.usage.total_tokens if isinstance(o, common_pb2.Completion) else 0 for o in outcomes],
        )
        for row, outcome in enumerate(outcomes):
            if batch[row].events.done:
                continue
            if isinstance(outcome, ShepherdError):
                yield row, Failed(outcome)
                continue
            gpu.stamp(outcome.placement, row)
            if outcome.text:
                yield row, Delta(outcome.text, outcome.usage)
            if not batch[row].events.done:
                yield row, Final(outcome)

    async def _lookup(self, lease: Lease, timeout_s: float) -> bool:
        """Ask the node whether the deployment's model is decoupled, and remember it."""
        model = lease.deployment.backend_model
        try:
            config = await lease.node.client.get_model_config(
                model, as_json=True, client_timeout=max(0.001, timeout_s)
            )
        except InferenceServerException as error:
            raise _node_error(
                error.status(),
                lease.address,
                f"Triton node {lease.address} failed model {model}: {error.message()}",
            ) from error
        body = config.get("config", {})
        policy = body.get("model_transaction_policy", {})
        decoupled = bool(policy.get("decoupled", False))
        key = (lease.address, model)
        names = {output.get("name") for output in body.get("output", [])}
        self._outputs[key] = (*_OUTPUTS, DOC_IDS) if DOC_IDS in names else _OUTPUTS
        self._embedding.discard(key)
        if EMBEDDING in names:
            self._embedding.add(key)
        steps = body.get("ensemble_scheduling", {}).get("step", [])
        self._steps[key] = tuple(str(step.get("model_name", "")) for step in steps)
        declared = tuple(step.model for step in lease.deployment.steps)
        if self._steps[key] and self._steps[key] != declared:
            _log.warning(
                "the catalog's steps differ from the ensemble's; placement counts the catalog's",
                extra={"model": model, "catalog": declared, "triton": self._steps[key]},
            )
        self._decoupled[key] = decoupled
        return decoupled

    async def _stream(
        self,
        lease: Lease,
        batch: Sequence[PendingRequest],
        timeout_s: float,
        meter: ExecutionMeter,
    ) -> AsyncGenerator[tuple[int, Event], None]:
        """One ModelStreamInfer call with all rows; each response becomes per-row events.

        Text goes to each row as it is decoded; a row's Final waits for the end of the batch,
        when its share of the execution's GPU time can be known.
        """
        deployment = lease.deployment
        address = lease.address
        # The batch's span (current where the dispatcher first asks for an event) is the
        # call's: Triton's own spans hang under it (see the module).
        span = trace.get_current_span()
        span.set_attribute("shepherd.triton.model", deployment.backend_model)
        headers = sampled_trace_headers()
        request = {
            "model_name": deployment.backend_model,
            "inputs": _inputs(batch),
            "outputs": [triton.InferRequestedOutput(name) for name in _OUTPUTS],
        }

        async def requests() -> AsyncIterator[dict[str, Any]]:
            # One request, then the stream is half-closed: Triton ends it after the final
            # response.
            yield request

        placement = _placement(address, deployment, len(batch))
        rows = len(batch)
        texts: list[list[str]] = [[] for _ in range(rows)]
        used = [common_pb2.Usage() for _ in range(rows)]
        finished = [False] * rows
        done: list[tuple[int, str]] = []  # rows finished, with their reason: Finals to send
        failure: ShepherdError | None = None
        yielded = False
        ran = False  # the stream ran (it did not fail before its first event)
        metered = self._begin(meter, lease, rows)
        responses = lease.node.client.stream_infer(
            requests(), stream_timeout=max(0.001, timeout_s), headers=headers
        )
        try:
            while True:
                waiting = [
                    row for row in range(rows) if not finished[row] and not batch[row].events.done
                ]
                if not waiting:
                    ran = True
                    break
                try:
                    step = await _next_step(
                        responses, address, deployment, rows, [batch[row].future for row in waiting]
                    )
                except _StreamFailed as failed:
                    span.set_status(trace.StatusCode.ERROR, failed.error.message)
                    if not yielded:
                        raise failed.error from failed
                    failure = failed.error
                    ran = True
                    break
                if step is None:
                    span.add_event("stream.dropped")
                    ran = True
                    break
                pieces, prompt_tokens, completion_tokens, finish = step
                for row in range(rows):
                    if finished[row] or batch[row].events.done:
                        continue
                    used[row] = usage(int(prompt_tokens[row]), int(completion_tokens[row]))
                    piece = pieces[row].decode()
                    if piece:
                        texts[row].append(piece)
                        yielded = True
                        yield row, Delta(piece, used[row])
                    reason = finish[row].decode()
                    if reason and not batch[row].events.done:
                        finished[row] = True
                        yielded = True
                        done.append((row, reason))
        finally:
            if all(finished):
                # Every row ended: Triton ends the stream after its final response. Read that
                # off the answer's path rather than cancel the stream: a request cancelled
                # before Triton released it leaves no trace of Triton's spans.
                spawn(self._closing, _drain(responses), f"drain:{address}")
            else:
                # Stops the model's decoding for the rows that remain.
                responses.cancel()
            if ran or yielded:
                self._end(meter, lease, metered)
            else:
                meter.abandon(metered)
        if failure is not None:
            for row in range(rows):
                if not finished[row] and not batch[row].events.done:
                    yield row, Failed(failure, used[row])
        if not done:
            return
        gpu = await self._gpu_time(metered, deployment, batch, [u.total_tokens for u in used])
        for row, reason in done:
            if batch[row].events.done:
                continue
            completion = common_pb2.Completion(
                text="".join(texts[row]),
                finish_reason=reason,
                usage=used[row],
                placement=placement,
            )
            gpu.stamp(completion.placement, row)
            yield row, Final(completion)


async def _next_step(
    responses: Any,
    address: str,
    deployment: Deployment,
    rows: int,
    outcomes: Sequence[asyncio.Future[common_pb2.Completion]],
) -> tuple[np.ndarray, ...] | None:
    """The stream's next response as its four output columns (one entry per row), or None as
    soon as every outcome is done (every caller still waiting went away).

    Raises _StreamFailed when the stream broke, carried an error, ended before every row
    finished, or sent a response that does not hold every row.
    """
    read: asyncio.Future[Any] = asyncio.ensure_future(_read(responses))
    # A read abandoned below (every row dropped, or this task cancelled) must not log an
    # unretrieved error: the stream is being cancelled anyway.
    read.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        while True:
            pending: list[asyncio.Future[Any]] = [o for o in outcomes if not o.done()]
            if not pending:
                return None
            done, _ = await asyncio.wait([read, *pending], return_when=asyncio.FIRST_COMPLETED)
            if read in done:
                break
    finally:
        if not read.done():
            read.cancel()
    prefix = f"Triton node {address} failed model {deployment.backend_model}"
    try:
        item = read.result()
    except grpc.aio.AioRpcError as error:
        raise _StreamFailed(
            _node_error(str(error.code()), address, f"{prefix}: {error.details()}")
        ) from error
    if item is None:
        raise _StreamFailed(
            ShepherdError(
                grpc.StatusCode.INTERNAL, f"{prefix}: the stream ended before every row finished"
            )
        )
    result, failure = item
    if failure is not None:
        raise _StreamFailed(
            ShepherdError(grpc.StatusCode.INTERNAL, f"{prefix}: {failure.message()}")
        )
    columns = [result.as_numpy(name) for name in _OUTPUTS]
    if any(column is None or column.size != rows for column in columns):
        raise _StreamFailed(
            ShepherdError(
                grpc.StatusCode.INTERNAL, f"{prefix}: a streamed response lacks rows or outputs"
            )
        )
    return tuple(column.reshape(-1) for column in columns)


async def _drain(responses: Any) -> None:
    """Read a finished stream to its end (at most DRAIN_S), then release it."""
    try:
        async with asyncio.timeout(DRAIN_S):
            while await _read(responses) is not None:
                pass
    except (TimeoutError, grpc.aio.AioRpcError, InferenceServerException):
        pass  # the answer went long ago; only the stream's end is lost
    finally:
        responses.cancel()


async def _read(responses: Any) -> tuple[Any, Any] | None:
    """The next (result, error) pair of a tritonclient response stream; None at its end."""
    try:
        return await responses.__anext__()
    except StopAsyncIteration:
        return None
