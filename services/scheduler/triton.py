"""Dispatch of a batch to a pool of Triton nodes as one KServe v2 inference over gRPC.

A batch of N requests becomes one `infer` call with N rows, so Triton runs the model once for
all of them. The node with the fewest batches in flight is tried first; a node that refuses
the connection or is unavailable is skipped and the next one is tried, so one dead node does
not fail the batch. Triton's tensor contract for chat models is: inputs PROMPT (bytes),
MAX_TOKENS (int32), TEMPERATURE (fp32), SEED (int64); outputs TEXT (bytes), PROMPT_TOKENS and
COMPLETION_TOKENS (int32), FINISH_REASON (bytes); every tensor has shape [batch, 1].
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import tritonclient.grpc.aio as triton
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind
from shepherd.common.v1 import common_pb2
from tritonclient.utils import InferenceServerException

from libs.catalog import Deployment
from libs.errors import ShepherdError
from services.scheduler.batcher import PendingRequest

_log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

# Failures that say "this node cannot serve now", worth trying another node for.
_NODE_DOWN = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED"}
_OUTPUTS = ("TEXT", "PROMPT_TOKENS", "COMPLETION_TOKENS", "FINISH_REASON")
_ROLE_TAGS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}


def render_prompt(messages: Sequence[tuple[str, str]]) -> str:
    """Flatten a conversation into the prompt text the self-hosted chat models expect."""
    turns = [f"{_ROLE_TAGS.get(role, role)}\n{content}" for role, content in messages]
    return "\n".join([*turns, _ROLE_TAGS["assistant"]]) + "\n"


@dataclass
class TritonNode:
    """One Triton server and its client, created at start-up, with in-flight accounting."""

    address: str
    client: triton.InferenceServerClient
    inflight: int = 0


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


class TritonBackend:
    """Runs batches on the Triton nodes of each pool."""

    def __init__(self, pools: Mapping[str, Sequence[TritonNode]], timeout_s: float) -> None:
        self._pools = pools
        self._timeout_s = timeout_s

    @classmethod
    def connect(cls, pools: Mapping[str, Sequence[str]], timeout_s: float) -> TritonBackend:
        """Create one client per node address; connections open lazily on first use."""
        return cls(
            {
                name: [
                    TritonNode(address=address, client=triton.InferenceServerClient(url=address))
                    for address in addresses
                ]
                for name, addresses in pools.items()
            },
            timeout_s,
        )

    async def close(self) -> None:
        for nodes in self._pools.values():
            for node in nodes:
                await node.client.close()

    async def run(
        self, deployment: Deployment, batch: Sequence[PendingRequest]
    ) -> list[common_pb2.Completion | ShepherdError]:
        """Run the batch on the least busy node, falling over to the next on a dead node."""
        nodes = sorted(self._pools[deployment.pool], key=lambda node: node.inflight)
        remaining = max(item.deadline for item in batch) - time.monotonic()
        timeout_s = max(0.001, min(self._timeout_s, remaining))
        failures = []
        for node in nodes:
            try:
                return await self._infer(node, deployment, batch, timeout_s)
            except InferenceServerException as error:
                if error.status() not in _NODE_DOWN:
                    raise ShepherdError(
                        grpc.StatusCode.INTERNAL,
                        f"Triton node {node.address} failed model {deployment.backend_model}: "
                        f"{error.message()}",
                    ) from error
                _log.warning(
                    "triton node unavailable",
                    extra={"node": node.address, "error": error.message()},
                )
                failures.append(f"{node.address} ({error.message()})")
        raise ShepherdError(
            grpc.StatusCode.UNAVAILABLE,
            f"no Triton node of pool {deployment.pool!r} could serve {deployment.backend_model}: "
            + "; ".join(failures),
        )

    async def _infer(
        self,
        node: TritonNode,
        deployment: Deployment,
        batch: Sequence[PendingRequest],
        timeout_s: float,
    ) -> list[common_pb2.Completion | ShepherdError]:
        with _tracer.start_as_current_span("triton.infer", kind=SpanKind.CLIENT) as span:
            span.set_attribute("shepherd.triton.node", node.address)
            span.set_attribute("shepherd.triton.model", deployment.backend_model)
            span.set_attribute("shepherd.batch.size", len(batch))
            headers: dict[str, str] = {}
            propagate.inject(headers)
            node.inflight += 1
            try:
                result = await node.client.infer(
                    deployment.backend_model,
                    _inputs(batch),
                    outputs=[triton.InferRequestedOutput(name) for name in _OUTPUTS],
                    client_timeout=timeout_s,
                    headers=headers,
                )
            finally:
                node.inflight -= 1
        texts = result.as_numpy("TEXT").reshape(-1)
        prompt_tokens = result.as_numpy("PROMPT_TOKENS").reshape(-1)
        completion_tokens = result.as_numpy("COMPLETION_TOKENS").reshape(-1)
        finish = result.as_numpy("FINISH_REASON").reshape(-1)
        placement = common_pb2.Placement(
            deployment=deployment.name,
            kind=common_pb2.BACKEND_KIND_TRITON,
            node=node.address,
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
