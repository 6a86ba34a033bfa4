"""The RAG models on a real tritonserver: embed_tiny, vector_search and the rag_tiny ensemble.

Why: Shepherd serves embeddings and the seed's RAG pipeline (embedding -> vector search ->
LLM) through its scheduler, and trusts these models for determinism, honest token counts,
batching and retrieval. These tests start the real binary in explicit model-control mode, the
mode the scheduler places models in, and check each promise through tritonclient.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException

from deploy.local.triton import DEFAULT_MODEL_REPOSITORY, TritonNode
from libs.catalog import load_catalog
from libs.config import DEFAULT_CATALOG
from services.scheduler.triton import render_prompt
from tests.support.rag import (
    EMBEDDING_MODEL,
    ENSEMBLE,
    SEARCH_MODEL,
    STEPS,
    corpus,
    embed_tiny,
    embedding_tokens,
    first_sentence,
    make_corpus,
    rag_prompt,
)
from tests.support.scheduler import start_node
from tests.support.tiny_lm import tiny_lm_tokenize

TEXTS = [
    "What is a mesh network?",
    "Tell me about Mouzan",
    "The quick brown fox jumps over the lazy dog.",
    "embeddings",
    "A much longer text, with commas, numbers like 42 and 1999, and several clauses that go on.",
    "Où est la gare ?",
]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonNode]:
    """An explicit-mode node with rag_tiny loaded (which loads its steps, embed_tiny among them)."""
    triton_node = start_node(
        tmp_path_factory.mktemp("rag-node"), DEFAULT_MODEL_REPOSITORY, load=[ENSEMBLE]
    )
    yield triton_node
    triton_node.stop()


def _tensor(name: str, value: np.ndarray, dtype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(value.shape), dtype)
    tensor.set_data_from_numpy(value)
    return tensor


def _strings(texts: list[str]) -> np.ndarray:
    return np.array([[t.encode()] for t in texts], dtype=np.object_)


async def _embed(url: str, texts: list[str]) -> tuple[np.ndarray, list[int]]:
    """One request, one row per text: (vectors, token counts)."""
    async with triton.InferenceServerClient(url=url) as client:
        result = await client.infer(
            EMBEDDING_MODEL, [_tensor("TEXT", _strings(texts), "BYTES")], client_timeout=30
        )
    return result.as_numpy("EMBEDDING"), [int(n) for n in result.as_numpy("TOKENS").reshape(-1)]


async def _stats(url: str, model: str) -> tuple[int, int]:
    """(execution_count, inference_count) from Triton's statistics (absent counts are 0)."""
    async with triton.InferenceServerClient(url=url) as client:
        stats = (await client.get_inference_statistics(model, as_json=True))["model_stats"][0]
    return int(stats.get("execution_count", 0)), int(stats.get("inference_count", 0))


async def _rag(url: str, questions: list[str], max_tokens: int = 12) -> dict[str, Any]:
    """One rag_tiny request with a one-turn conversation per row, as the scheduler sends it."""
    rows = len(questions)
    prompts = [render_prompt([("user", q)]) for q in questions]
    async with triton.InferenceServerClient(url=url) as client:
        result = await client.infer(
            ENSEMBLE,
            [
                _tensor("PROMPT", _strings(prompts), "BYTES"),
                _tensor("MAX_TOKENS", np.full((rows, 1), max_tokens, np.int32), "INT32"),
                _tensor("TEMPERATURE", np.zeros((rows, 1), np.float32), "FP32"),
                _tensor("SEED", np.zeros((rows, 1), np.int64), "INT64"),
            ],
            client_timeout=60,
        )
    return {
        "prompts": prompts,
        "text": [t.decode() for t in result.as_numpy("TEXT").reshape(-1)],
        "prompt_tokens": [int(n) for n in result.as_numpy("PROMPT_TOKENS").reshape(-1)],
        "completion_tokens": [int(n) for n in result.as_numpy("COMPLETION_TOKENS").reshape(-1)],
        "doc_ids": [[d.decode() for d in row] for row in result.as_numpy("DOC_IDS")],
    }


def _ready_models(index: dict[str, Any]) -> set[str]:
    return {m["name"] for m in index.get("models", []) if m.get("state") == "READY"}


# -- explicit model control ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_loading_the_ensemble_loads_its_steps(tmp_path: Path) -> None:
    bare = start_node(tmp_path, DEFAULT_MODEL_REPOSITORY)
    try:
        async with triton.InferenceServerClient(url=bare.config.grpc_url) as client:
            assert _ready_models(await client.get_model_repository_index(as_json=True)) == set()
            await client.load_model(ENSEMBLE, client_timeout=120)
            ready = _ready_models(await client.get_model_repository_index(as_json=True))
            config = (await client.get_model_config(ENSEMBLE, as_json=True))["config"]
    finally:
        bare.stop()
    assert ready == {ENSEMBLE, *STEPS}
    assert config["platform"] == "ensemble"
    assert [s["model_name"] for s in config["ensemble_scheduling"]["step"]] == list(STEPS)


@pytest.mark.asyncio
async def test_a_step_missing_from_the_repository_fails_the_load_naming_it(
    tmp_path: Path,
) -> None:
    repository = tmp_path / "models"
    repository.mkdir()
    for shipped in DEFAULT_MODEL_REPOSITORY.iterdir():
        if shipped.is_dir() and shipped.name != SEARCH_MODEL:
            (repository / shipped.name).symlink_to(shipped, target_is_directory=True)
    bare = start_node(tmp_path / "node", repository)
    try:
        async with triton.InferenceServerClient(url=bare.config.grpc_url) as client:
            with pytest.raises(InferenceServerException) as failure:
                await client.load_model(ENSEMBLE, client_timeout=120)
            assert not await client.is_model_ready(ENSEMBLE)
    finally:
        bare.stop()
    assert SEARCH_MODEL in failure.value.message()


# -- embed_tiny ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_embeddings_are_unit_vectors_and_the_same_alone_or_in_a_batch(
    node: TritonNode,
) -> None:
    url = node.config.grpc_url
    together, counts = await _embed(url, TEXTS)
    alone = np.concatenate([(await _embed(url, [text]))[0] for text in TEXTS])
    again, _ = await _embed(url, list(reversed(TEXTS)))
    assert together.shape == (len(TEXTS), embed_tiny.DIMENSIONS)
    assert together.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(together, alone, atol=1e-6)
    np.testing.assert_allclose(together, again[::-1], atol=1e-6)
    # The shipped numpy encoder gives the node's vectors: nothing differs inside Triton.
    local, local_counts = embed_tiny.TinyEncoder().encode(TEXTS)
    np.testing.assert_allclose(together, local, atol=1e-5)
    assert counts == local_counts == [embedding_tokens(text) for text in TEXTS]
    assert len({tuple(np.round(v, 4)) for v in together}) == len(TEXTS)


@pytest.mark.asyncio
async def test_a_request_of_many_rows_is_one_execution(node: TritonNode) -> None:
    url = node.config.grpc_url
    texts = [f"document number {i} about rivers and towns" for i in range(24)]
    executions, inferences = await _stats(url, EMBEDDING_MODEL)
    await _embed(url, texts)
    assert await _stats(url, EMBEDDING_MODEL) == (executions + 1, inferences + len(texts))


@pytest.mark.asyncio
async def test_a_text_without_tokens_is_refused_naming_the_model(node: TritonNode) -> None:
    with pytest.raises(InferenceServerException, match="embed_tiny: bad request"):
        await _embed(node.config.grpc_url, ["fine", "   "])


# -- vector_search -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_retrieval_finds_the_document_a_query_was_built_from(node: TritonNode) -> None:
    docs = corpus()[::10]  # 30 documents, three of each kind
    queries = [first_sentence(text) for _, _, text in docs]
    vectors, _ = await _embed(node.config.grpc_url, queries)
    async with triton.InferenceServerClient(url=node.config.grpc_url) as client:
        result = await client.infer(
            SEARCH_MODEL, [_tensor("EMBEDDING", vectors, "FP32")], client_timeout=30
        )
    ids = [[d.decode() for d in row] for row in result.as_numpy("DOC_IDS")]
    scores = result.as_numpy("SCORES")
    assert [row[0] for row in ids] == [doc_id for doc_id, _, _ in docs]
    assert all(len(row) == 3 == len(set(row)) for row in ids)
    assert np.all(np.diff(scores, axis=1) <= 0), "best match first"
    assert np.all(scores[:, 0] > 0.5)


def test_the_shipped_corpus_is_what_its_generator_writes() -> None:
    shipped = (DEFAULT_MODEL_REPOSITORY / SEARCH_MODEL / "1" / "corpus.jsonl").read_text()
    assert shipped == make_corpus.render(make_corpus.build())
    docs = corpus()
    assert len(docs) == 300
    assert len({doc_id for doc_id, _, _ in docs}) == 300


# -- rag_tiny ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_ensemble_answers_deterministically_and_cites_what_it_retrieved(
    node: TritonNode,
) -> None:
    docs = corpus()[5::60]  # five documents of different kinds
    questions = [first_sentence(text) for _, _, text in docs]
    first = await _rag(node.config.grpc_url, questions)
    second = await _rag(node.config.grpc_url, questions)
    assert first == second
    assert [ids[0] for ids in first["doc_ids"]] == [doc_id for doc_id, _, _ in docs]
    by_id = {doc_id: f"{title}. {text}" for doc_id, title, text in corpus()}
    for row, ids in enumerate(first["doc_ids"]):
        assert first["text"][row].strip()
        assert 0 < first["completion_tokens"][row] <= 12
        # tiny_lm saw the documents: it counts the assembled prompt, documents included.
        assembled = rag_prompt.assemble(first["prompts"][row], ids, [by_id[i] for i in ids])
        assert first["prompt_tokens"][row] == len(tiny_lm_tokenize(assembled))
        assert first["prompt_tokens"][row] > len(tiny_lm_tokenize(first["prompts"][row]))


@pytest.mark.asyncio
async def test_the_ensemble_retrieves_with_the_last_user_turn(node: TritonNode) -> None:
    doc_id, _, text = corpus()[42]
    prompt = render_prompt(
        [
            ("system", "You are a helpful guide."),
            ("user", "Tell me about the weather."),
            ("assistant", "It is sunny."),
            ("user", first_sentence(text)),
        ]
    )
    rows = 1
    async with triton.InferenceServerClient(url=node.config.grpc_url) as client:
        result = await client.infer(
            ENSEMBLE,
            [
                _tensor("PROMPT", _strings([prompt]), "BYTES"),
                _tensor("MAX_TOKENS", np.full((rows, 1), 4, np.int32), "INT32"),
                _tensor("TEMPERATURE", np.zeros((rows, 1), np.float32), "FP32"),
                _tensor("SEED", np.zeros((rows, 1), np.int64), "INT64"),
            ],
            client_timeout=60,
        )
    assert result.as_numpy("DOC_IDS")[0][0].decode() == doc_id


def test_the_catalog_reserves_for_the_most_context_the_ensemble_adds() -> None:
    """Admission reserves `context_tokens` for the documents tiny_lm will count and bill."""
    model = load_catalog(DEFAULT_CATALOG, env={}).resolve("shepherd-rag")
    config = (DEFAULT_MODEL_REPOSITORY / SEARCH_MODEL / "config.pbtxt").read_text()
    top_k = int(re.search(r'key: "top_k"\s*value: \{ string_value: "(\d+)" \}', config)[1])
    lines = sorted(
        (len(tiny_lm_tokenize(f"[{i}] {title}. {text}")) for i, title, text in corpus()),
        reverse=True,
    )
    header = len(tiny_lm_tokenize(rag_prompt.assemble("", [], [])))
    assert header + sum(lines[:top_k]) <= model.context_tokens
