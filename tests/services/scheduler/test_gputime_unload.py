"""A batch's GPU time survives its model being unloaded right after it (real Triton).

Triton's statistics go with the model: read after an unload, they are "not available", so a
batch whose time was not read yet would be answered without it (after waiting for it). The
placer therefore settles the model's meter first (TritonBackend.settle, placement.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException

from deploy.local.triton import TritonNode
from services.scheduler.gputime import ExecutionMeter
from services.scheduler.triton import render_prompt
from tests.support.scheduler import model_repository, start_node


@pytest.fixture
def node(tmp_path: Path) -> Iterator[TritonNode]:
    started = start_node(tmp_path / "node", model_repository(tmp_path / "repo", ["tiny_a"]))
    yield started
    started.stop()


def one_row() -> list[triton.InferInput]:
    tensors = []
    for name, dtype, value in (
        ("PROMPT", "BYTES", np.array([[render_prompt([("user", "hi")]).encode()]], np.object_)),
        ("MAX_TOKENS", "INT32", np.array([[32]], np.int32)),
        ("TEMPERATURE", "FP32", np.array([[0.0]], np.float32)),
        ("SEED", "INT64", np.array([[0]], np.int64)),
    ):
        tensor = triton.InferInput(name, [1, 1], dtype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


async def test_a_settled_meter_has_the_time_of_a_batch_whose_model_is_then_unloaded(
    node: TritonNode,
) -> None:
    client = triton.InferenceServerClient(node.config.grpc_url)
    try:
        await client.load_model("tiny_a")
        meter = ExecutionMeter(client, node.config.grpc_url, "tiny_a")
        await meter.start()
        batch = meter.begin(1)
        await client.infer("tiny_a", one_row(), client_timeout=30)
        execution_us = meter.end(batch)

        await meter.settled(timeout_s=10)

        # Settled: the time is known now, before the unload takes the counters away.
        assert execution_us.done(), "settled() returned before the batch had its time"
        assert execution_us.result() > 0
        await client.unload_model("tiny_a")
        # What the meter would have met had it read now: the model's counters are gone.
        with pytest.raises(InferenceServerException, match="not available"):
            await client.get_inference_statistics("tiny_a", client_timeout=5)
    finally:
        await client.close()
