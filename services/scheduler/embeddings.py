"""One batch of embedding inputs as one KServe v2 inference on one Triton node.

An embedding model's tensor contract (embed_tiny's, and any model that replaces it): input
TEXT (bytes) [batch, 1]; outputs EMBEDDING (fp32) [batch, dimensions], the input's vector,
and TOKENS (int32) [batch, 1], the tokens the model counted, which Shepherd bills at the
model's input price. The backend recognises the contract by the model config (an output
named EMBEDDING), as it recognises a decoupled model (services/scheduler/triton.py).

Each input of an Embed request is one request in the model's queue and one row here, so the
inputs of many callers are encoded together (servicer.py fans an Embed out and gathers it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tritonclient.grpc.aio as triton
from opentelemetry import trace
from shepherd.common.v1 import common_pb2
from tritonclient.utils import InferenceServerException

from libs.catalog import Deployment
from libs.errors import ShepherdError
from libs.telemetry import sampled_trace_headers
from services.scheduler.queue import PendingRequest
from services.scheduler.triton import EMBEDDING, _node_error, _placement

TOKENS = "TOKENS"


def embedding_input(item: PendingRequest) -> str:
    """The text one queued embedding request carries (its single user message)."""
    return item.messages[0][1]


async def embed(
    client: triton.InferenceServerClient,
    address: str,
    deployment: Deployment,
    batch: Sequence[PendingRequest],
    timeout_s: float,
) -> list[common_pb2.Completion | ShepherdError]:
    """Encode the batch's inputs in one inference; one Completion (one vector) per row.

    Fails like a chat model's call (triton.infer): NodeUnavailable when the node cannot take
    the batch (worth one retry elsewhere), DEADLINE_EXCEEDED when it did not answer in time,
    INTERNAL otherwise.
    """
    texts = np.array([[embedding_input(item).encode()] for item in batch], dtype=np.object_)
    tensor = triton.InferInput("TEXT", [len(batch), 1], "BYTES")
    tensor.set_data_from_numpy(texts)
    # The batch's span is the call's, as for chat models (services/scheduler/triton.py).
    span = trace.get_current_span()
    span.set_attribute("shepherd.triton.model", deployment.backend_model)
    span.set_attribute("shepherd.triton.task", "embedding")
    try:
        result = await client.infer(
            deployment.backend_model,
            [tensor],
            outputs=[triton.InferRequestedOutput(name) for name in (EMBEDDING, TOKENS)],
            client_timeout=max(0.001, timeout_s),
            headers=sampled_trace_headers(),
        )
    except InferenceServerException as error:
        message = (
            f"Triton node {address} failed model {deployment.backend_model}: {error.message()}"
        )
        raise _node_error(error.status(), address, message) from error
    vectors = result.as_numpy(EMBEDDING).reshape(len(batch), -1)
    tokens = result.as_numpy(TOKENS).reshape(-1)
    placement = _placement(address, deployment, len(batch))
    return [
        common_pb2.Completion(
            finish_reason="stop",
            usage=common_pb2.Usage(prompt_tokens=int(count), total_tokens=int(count)),
            placement=placement,
            embeddings=[common_pb2.Embedding(values=vector.tolist())],
        )
        for vector, count in zip(vectors, tokens, strict=True)
    ]
