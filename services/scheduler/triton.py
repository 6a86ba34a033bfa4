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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as triton
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from shepherd.common.v1 import common_pb2
from tritonclient.utils import InferenceServerException

from libs.catalog import Deployment
from libs.errors import ShepherdError
from libs.telemetry import sampled_trace_headers
from services.scheduler.events import Delta, Event, Failed, Final, usage
from services.scheduler.nodes import Lease
from services.scheduler.queue import PendingRequest

_log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

# Failures that say "this node cannot serve now", worth trying another node for. A deadline
# is not among them: the node may have run the batch, and a retry could not finish in time.
_NODE_DOWN = {"StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"}
_OUTPUTS = ("TEXT", "PROMPT_TOKENS", "COMPLETION_TOKENS", "FINISH_REASON")
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
) -> list[common_pb2.Completion | ShepherdError]:
    """Run the batch as one inference on one node and fan the rows back out.

    Raises NodeUnavailable when the node is unreachable or refuses (worth one retry on another
    node), DEADLINE_EXCEEDED when it did not answer in time, INTERNAL for anything else.
    """
    with _tracer.start_as_current_span("triton.infer", kind=SpanKind.CLIENT) as span:
        span.set_attribute("shepherd.triton.node", address)
        span.set_attribute("shepherd.triton.model", deployment.backend_model)
        span.set_attribute("shepherd.batch.size", len(batch))
        headers = sampled_trace_headers()
        try:
            result = await client.infer(
                deployment.backend_model,
                _inputs(batch),
                outputs=[triton.InferRequestedOutput(name) for name in _OUTPUTS],
                client_timeout=max(0.001, timeout_s),
                headers=headers,
            )
        except InferenceServerException as error:
            status = error.status()
            message = (
                f"Triton node {address} failed model {deployment.backend_model}: {error.message()}"
            )
            span.set_status(trace.StatusCode.ERROR, message)
            raise _node_error(status, address, message) from error
    texts = result.as_numpy("TEXT").reshape(-1)
    prompt_tokens = result.as_numpy("PROMPT_TOKENS").reshape(-1)
    completion_tokens = result.as_numpy("COMPLETION_TOKENS").reshape(-1)
    finish = result.as_numpy("FINISH_REASON").reshape(-1)
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
            )
        )
    return completions


class _StreamFailed(Exception):
    """The stream broke; `error` is what its unfinished rows are answered with."""

    def __init__(self, error: ShepherdError) -> None:
        super().__init__(error.message)
        self.error = error


class TritonBackend:
    """Runs a batch on a leased Triton node and yields each row's events (events.Backend).

    Whether a deployment's model streams is Triton's business, not the catalog's: the model
    config says it (`model_transaction_policy.decoupled`), so it is asked once per node and
    model and remembered. A lookup that fails is not remembered, so a model reloaded with
    another config is asked again after its first failure.
    """

    def __init__(self) -> None:
        self._decoupled: dict[tuple[str, str], bool] = {}

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
        try:
            if decoupled:
                # aclosing: when our consumer closes us early, the stream is cancelled now,
                # not whenever the inner generator happens to be collected.
                stream = self._stream(lease, batch, deadline - time.monotonic())
                async with contextlib.aclosing(stream) as events:
                    async for pair in events:
                        yield pair
                return
            outcomes = await infer(
                lease.node.client, lease.address, deployment, batch, deadline - time.monotonic()
            )
        except ShepherdError:
            self._decoupled.pop(key, None)
            raise
        for row, outcome in enumerate(outcomes):
            if batch[row].events.done:
                continue
            if isinstance(outcome, ShepherdError):
                yield row, Failed(outcome)
                continue
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
        policy = config.get("config", {}).get("model_transaction_policy", {})
        decoupled = bool(policy.get("decoupled", False))
        self._decoupled[(lease.address, model)] = decoupled
        return decoupled

    async def _stream(
        self, lease: Lease, batch: Sequence[PendingRequest], timeout_s: float
    ) -> AsyncGenerator[tuple[int, Event], None]:
        """One ModelStreamInfer call with all rows; each response becomes per-row events."""
        deployment = lease.deployment
        address = lease.address
        span = _tracer.start_span(
            "triton.stream",
            kind=SpanKind.CLIENT,
            attributes={
                "shepherd.triton.node": address,
                "shepherd.triton.model": deployment.backend_model,
                "shepherd.batch.size": len(batch),
            },
        )
        # Not made current: this generator is suspended at every yield, and a context
        # attached here would leak into the consumer's code between events.
        headers = sampled_trace_headers(trace.set_span_in_context(span))
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
        yielded = False
        responses = lease.node.client.stream_infer(
            requests(), stream_timeout=max(0.001, timeout_s), headers=headers
        )
        try:
            while True:
                waiting = [
                    row for row in range(rows) if not finished[row] and not batch[row].events.done
                ]
                if not waiting:
                    return
                try:
                    step = await _next_step(
                        responses, address, deployment, rows, [batch[row].future for row in waiting]
                    )
                except _StreamFailed as failure:
                    span.set_status(trace.StatusCode.ERROR, failure.error.message)
                    if not yielded:
                        raise failure.error from failure
                    for row in range(rows):
                        if not finished[row] and not batch[row].events.done:
                            yield row, Failed(failure.error, used[row])
                    return
                if step is None:
                    span.add_event("stream.dropped")
                    return
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
                        yield (
                            row,
                            Final(
                                common_pb2.Completion(
                                    text="".join(texts[row]),
                                    finish_reason=reason,
                                    usage=used[row],
                                    placement=placement,
                                )
                            ),
                        )
        finally:
            # Stops the model's decoding when rows remain (a no-op once the stream ended).
            responses.cancel()
            span.end()


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


async def _read(responses: Any) -> tuple[Any, Any] | None:
    """The next (result, error) pair of a tritonclient response stream; None at its end."""
    try:
        return await responses.__anext__()
    except StopAsyncIteration:
        return None
