"""Memory-aware placement against a real Triton node in explicit model-control mode.

The node declares 1000 MB and each model 600 MB, so only one fits at a time: the scheduler
must load on first use, evict the least recently used idle model to make room, and never
unload a model while a batch of it runs. What the user sees is checked twice: the answers,
and Triton's own repository index (which models the node really has loaded).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from shepherd.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from deploy.local.triton import TritonNode
from tests.support.scheduler import (
    TINY_LM,
    SchedulerProcess,
    catalog,
    copy_model,
    infer_request,
    internal_channel,
    loaded_on,
    model_repository,
    start_node,
)

LOAD = scheduler_pb2.PLACEMENT_ACTION_LOAD
UNLOAD = scheduler_pb2.PLACEMENT_ACTION_UNLOAD


@pytest.fixture
def node(tmp_path: Path) -> Iterator[TritonNode]:
    # beta is slow (2 ms a token), so its long request is still running when alpha asks
    # for its room, even on a busy machine.
    repository = model_repository(tmp_path / "repo", ["tiny_a"])
    copy_model(repository, "tiny_b", TINY_LM, {"ignore_eos": "true", "step_delay_ms": "2"})
    started = start_node(tmp_path / "node", repository)  # nothing loaded
    yield started
    started.stop()


@pytest.fixture
def scheduler(tmp_path: Path, node: TritonNode) -> Iterator[SchedulerProcess]:
    data = catalog(
        [node.config.grpc_url],
        {
            "alpha": {"model": "tiny_a", "memory_mb": 600},
            "beta": {"model": "tiny_b", "memory_mb": 600},
        },
        pool={"gpu_memory_mb": 1000, "max_inflight_batches": 2},
    )
    process = SchedulerProcess(tmp_path / "scheduler", data).start()
    yield process
    process.stop()


async def test_loads_on_first_use_evicts_the_idle_lru_model_and_never_a_busy_one(
    node: TritonNode, scheduler: SchedulerProcess
) -> None:
    assert loaded_on(node) == set()
    async with internal_channel(scheduler.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

        # First use: three concurrent requests wait for one load instead of failing.
        first = await asyncio.gather(
            *(stub.Infer(infer_request("alpha", request_id=f"a{i}"), timeout=60) for i in range(3))
        )
        assert {r.completion.placement.backend_model for r in first} == {"tiny_a"}
        assert loaded_on(node) == {"tiny_a"}

        # beta does not fit next to alpha: alpha is idle, so it is evicted.
        await stub.Infer(infer_request("beta", request_id="b0"), timeout=60)
        assert loaded_on(node) == {"tiny_b"}

        # While a long beta request runs, alpha needs beta's room: beta is busy, so alpha
        # waits for it to finish instead of pulling the model out from under it.
        long_beta = asyncio.ensure_future(
            stub.Infer(infer_request("beta", request_id="b-long", max_tokens=256), timeout=60)
        )
        beta_sent_ms = time.time() * 1000
        await asyncio.sleep(0.02)
        alpha = asyncio.ensure_future(
            stub.Infer(infer_request("alpha", request_id="a9"), timeout=60)
        )
        beta_reply = await long_beta
        assert beta_reply.completion.usage.completion_tokens == 256, "the busy model kept running"
        alpha_reply = await alpha
        assert alpha_reply.completion.placement.backend_model == "tiny_a"
        assert loaded_on(node) == {"tiny_a"}

        stats = await stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
    events = [(e.backend_model, e.action) for e in stats.placement_events]
    assert events == [
        ("tiny_a", LOAD),
        ("tiny_a", UNLOAD),
        ("tiny_b", LOAD),
        ("tiny_b", UNLOAD),
        ("tiny_a", LOAD),
    ]
    unload_busy = stats.placement_events[3]
    # Beta started no earlier than it was sent and ran for its GPU time, so it finished no
    # earlier than their sum: an unload before that would have pulled it out from under the
    # request. (The scheduler's clock, not the moment this test got round to reading the
    # reply, which on a busy machine can come seconds after the unload.)
    beta_ran_ms = beta_reply.completion.placement.gpu_us / 1000
    # Its GPU time was read before beta was unloaded (Triton's counters go with the model), so
    # evicted right after it ended, it still has it.
    assert beta_ran_ms > 0, "the answer lost its GPU time to the unload that followed it"
    assert beta_ran_ms > 200, "the long request must outlast the moment alpha asked for its room"
    assert unload_busy.unix_ms >= beta_sent_ms + beta_ran_ms, (
        "beta was unloaded only after it finished"
    )
    assert "LRU" in unload_busy.reason
    [gpu] = stats.nodes
    assert (gpu.memory_total_mb, gpu.memory_used_mb) == (1000, 600)
    assert list(gpu.loaded_models) == ["tiny_a"]
