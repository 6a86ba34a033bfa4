"""vector_search: cosine top-k over a small corpus, for Triton's Python backend.

Why it exists: the seed's RAG pipeline (embedding -> vector search -> LLM) needs a retrieval
step that runs inside Triton, so that the whole pipeline is one ensemble (rag_tiny) and no
Python glue sits between its steps. At load the model reads `corpus.jsonl` (one
{"id", "title", "text"} per line, next to this file; see ../make_corpus.py) and builds its
index by encoding every document ("title. text") with embed_tiny's encoder, the model that
embeds the queries. Vectors are unit length, so cosine similarity is one matrix product.

Inputs: EMBEDDING [rows, 128] float32, the query vectors. Outputs, per row, best match first:
DOC_IDS [rows, k] and DOC_TEXTS [rows, k] (strings), SCORES [rows, k] (cosine, float32).
k is the config parameter `top_k` (3 by default).

On a GPU node the same interface is served by a real vector store (a FAISS or cuVS index
built offline with the real embedding model and loaded here): see the repository README.
"""

from __future__ import annotations

# Before numpy, as in tiny_lm: the utils module put the venv's site-packages on sys.path.
try:  # Only present inside the Triton Python backend stub.
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised when imported outside Triton.
    pb_utils = None

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus.jsonl"
# embed_tiny's model.py, next to this model in the repository. resolve() follows a symlinked
# model directory (the tests link the shipped models into repositories of their own).
EMBED_TINY_MODEL = HERE.parents[1] / "embed_tiny" / "1" / "model.py"
DEFAULT_TOP_K = 3
ENCODE_BATCH = 64  # documents encoded per pass while the index is built


def _load_embed_tiny() -> ModuleType:
    """embed_tiny's model.py as a module of its own name: its encoder."""
    spec = importlib.util.spec_from_file_location("vector_search_embed_tiny", EMBED_TINY_MODEL)
    if spec is None or spec.loader is None:
        raise ImportError(f"vector_search needs embed_tiny's model.py at {EMBED_TINY_MODEL}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Document:
    """One entry of the corpus."""

    id: str
    title: str
    text: str


def read_corpus(path: Path = CORPUS) -> list[Document]:
    """Every document of the corpus file, in file order; ids must be unique."""
    docs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        entry = json.loads(line)
        try:
            docs.append(Document(str(entry["id"]), str(entry["title"]), str(entry["text"])))
        except KeyError as missing:
            raise ValueError(f"{path}:{number}: document without {missing}") from None
    if len({doc.id for doc in docs}) != len(docs):
        raise ValueError(f"{path}: document ids must be unique")
    if not docs:
        raise ValueError(f"{path}: the corpus is empty")
    return docs


class Index:
    """The corpus and its unit vectors; `search` is cosine top-k for a batch of queries."""

    def __init__(self, docs: list[Document], encoder: Any) -> None:
        self.docs = docs
        parts = []
        for start in range(0, len(docs), ENCODE_BATCH):
            chunk = docs[start : start + ENCODE_BATCH]
            vectors, _ = encoder.encode([f"{doc.title}. {doc.text}" for doc in chunk])
            parts.append(vectors)
        self.vectors = np.concatenate(parts).astype(np.float32)  # (N, D)

    @classmethod
    def shipped(cls) -> Index:
        """The shipped corpus, embedded with embed_tiny's seeded encoder."""
        embed_tiny = _load_embed_tiny()
        return cls(read_corpus(), embed_tiny.TinyEncoder(embed_tiny.WEIGHT_SEED))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices [rows, k], scores [rows, k]) of the best documents, best first.

        Ties are broken by corpus order, so the answer is deterministic.
        """
        if queries.ndim != 2 or queries.shape[1] != self.vectors.shape[1]:
            raise ValueError(
                f"EMBEDDING must be [rows, {self.vectors.shape[1]}], not {list(queries.shape)}"
            )
        k = min(k, len(self.docs))
        scores = queries.astype(np.float32) @ self.vectors.T  # (rows, N)
        # Stable sort on the negated scores: equal scores keep corpus order.
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(scores, order, axis=1)


class TritonPythonModel:
    """Triton adapter: all rows of all requests searched with one matrix product."""

    def initialize(self, args: dict[str, str]) -> None:
        """Build the index once per instance: the corpus encoded at load."""
        config = json.loads(args["model_config"])
        parameter = config.get("parameters", {}).get("top_k", {})
        self.top_k = int(parameter.get("string_value", DEFAULT_TOP_K) or DEFAULT_TOP_K)
        if self.top_k < 1:
            raise ValueError(f"vector_search: top_k must be at least 1, not {self.top_k}")
        self.index = Index.shipped()

    def execute(self, requests: list[Any]) -> list[Any]:
        """Search every row; a malformed request fails alone."""
        blocks: list[np.ndarray] = []
        spans: list[tuple[int, int] | Any] = []
        rows = 0
        for request in requests:
            try:
                block = pb_utils.get_input_tensor_by_name(request, "EMBEDDING").as_numpy()
                block = block.reshape(block.shape[0], -1)
                if block.shape[1] != self.index.vectors.shape[1]:
                    raise ValueError(
                        f"EMBEDDING rows have {block.shape[1]} values, the index"
                        f" {self.index.vectors.shape[1]}"
                    )
            except Exception as exc:  # Reported to that client, not swallowed.
                spans.append(pb_utils.TritonError(f"vector_search: bad request: {exc}"))
                continue
            spans.append((rows, rows + block.shape[0]))
            blocks.append(block)
            rows += block.shape[0]
        order = np.zeros((0, self.top_k), dtype=np.int64)
        scores = np.zeros((0, self.top_k), dtype=np.float32)
        if blocks:
            order, scores = self.index.search(np.concatenate(blocks), self.top_k)
        responses = []
        for span in spans:
            if not isinstance(span, tuple):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=span))
                continue
            picked = order[span[0] : span[1]]
            docs = [[self.index.docs[i] for i in row] for row in picked]
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor(
                            "DOC_IDS",
                            np.array([[d.id.encode() for d in row] for row in docs], np.object_),
                        ),
                        pb_utils.Tensor(
                            "DOC_TEXTS",
                            np.array(
                                [[f"{d.title}. {d.text}".encode() for d in row] for row in docs],
                                np.object_,
                            ),
                        ),
                        pb_utils.Tensor("SCORES", scores[span[0] : span[1]].astype(np.float32)),
                    ]
                )
            )
        return responses

    def finalize(self) -> None:
        """Nothing to release: the index is a numpy array."""
