"""One batch as one KServe v2 inference on one Triton node, over gRPC.

A batch of N requests becomes one `infer` call with N rows, so Triton runs the model once for
all of them. Which node runs it is decided in nodes.py; retrying on another node in
dispatch.py. Triton's tensor contract for chat models is: inputs PROMPT (bytes),
MAX_TOKENS (int32), TEMPERATURE (fp32), SEED (int64); outputs TEXT (bytes), PROMPT_TOKENS and
COMPLETION_TOKENS (int32), FINISH_REASON (bytes); every tensor has shape [batch, 1].
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
import numpy as np
import tritonclient.grpc.aio as triton
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind
from shepherd.common.v1 import common_pb2
from tritonclient.utils import InferenceServerException

from libs.catalog import Deployment
from libs.errors import ShepherdError
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
        headers: dict[str, str] = {}
        propagate.inject(headers)
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
            if status in _NODE_DOWN:
                raise NodeUnavailable(message) from error
            if status == "StatusCode.DEADLINE_EXCEEDED":
                raise ShepherdError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"Triton node {address} did not answer within the request's deadline",
                ) from error
            raise ShepherdError(grpc.StatusCode.INTERNAL, message) from error
    texts = result.as_numpy("TEXT").reshape(-1)
    prompt_tokens = result.as_numpy("PROMPT_TOKENS").reshape(-1)
    completion_tokens = result.as_numpy("COMPLETION_TOKENS").reshape(-1)
    finish = result.as_numpy("FINISH_REASON").reshape(-1)
    placement = common_pb2.Placement(
        deployment=deployment.name,
        kind=common_pb2.BACKEND_KIND_TRITON,
        node=address,
        backend_model=deployment.backend_model,
        batch_size=len(batch),
    )
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
