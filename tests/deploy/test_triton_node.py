"""End-to-end tests of the local Triton launcher and the tiny_lm model on a real tritonserver.

Why: the mesh trusts this node for batching, token counts and determinism; these tests start
the real binary from the nvidia-pytriton wheel on free ports and check each promise through
the same tritonclient gRPC API the services use.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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

MODEL = "tiny_lm"
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


async def _infer(
    url: str,
    prompts: list[str],
    max_tokens: int | list[int] = 16,
    temperature: float | None = None,
    seed: int | None = None,
) -> list[Row]:
    """Send all prompts as one request (rows along the batch dimension) and decode the rows."""
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
    outputs = [
        grpcclient_aio.InferRequestedOutput(n)
        for n in ("TEXT", "PROMPT_TOKENS", "COMPLETION_TOKENS", "FINISH_REASON")
    ]
    async with grpcclient_aio.InferenceServerClient(url=url) as client:
        result = await client.infer(MODEL, inputs, outputs=outputs, client_timeout=30)
    text = result.as_numpy("TEXT").reshape(-1)
    prompt_tokens = result.as_numpy("PROMPT_TOKENS").reshape(-1)
    completion_tokens = result.as_numpy("COMPLETION_TOKENS").reshape(-1)
    finish = result.as_numpy("FINISH_REASON").reshape(-1)
    return [
        Row(text[i].decode(), int(prompt_tokens[i]), int(completion_tokens[i]), finish[i].decode())
        for i in range(rows)
    ]


async def _stats(url: str) -> tuple[int, int]:
    """(execution_count, inference_count) of tiny_lm from Triton's statistics extension."""
    async with grpcclient_aio.InferenceServerClient(url=url) as client:
        stats = await client.get_inference_statistics(MODEL, as_json=True)
    model = stats["model_stats"][0]
    return int(model.get("execution_count", 0)), int(model.get("inference_count", 0))


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
    assert "models not ready: tiny_lm" in message
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
