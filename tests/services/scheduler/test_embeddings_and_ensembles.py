"""Embeddings and the RAG ensemble through a real scheduler and a real Triton node.

Embed: each input is one row of the embedding model's batches, so an Embed of N inputs, and N
Embed calls queued together, are each one Triton execution (read from Triton's statistics).
Ensembles: placement loads an ensemble with its steps (explicit model control), GetStats shows
them, a step an in-flight ensemble uses is never evicted, and a step missing from the model
repository fails the requests at once with UNAVAILABLE naming it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_sync
from shepherd.common.v1 import common_pb2
from shepherd.scheduler.v1 import scheduler_pb2

from deploy.local.triton import DEFAULT_MODEL_REPOSITORY, TritonNode
from services.scheduler.triton import render_prompt
from tests.support.rag import (
    copy_ensemble,
    corpus,
    embed_tiny,
    embedding_tokens,
    first_sentence,
)
from tests.support.scheduler import (
    TINY_LM,
    TINY_LM_STREAM,
    SchedulerProcess,
    catalog,
    copy_model,
    infer_request,
    internal_channel,
    loaded_on,
    start_node,
    stub,
    triton_counts,
)

LOAD = scheduler_pb2.PLACEMENT_ACTION_LOAD
UNLOAD = scheduler_pb2.PLACEMENT_ACTION_UNLOAD
LOAD_FAILED = scheduler_pb2.PLACEMENT_ACTION_LOAD_FAILED
STEP_MEMORY = {"rag_query": 10, "embed_tiny": 100, "vector_search": 100, "rag_prompt": 10}
# tiny_long decodes this slowly per token, so a 256-token answer is still running when beta
# asks for its room, even on a fast machine.
LONG_STEP_MS = 2


def repository(root: Path, *, without: str = "") -> Path:
    """The shipped models (less `without`), plus test copies: tiny_long (tiny_lm decoding
    exactly max_tokens), rag_long (rag_tiny answering with tiny_long), tiny_b (another model
    to make room for) and tiny_slow (a stream of 100 ms steps, to hold a node's only slot)."""
    root.mkdir(parents=True)
    for shipped in DEFAULT_MODEL_REPOSITORY.iterdir():
        if shipped.is_dir() and shipped.name != without:
            (root / shipped.name).symlink_to(shipped, target_is_directory=True)
    copy_model(
        root, "tiny_long", TINY_LM, {"ignore_eos": "true", "step_delay_ms": str(LONG_STEP_MS)}
    )
    copy_model(root, "tiny_b", TINY_LM, {"ignore_eos": "true"})
    copy_model(root, "tiny_slow", TINY_LM_STREAM, {"ignore_eos": "true", "step_delay_ms": "100"})
    copy_ensemble(root, "rag_long", "tiny_long")
    return root


def with_rag(data: dict[str, Any], ensemble: str, generator: str) -> dict[str, Any]:
    """Make the catalog's model `rag` the ensemble, with its steps and their memory."""
    deployment = data["models"]["rag"]["deployments"][0]
    deployment["memory_mb"] = 10
    deployment["steps"] = [
        {"model": name, "memory_mb": memory}
        for name, memory in [*STEP_MEMORY.items(), (generator, 400)]
    ]
    assert deployment["model"] == ensemble
    return data


def rag_request(request_id: str, question: str, max_tokens: int = 8) -> scheduler_pb2.InferRequest:
    return scheduler_pb2.InferRequest(
        request_id=request_id,
        tenant="t",
        model="rag",
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=question)],
        params=common_pb2.GenerationParams(max_tokens=max_tokens),
    )


async def wait_for(condition: Any, what: str, timeout_s: float = 60.0) -> Any:
    """Poll an async condition until it returns something true (generous, for busy machines)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# -- ensembles ------------------------------------------------------------------------------


@pytest.fixture
def node(tmp_path: Path) -> Iterator[TritonNode]:
    started = start_node(tmp_path / "node", repository(tmp_path / "repo"))  # nothing loaded
    yield started
    started.stop()


async def test_an_ensemble_loads_with_its_steps_and_none_is_evicted_while_it_runs(
    tmp_path: Path, node: TritonNode
) -> None:
    """rag (630 MB with its steps) and beta (600 MB) do not fit together in 1000 MB."""
    data = with_rag(
        catalog(
            [node.config.grpc_url],
            {
                "rag": {"model": "rag_long"},
                "beta": {"model": "tiny_b", "memory_mb": 600},
            },
            pool={"gpu_memory_mb": 1000, "max_inflight_batches": 2},
        ),
        "rag_long",
        "tiny_long",
    )
    scheduler = SchedulerProcess(tmp_path / "scheduler", data).start()
    doc_id, _, text = corpus()[17]
    try:
        async with internal_channel(scheduler.address) as channel:
            scheduler_stub = stub(channel)
            first = await scheduler_stub.Infer(rag_request("r0", first_sentence(text)), timeout=60)
            assert loaded_on(node) == {"rag_long", "rag_query", *STEP_MEMORY, "tiny_long"}
            assert first.completion.document_ids[0] == doc_id
            assert len(first.completion.document_ids) == 3
            assert first.completion.placement.backend_model == "rag_long"
            stats = await scheduler_stub.GetStats(
                scheduler_pb2.GetStatsRequest(model="rag"), timeout=5
            )
            assert list(stats.models[0].composing_models) == [
                "rag_query",
                "embed_tiny",
                "vector_search",
                "rag_prompt",
                "tiny_long",
            ]
            [gpu] = stats.nodes
            assert set(gpu.loaded_models) == loaded_on(node)
            assert gpu.memory_used_mb == 630
            loads = [(e.backend_model, e.action, e.reason) for e in stats.placement_events]
            assert loads[0] == ("rag_long", LOAD, "first use")
            assert {(m, a) for m, a, _ in loads[1:]} == {
                (step, LOAD) for step in stats.models[0].composing_models
            }
            assert all(r == "a step of ensemble rag_long" for _, _, r in loads[1:])

            # A long answer runs on the ensemble; beta needs the room its steps hold.
            rag_sent_ms = time.time() * 1000
            long_rag = asyncio.ensure_future(
                scheduler_stub.Infer(rag_request("r-long", "rivers", max_tokens=256), timeout=60)
            )

            async def running() -> bool:
                now = await scheduler_stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
                return now.nodes[0].inflight_batches == 1

            await wait_for(running, "the long RAG batch to run")
            beta = asyncio.ensure_future(
                scheduler_stub.Infer(infer_request("beta", request_id="b0"), timeout=60)
            )
            rag_reply = await long_rag
            assert rag_reply.completion.usage.completion_tokens == 256, "the ensemble kept running"
            assert (await beta).completion.placement.backend_model == "tiny_b"
            stats = await scheduler_stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
    finally:
        scheduler.stop()
    unloads = [e for e in stats.placement_events if e.action == UNLOAD]
    assert unloads, "beta's load made room"
    assert unloads[0].backend_model == "rag_long", "the ensemble goes before any of its steps"
    # 256 decoding steps of LONG_STEP_MS each: the long answer cannot have finished before
    # (the scheduler's clock; when this test read the reply says nothing on a busy machine).
    rag_done_at_least_ms = rag_sent_ms + 256 * LONG_STEP_MS
    assert all(e.unix_ms >= rag_done_at_least_ms for e in unloads), "nothing unloaded while it ran"
    assert "tiny_b" in loaded_on(node) and "rag_long" not in loaded_on(node)
    assert set(stats.nodes[0].loaded_models) == loaded_on(node)


async def test_a_step_missing_from_the_repository_is_unavailable_naming_it(
    tmp_path: Path,
) -> None:
    repo = repository(tmp_path / "repo", without="vector_search")
    bare = start_node(tmp_path / "node", repo)
    data = with_rag(
        catalog([bare.config.grpc_url], {"rag": {"model": "rag_tiny"}}), "rag_tiny", "tiny_lm"
    )
    scheduler = SchedulerProcess(tmp_path / "scheduler", data).start()
    try:
        async with internal_channel(scheduler.address) as channel:
            scheduler_stub = stub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await scheduler_stub.Infer(rag_request("r0", "rivers"), timeout=60)
            stats = await scheduler_stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
        triton_ready = loaded_on(bare)
    finally:
        scheduler.stop()
        bare.stop()
    # At once, not at the deadline: every node refused the load, naming the missing step.
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "vector_search" in (failure.value.details() or "")
    assert "rag_tiny" in (failure.value.details() or "")
    failed = [e for e in stats.placement_events if e.action == LOAD_FAILED]
    assert [e.backend_model for e in failed] == ["rag_tiny"]
    assert "vector_search" in failed[0].reason
    # The steps Triton loaded before it failed the ensemble are accounted for, not leaked.
    assert "rag_tiny" not in triton_ready
    assert set(stats.nodes[0].loaded_models) == triton_ready


# -- embeddings -----------------------------------------------------------------------------


@pytest.fixture
def embed_scheduler(tmp_path: Path) -> Iterator[tuple[TritonNode, SchedulerProcess]]:
    """One node with one batch slot, serving embed_tiny and the slow stream that can hold it."""
    started = start_node(
        tmp_path / "node", repository(tmp_path / "repo"), load=["embed_tiny", "tiny_slow"]
    )
    data = catalog(
        [started.config.grpc_url],
        {
            "embed": {
                "model": "embed_tiny",
                "batching": {
                    "max_batch_size": 64,
                    "max_queue_delay_ms": 5,
                    "preferred_batch_sizes": [16, 32, 64],
                },
            },
            "blocker": {"model": "tiny_slow"},
        },
        pool={"max_inflight_batches": 1},
    )
    data["models"]["embed"]["task"] = "embedding"
    data["models"]["embed"]["price"] = {
        "input_usd_per_million": "0.01",
        "output_usd_per_million": "0",
    }
    scheduler = SchedulerProcess(tmp_path / "scheduler", data).start()
    yield started, scheduler
    scheduler.stop()
    started.stop()


def embed_request(request_id: str, inputs: list[str]) -> scheduler_pb2.EmbedRequest:
    return scheduler_pb2.EmbedRequest(
        request_id=request_id, tenant="t", model="embed", inputs=inputs
    )


async def test_an_embed_of_many_inputs_is_one_execution_of_as_many_rows(
    embed_scheduler: tuple[TritonNode, SchedulerProcess],
) -> None:
    node, scheduler = embed_scheduler
    inputs = [f"the {i}th document about rivers, towns and bells" for i in range(20)]
    client = triton_sync.InferenceServerClient(node.config.grpc_url)
    before = triton_counts(client, "embed_tiny")
    async with internal_channel(scheduler.address) as channel:
        reply = await stub(channel).Embed(embed_request("e0", inputs), timeout=60)
    after = triton_counts(client, "embed_tiny")
    client.close()
    completion = reply.completion
    assert (after.executions - before.executions, after.inferences - before.inferences) == (1, 20)
    assert completion.placement.batch_size == 20
    assert completion.usage.prompt_tokens == sum(embedding_tokens(t) for t in inputs)
    assert completion.usage.completion_tokens == 0
    vectors = np.array([e.values for e in completion.embeddings], dtype=np.float32)
    expected, _ = embed_tiny.TinyEncoder().encode(inputs)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)  # in input order
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


async def test_concurrent_embed_calls_queued_together_run_as_one_execution(
    embed_scheduler: tuple[TritonNode, SchedulerProcess],
) -> None:
    node, scheduler = embed_scheduler
    client = triton_sync.InferenceServerClient(node.config.grpc_url)
    before = triton_counts(client, "embed_tiny")
    count = 12
    async with internal_channel(scheduler.address) as channel:
        scheduler_stub = stub(channel)
        # The node's only batch slot is taken by a slow stream...
        blocker = scheduler_stub.InferStream(
            scheduler_pb2.InferStreamRequest(
                request_id="block",
                tenant="t",
                model="blocker",
                messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="wait")],
                params=common_pb2.GenerationParams(max_tokens=256),
            ),
            timeout=120,
        )
        await blocker.read()  # its first step: it holds the slot
        # ...so the Embed calls queue while it runs.
        calls = [
            asyncio.ensure_future(
                scheduler_stub.Embed(embed_request(f"e{i}", [f"query number {i}"]), timeout=120)
            )
            for i in range(count)
        ]

        async def queued() -> bool:
            stats = await scheduler_stub.GetStats(
                scheduler_pb2.GetStatsRequest(model="embed"), timeout=5
            )
            return stats.models[0].queue_depth == count

        await wait_for(queued, f"{count} queued embed inputs")
        blocker.cancel()  # the slot frees: every queued input goes in one batch
        replies = await asyncio.gather(*calls)
    after = triton_counts(client, "embed_tiny")
    client.close()
    assert (after.executions - before.executions, after.inferences - before.inferences) == (
        1,
        count,
    )
    assert [r.completion.placement.batch_size for r in replies] == [count] * count
    for i, reply in enumerate(replies):
        [vector] = reply.completion.embeddings
        expected, [tokens] = embed_tiny.TinyEncoder().encode([f"query number {i}"])
        np.testing.assert_allclose(vector.values, expected[0], atol=1e-5)
        assert reply.completion.usage.prompt_tokens == tokens


async def test_embed_validates_its_inputs_and_model(
    embed_scheduler: tuple[TritonNode, SchedulerProcess],
) -> None:
    _, scheduler = embed_scheduler
    async with internal_channel(scheduler.address) as channel:
        scheduler_stub = stub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await scheduler_stub.Embed(embed_request("bad", ["fine", "  "]), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as chat_model:
            await scheduler_stub.Embed(
                scheduler_pb2.EmbedRequest(
                    request_id="x", tenant="t", model="blocker", inputs=["a"]
                ),
                timeout=10,
            )
        with pytest.raises(grpc.aio.AioRpcError) as infer_on_embed:
            await scheduler_stub.Infer(infer_request("embed", request_id="y"), timeout=10)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[1]" in (empty.value.details() or "")
    assert chat_model.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not answer Embed" in (chat_model.value.details() or "")
    assert infer_on_embed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "embedding model" in (infer_on_embed.value.details() or "")


def test_render_prompt_is_what_the_ensemble_reads() -> None:
    """rag_query cuts the last user turn out of the prompt the scheduler renders."""
    from tests.support.rag import rag_query

    prompt = render_prompt([("system", "s"), ("user", "first"), ("assistant", "a"), ("user", "q?")])
    assert rag_query.last_user_turn(prompt) == "q?"
