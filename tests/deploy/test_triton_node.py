"""End-to-end tests of the local Triton launcher and the tiny_lm models on a real tritonserver.

Why: the mesh trusts this node for batching, token counts and determinism; these tests start
the real binary from the nvidia-pytriton wheel on free ports and check each promise through
the same tritonclient gRPC API the services use. tiny_lm_stream (the decoupled twin of
tiny_lm) must stream what tiny_lm answers, step by step, and stop decoding when its client
cancels.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.utils import InferenceServerException

from deploy.local.triton import (
    DEFAULT_MODEL_REPOSITORY,
    TritonNode,
    TritonNodeConfig,
    TritonStartError,
    process_group_members,
)
from services.scheduler.triton import render_prompt
from tests.support.scheduler import start_node, streaming_model_repository
from tests.support.tiny_lm import tiny_lm_tokenize

MODEL = "tiny_lm"
# The gateway benchmark's model: tiny_lm's interface, echoing the prompt.
ECHO_MODEL = "echo_lm"
STREAM_MODEL = "tiny_lm_stream"
# tiny_lm_stream with ignore_eos: every row streams exactly its MAX_TOKENS, a long stream.
LONG_STREAM_MODEL = "tiny_lm_stream_long"
OUTPUTS = ("TEXT", "PROMPT_TOKENS", "COMPLETION_TOKENS", "FINISH_REASON")
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Row:
    """One decoded output row."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def _pids_with_cmdline_containing(needle: str) -> list[int]:
    """Live processes whose command line mentions needle (our work dirs are unique)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle in cmdline and state not in {"Z", "X"}:
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonNode]:
    """One real node for the module; stopping it must leave no processes behind."""
    work_dir = tmp_path_factory.mktemp("triton-node")
    triton = TritonNode(TritonNodeConfig.with_free_ports(work_dir=work_dir)).start()
    try:
        waited = triton.wait_ready(timeout_s=120)
        print(f"triton ready after {waited:.2f}s")
        yield triton
    finally:
        pgid = triton.pgid
        triton.stop()
        assert pgid is not None and process_group_members(pgid) == []


def _inputs(
    prompts: list[str],
    max_tokens: int | list[int],
    temperature: float | None,
    seed: int | None,
) -> list[grpcclient_aio.InferInput]:
    """All prompts as one request: one row each along the batch dimension."""
    rows = len(prompts)
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * rows
    arrays: dict[str, tuple[np.ndarray, str]] = {
        "PROMPT": (np.array([[p.encode()] for p in prompts], dtype=np.object_), "BYTES"),
        "MAX_TOKENS": (np.array([[m] for m in limits], dtype=np.int32), "INT32"),
    }
    if temperature is not None:
        arrays["TEMPERATURE"] = (np.full((rows, 1), temperature, dtype=np.float32), "FP32")
    if seed is not None:
        arrays["SEED"] = (np.full((rows, 1), seed, dtype=np.int64), "INT64")
    inputs = []
    for name, (value, dtype) in arrays.items():
        tensor = grpcclient_aio.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def _rows(result: Any) -> list[Row]:
    """The rows of one response, in request order."""
    text = result.as_numpy("TEXT").reshape(-1)
    prompt_tokens = result.as_numpy("PROMPT_TOKENS").reshape(-1)
    completion_tokens = result.as_numpy("COMPLETION_TOKENS").reshape(-1)
    finish = result.as_numpy("FINISH_REASON").reshape(-1)
    return [
        Row(text[i].decode(), int(prompt_tokens[i]), int(completion_tokens[i]), finish[i].decode())
        for i in range(len(text))
    ]


async def _infer(
    url: str,
    prompts: list[str],
    max_tokens: int | list[int] = 16,
    temperature: float | None = None,
    seed: int | None = None,
    model: str = MODEL,
) -> list[Row]:
    """Send all prompts as one request (rows along the batch dimension) and decode the rows."""
    outputs = [grpcclient_aio.InferRequestedOutput(n) for n in OUTPUTS]
    async with grpcclient_aio.InferenceServerClient(url=url) as client:
        result = await client.infer(
            model,
            _inputs(prompts, max_tokens, temperature, seed),
            outputs=outputs,
            client_timeout=30,
        )
    return _rows(result)


@dataclass(frozen=True)
class StepResponse:
    """One streamed response: every row (TEXT is that step's piece) and Triton's final flag."""

    rows: list[Row]
    final: bool


async def _stream(
    url: str,
    prompts: list[str],
    max_tokens: int | list[int] = 16,
    temperature: float | None = None,
    seed: int | None = None,
    model: str = STREAM_MODEL,
    cancel_after: int | None = None,
) -> list[StepResponse]:
    """Stream all prompts as one request; cancel the stream after `cancel_after` responses.

    Bounded by the stream's own 60 s timeout; an error response is raised. Returns once
    Triton has recorded the execution, so the next test's statistics start from a settled
    count (see _settled_stats).
    """
    executions = int((await _model_stats(url, model)).get("execution_count", 0))
    request = {
        "model_name": model,
        "inputs": _inputs(prompts, max_tokens, temperature, seed),
        "outputs": [grpcclient_aio.InferRequestedOutput(n) for n in OUTPUTS],
    }

    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield request

    steps: list[StepResponse] = []
    async with grpcclient_aio.InferenceServerClient(url=url) as client:
        responses = client.stream_infer(requests(), stream_timeout=60)
        async for result, error in responses:
            if error is not None:
                raise error
            final = result.get_response().parameters["triton_final_response"].bool_param
            steps.append(StepResponse(_rows(result), final))
            if cancel_after is not None and len(steps) >= cancel_after:
                responses.cancel()
                break
    await _settled_stats(url, model, executions + 1)
    return steps


async def _model_stats(url: str, model: str) -> dict[str, Any]:
    async with grpcclient_aio.InferenceServerClient(url=url) as client:
        stats = await client.get_inference_statistics(model, as_json=True)
    return stats["model_stats"][0]


async def _stats(url: str, model: str = MODEL) -> tuple[int, int]:
    """(execution_count, inference_count) of a model from Triton's statistics extension."""
    stats = await _model_stats(url, model)
    return int(stats.get("execution_count", 0)), int(stats.get("inference_count", 0))


async def _settled_stats(url: str, model: str, executions: int) -> dict[str, Any]:
    """The model's statistics once `executions` executions are recorded.

    Triton records an execution when the model's execute() returns, which can be after its
    client already has the (final) response, so a test waits for it (at most 30 s).
    """
    deadline = time.monotonic() + 30
    while True:
        stats = await _model_stats(url, model)
        if int(stats.get("execution_count", 0)) >= executions:
            return stats
        assert time.monotonic() < deadline, f"{model}: execution {executions} never recorded"
        await asyncio.sleep(0.02)


def _compute_ns(stats: dict[str, Any]) -> int:
    """How long Triton measured the model executing, all executions together (compute_infer)."""
    return int(stats["inference_stats"].get("compute_infer", {}).get("ns", 0))


PROMPTS = [
    "system: you are a helpful assistant.\nuser: what is a mesh network?",
    "user: tell me a story about a river and a bridge",
    "user: how does the cache keep answers fresh?",
    "user: write one line about winter mornings",
    "user: why do batches make the server faster?",
    "user: name a few old cities",
    "user: what should the router do when a node is slow?",
    "user: say something kind",
]


@pytest.mark.asyncio
async def test_node_is_ready_and_serves_tiny_lm(node: TritonNode) -> None:
    async with grpcclient_aio.InferenceServerClient(url=node.config.grpc_url) as client:
        assert await client.is_server_ready()
        assert await client.is_model_ready(MODEL)
        metadata = await client.get_model_metadata(MODEL, as_json=True)
    assert {i["name"] for i in metadata["inputs"]} == {
        "PROMPT",
        "MAX_TOKENS",
        "TEMPERATURE",
        "SEED",
    }
    assert {o["name"] for o in metadata["outputs"]} == {
        "TEXT",
        "PROMPT_TOKENS",
        "COMPLETION_TOKENS",
        "FINISH_REASON",
    }


@pytest.mark.asyncio
async def test_inference_returns_text_counts_and_is_deterministic(node: TritonNode) -> None:
    url = node.config.grpc_url
    first = await _infer(url, [PROMPTS[0]], max_tokens=12)
    second = await _infer(url, [PROMPTS[0]], max_tokens=12)
    row = first[0]
    assert row.text.strip()
    assert row.prompt_tokens > 0
    assert 0 < row.completion_tokens <= 12
    assert row.finish_reason in {"stop", "length"}
    if row.finish_reason == "length":
        assert row.completion_tokens == 12
    assert first == second


@pytest.mark.asyncio
async def test_max_tokens_caps_completion(node: TritonNode) -> None:
    rows = await _infer(node.config.grpc_url, [PROMPTS[1]], max_tokens=2)
    assert rows[0].completion_tokens == 2
    assert rows[0].finish_reason == "length"


@pytest.mark.asyncio
async def test_same_prompt_same_output_alone_or_in_a_batch(node: TritonNode) -> None:
    url = node.config.grpc_url
    alone = [(await _infer(url, [p], max_tokens=16))[0] for p in PROMPTS]
    in_one_request = await _infer(url, PROMPTS, max_tokens=16)
    assert in_one_request == alone
    # Eight concurrent single-row requests: the dynamic batcher may merge them.
    concurrent = await asyncio.gather(*(_infer(url, [p], max_tokens=16) for p in PROMPTS))
    assert [r[0] for r in concurrent] == alone
    assert len({r.text for r in alone}) > 1, "different prompts should not all collide"


@pytest.mark.asyncio
async def test_batch_of_eight_rows_is_one_execution_and_eight_inferences(
    node: TritonNode,
) -> None:
    url = node.config.grpc_url
    executions_before, inferences_before = await _stats(url)
    await _infer(url, PROMPTS, max_tokens=8)
    await _settled_stats(url, MODEL, executions_before + 1)
    executions_after, inferences_after = await _stats(url)
    assert executions_after - executions_before == 1
    assert inferences_after - inferences_before == 8


@pytest.mark.asyncio
async def test_sampling_with_same_seed_is_reproducible(node: TritonNode) -> None:
    url = node.config.grpc_url
    a = await _infer(url, [PROMPTS[2]], max_tokens=16, temperature=0.9, seed=42)
    b = await _infer(url, [PROMPTS[2]], max_tokens=16, temperature=0.9, seed=42)
    assert a == b
    assert a[0].completion_tokens > 0
    # Other seeds explore: at least one of several differs from seed 42's completion.
    others = [
        (await _infer(url, [PROMPTS[2]], max_tokens=16, temperature=0.9, seed=s))[0].text
        for s in (1, 2, 3)
    ]
    assert any(text != a[0].text for text in others)


def test_bad_model_repository_fails_with_a_clear_error(tmp_path: Path) -> None:
    config = TritonNodeConfig.with_free_ports(
        work_dir=tmp_path, model_repository=tmp_path / "no-such-repository"
    )
    node = TritonNode(config).start()
    try:
        with pytest.raises(TritonStartError) as info:
            node.wait_ready(timeout_s=30)
    finally:
        node.stop()
    message = str(info.value)
    assert "exited before becoming ready" in message
    assert "What to check" in message
    assert str(config.model_repository) in message
    assert "last 40 lines" in message
    assert "no-such-repository" in message.split("---", 1)[1], "log tail should be included"


def test_readiness_timeout_error_is_clear(tmp_path: Path) -> None:
    config = TritonNodeConfig.with_free_ports(work_dir=tmp_path)
    node = TritonNode(config).start()
    try:
        with pytest.raises(TritonStartError) as info:
            node.wait_ready(timeout_s=0.01)
    finally:
        node.stop()
    assert not list(Path("/dev/shm").glob(f"{node.shm_prefix}*")), "shm regions must be removed"
    message = str(info.value)
    assert "did not become ready within 0.0s" in message or "within 0.01" in message
    assert f"grpc {config.grpc_url}" in message
    # Every model of the shipped repository, which "none" mode loads, in name order.
    assert (
        "models not ready: echo_lm, embed_tiny, rag_prompt, rag_query, rag_tiny, tiny_lm,"
        " tiny_lm_stream, vector_search" in message
    )
    assert str(config.resolved_log_file) in message


def test_stop_leaves_no_triton_processes(tmp_path: Path) -> None:
    config = TritonNodeConfig.with_free_ports(work_dir=tmp_path)
    with TritonNode(config) as node:
        node.wait_ready(timeout_s=120)
        pgid = node.pgid
        assert pgid is not None
        members = process_group_members(pgid)
        stubs = _pids_with_cmdline_containing(str(tmp_path / "backends"))
        assert node.pid in members
        assert stubs, "the Python backend stub should run once tiny_lm is loaded"
        assert set(stubs) <= set(members), "stubs must share the server's process group"
    assert process_group_members(pgid) == []
    assert _pids_with_cmdline_containing(str(tmp_path)) == []
    assert not list(Path("/dev/shm").glob(f"{node.shm_prefix}*"))
    assert node.stop() is not None  # A second stop is harmless.


def test_server_dies_with_its_parent(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: killing the launching process must take tritonserver down too."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from deploy.local.triton import TritonNode, TritonNodeConfig
        node = TritonNode(TritonNodeConfig.with_free_ports(work_dir=Path({str(tmp_path)!r})))
        node.start()
        node.wait_ready(timeout_s=120)
        print(node.pid, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        server_pid = int(parent.stdout.readline())
        assert _pids_with_cmdline_containing(str(tmp_path))
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
        process_group_members(server_pid) or _pids_with_cmdline_containing(str(tmp_path))
    ):
        time.sleep(0.1)
    assert process_group_members(server_pid) == []
    assert _pids_with_cmdline_containing(str(tmp_path)) == []


def test_default_repository_is_the_checked_in_one() -> None:
    assert (DEFAULT_MODEL_REPOSITORY / MODEL / "config.pbtxt").is_file()
    assert (DEFAULT_MODEL_REPOSITORY / MODEL / "1" / "model.py").is_file()


@pytest.mark.asyncio
async def test_wait_ready_async_on_a_ready_node(node: TritonNode) -> None:
    assert await node.wait_ready_async(timeout_s=10) < 10


@pytest.mark.asyncio
async def test_bad_temperature_fails_only_that_request(node: TritonNode) -> None:
    url = node.config.grpc_url
    with pytest.raises(InferenceServerException, match="TEMPERATURE"):
        await _infer(url, [PROMPTS[0]], max_tokens=4, temperature=-1.0, seed=1)
    assert (await _infer(url, [PROMPTS[0]], max_tokens=4))[0].completion_tokens > 0


# -- echo_lm: the gateway benchmark's model -------------------------------------------------


@pytest.mark.asyncio
async def test_echo_lm_has_tiny_lm_tensors(node: TritonNode) -> None:
    async with grpcclient_aio.InferenceServerClient(url=node.config.grpc_url) as client:
        assert await client.is_model_ready(ECHO_MODEL)
        echo = await client.get_model_metadata(ECHO_MODEL, as_json=True)
        tiny = await client.get_model_metadata(MODEL, as_json=True)
        config = (await client.get_model_config(ECHO_MODEL, as_json=True))["config"]
    assert echo["inputs"] == tiny["inputs"]
    assert echo["outputs"] == tiny["outputs"]
    assert config["max_batch_size"] == 32
    assert "dynamic_batching" not in config


@pytest.mark.asyncio
async def test_echo_lm_echoes_the_prompt_with_tiny_lm_counts(node: TritonNode) -> None:
    """Text, counts and finish reason of several rows in one request (one execution)."""
    url = node.config.grpc_url
    prompts = [
        "Hello, Shepherd mesh!",  # "shepherd" and "!" are not tiny_lm words: hash buckets
        "The cache keeps answers.",
        "One two",
        "",
        render_prompt((("user", "What is a mesh?"),)),
    ]
    executions_before, inferences_before = await _stats(url, ECHO_MODEL)
    rows = await _infer(url, prompts, max_tokens=[3, 16, 2, 5, 4], model=ECHO_MODEL)
    # Triton records the execution a moment after the response leaves: wait for it.
    await _settled_stats(url, ECHO_MODEL, executions_before + 1)
    executions_after, inferences_after = await _stats(url, ECHO_MODEL)
    assert rows == [
        Row("hello, shepherd", 5, 3, "length"),
        Row("the cache keeps answers.", 5, 5, "stop"),
        Row("one two", 2, 2, "stop"),  # exactly MAX_TOKENS, but nothing was cut
        Row("", 0, 0, "stop"),
        Row("< | user |", 15, 4, "length"),
    ]
    assert [r.prompt_tokens for r in rows] == [len(tiny_lm_tokenize(p)) for p in prompts]
    assert (executions_after - executions_before, inferences_after - inferences_before) == (1, 5)


@pytest.mark.asyncio
async def test_echo_lm_counts_like_tiny_lm_and_ignores_sampling(node: TritonNode) -> None:
    """Same prompt tokens as tiny_lm; temperature and seed change nothing; 0 tokens, "length"."""
    url = node.config.grpc_url
    tiny = await _infer(url, PROMPTS, max_tokens=4)
    greedy = await _infer(url, PROMPTS, max_tokens=4, model=ECHO_MODEL)
    sampled = await _infer(url, PROMPTS, max_tokens=4, temperature=0.9, seed=3, model=ECHO_MODEL)
    assert [r.prompt_tokens for r in greedy] == [r.prompt_tokens for r in tiny]
    assert sampled == greedy
    assert all(r.completion_tokens == 4 and r.finish_reason == "length" for r in greedy)
    assert (await _infer(url, [PROMPTS[0]], max_tokens=0, model=ECHO_MODEL))[0] == Row(
        "", greedy[0].prompt_tokens, 0, "length"
    )
    with pytest.raises(InferenceServerException, match="echo_lm: bad request"):
        await _infer(url, [PROMPTS[0]], max_tokens=4, temperature=-1.0, model=ECHO_MODEL)


# -- tiny_lm_stream: the decoupled twin ------------------------------------------------------


@pytest.fixture(scope="module")
def long_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonNode]:
    """A node serving tiny_lm_stream_long: 256 steps per request, long enough to cancel."""
    root = tmp_path_factory.mktemp("triton-long")
    repository = streaming_model_repository(root / "repository", [LONG_STREAM_MODEL])
    triton = start_node(root / "work", repository, load=[LONG_STREAM_MODEL])
    try:
        yield triton
    finally:
        pgid = triton.pgid
        triton.stop()
        assert pgid is not None and process_group_members(pgid) == []


def test_stream_model_shares_tiny_lm_code() -> None:
    """One model.py serves both: the streamed and the plain answers cannot drift apart."""
    shared = DEFAULT_MODEL_REPOSITORY / STREAM_MODEL / "1" / "model.py"
    assert shared.resolve() == (DEFAULT_MODEL_REPOSITORY / MODEL / "1" / "model.py").resolve()


@pytest.mark.asyncio
async def test_stream_model_is_decoupled_with_tiny_lm_tensors(node: TritonNode) -> None:
    async with grpcclient_aio.InferenceServerClient(url=node.config.grpc_url) as client:
        assert await client.is_model_ready(STREAM_MODEL)
        config = (await client.get_model_config(STREAM_MODEL, as_json=True))["config"]
        plain = await client.get_model_metadata(MODEL, as_json=True)
        streaming = await client.get_model_metadata(STREAM_MODEL, as_json=True)
    assert config["model_transaction_policy"]["decoupled"] is True
    assert "dynamic_batching" not in config, "Shepherd forms the batches"
    for kind in ("inputs", "outputs"):
        assert {(t["name"], t["datatype"]) for t in streaming[kind]} == {
            (t["name"], t["datatype"]) for t in plain[kind]
        }


# Rows that finish at different steps: 0 tokens (finished before any step), 1, 2, ... 16.
STREAM_LIMITS = [16, 1, 8, 0, 2, 12, 16, 4]


def _check_stream(steps: list[StepResponse], expected: list[Row]) -> None:
    """Every step carries every row; pieces add up to tiny_lm's answer; finished rows stay put."""
    rows = len(expected)
    assert steps, "a stream has at least one response"
    assert [step.final for step in steps] == [False] * (len(steps) - 1) + [True]
    assert all(len(step.rows) == rows for step in steps), "every response carries every row"
    finished_at: list[int | None] = [None] * rows
    for index, step in enumerate(steps):
        for row, got in enumerate(step.rows):
            assert got.prompt_tokens == expected[row].prompt_tokens
            done = finished_at[row]
            if done is None:
                # Decoding: one token (and a piece of text) per step, except the step that
                # chooses end-of-sequence, which adds neither; a 0-token row adds nothing.
                assert got.finish_reason in {"", "stop", "length"}
                if got.finish_reason:
                    finished_at[row] = index
                if got.finish_reason == "stop":
                    assert (got.completion_tokens, got.text) == (index, "")
                else:
                    assert got.completion_tokens == min(index + 1, STREAM_LIMITS[row])
                    assert bool(got.text) == (STREAM_LIMITS[row] > 0)
            else:
                # Finished rows stop contributing: no text, the same counts and reason.
                previous = steps[done].rows[row]
                assert got == Row(
                    "", previous.prompt_tokens, previous.completion_tokens, previous.finish_reason
                )
    for row in range(rows):
        streamed = "".join(step.rows[row].text for step in steps)
        last = steps[-1].rows[row]
        assert finished_at[row] is not None, f"row {row} never finished"
        assert (
            Row(streamed, last.prompt_tokens, last.completion_tokens, last.finish_reason)
            == expected[row]
        ), f"row {row}"
    # One response per decoding step: as many as the longest row needed (its tokens, plus the
    # step that chose end-of-sequence).
    assert len(steps) == max(
        max(1, r.completion_tokens + (r.finish_reason == "stop")) for r in expected
    )


@pytest.mark.asyncio
async def test_stream_sends_every_row_each_step_and_matches_tiny_lm(node: TritonNode) -> None:
    url = node.config.grpc_url
    expected = await _infer(url, PROMPTS, max_tokens=STREAM_LIMITS)
    steps = await _stream(url, PROMPTS, max_tokens=STREAM_LIMITS)
    _check_stream(steps, expected)
    print(
        f"{len(steps)} responses for {len(PROMPTS)} rows; each row's finishing step:",
        [next(i for i, s in enumerate(steps) if s.rows[row].finish_reason) for row in range(8)],
    )
    # Rows finish early and the stream goes on without them.
    assert steps[0].rows[3].finish_reason == "length", "a 0-token row is done at once"
    assert steps[0].rows[1].finish_reason == "length" and len(steps) > 1


@pytest.mark.asyncio
async def test_sampled_stream_matches_tiny_lm_with_the_same_seed(node: TritonNode) -> None:
    url = node.config.grpc_url
    expected = await _infer(url, PROMPTS, max_tokens=STREAM_LIMITS, temperature=0.9, seed=42)
    steps = await _stream(url, PROMPTS, max_tokens=STREAM_LIMITS, temperature=0.9, seed=42)
    _check_stream(steps, expected)


@pytest.mark.asyncio
async def test_stream_of_eight_rows_is_one_execution(node: TritonNode) -> None:
    url = node.config.grpc_url
    executions, inferences = await _stats(url, STREAM_MODEL)
    steps = await _stream(url, PROMPTS, max_tokens=16)
    stats = await _settled_stats(url, STREAM_MODEL, executions + 1)
    await asyncio.sleep(0.2)  # nothing else may follow for this request
    assert await _stats(url, STREAM_MODEL) == (executions + 1, inferences + 8)
    print(f"{len(steps)} responses, 1 execution, 8 inferences; stats {stats['inference_stats']}")


@pytest.mark.asyncio
async def test_bad_stream_request_fails_alone(node: TritonNode) -> None:
    url = node.config.grpc_url
    with pytest.raises(InferenceServerException, match="TEMPERATURE"):
        await _stream(url, [PROMPTS[0]], max_tokens=4, temperature=-1.0, seed=1)
    assert (await _stream(url, [PROMPTS[0]], max_tokens=4))[-1].rows[0].completion_tokens > 0


@pytest.mark.asyncio
async def test_cancelling_the_stream_stops_decoding(long_node: TritonNode) -> None:
    """Cancel a 256-step stream after its first response; the model must stop decoding.

    The proof comes from Triton, not from the model: its statistics time every execution of
    the model (compute_infer: from execute() being called to it returning). A decoupled
    model's execute() returns only when it stops decoding, and the instance runs one
    execution at a time. The full stream of the same request keeps the model busy for `full`;
    had the model gone on decoding after the cancel, the cancelled execution would last about
    as long. It lasts less than half of it, so the model stopped. Noise can only make a
    cancelled run slower, so one run under half (of up to three) proves it; `full` is the
    fastest of two uncancelled runs, so noise cannot make it look long.
    """
    url = long_node.config.grpc_url
    prompts = [f"user: tell me about row {row}" for row in range(32)]

    async def measured(cancel_after: int | None) -> tuple[int, int]:
        """(responses received, compute ns of this one execution)."""
        before = await _model_stats(url, LONG_STREAM_MODEL)
        executions = int(before.get("execution_count", 0))
        steps = await _stream(
            url, prompts, max_tokens=256, model=LONG_STREAM_MODEL, cancel_after=cancel_after
        )
        after = await _settled_stats(url, LONG_STREAM_MODEL, executions + 1)
        assert int(after["execution_count"]) == executions + 1
        return len(steps), _compute_ns(after) - _compute_ns(before)

    full_runs = [await measured(None) for _ in range(2)]
    assert all(responses == 256 for responses, _ in full_runs)
    full = min(ns for _, ns in full_runs)
    cancelled: list[int] = []
    for _ in range(3):
        responses, ns = await measured(cancel_after=1)
        assert responses == 1
        cancelled.append(ns)
        if ns < full / 2:
            break
    print(
        f"full 256-step stream: {full / 1e6:.0f} ms of model execution; cancelled after the "
        f"first response: {', '.join(f'{ns / 1e6:.0f}' for ns in cancelled)} ms"
    )
    assert min(cancelled) < full / 2
    # The instance is free again at once: a new stream is served in full.
    assert len(await _stream(url, prompts[:1], max_tokens=3, model=LONG_STREAM_MODEL)) == 3
