"""embed_tiny: a small, deterministic numpy text encoder for Triton's Python backend.

Why it exists: Shepherd serves embeddings (RouterService/Embed) and a retrieval-augmented
ensemble (rag_tiny) through the same scheduler as chat, and the tests and benchmarks need a
real embedding model on a CPU-only machine without weights to download. This one does honest
batched work: every row's tokens go through a seeded token table and one bidirectional
self-attention layer, padded and masked so that the whole batch is one set of matrix
products; the weighted mean over the row's tokens is projected and L2-normalised. The same
text gives the same vector on every run and in any batch, and texts that share words get
close vectors, which is what retrieval over a small corpus (vector_search) needs.

Tokens are the pieces tiny_lm's tokenizer splits (lower-cased words and punctuation marks),
hashed into a fixed table, so TOKENS is a real count of what was encoded and billing is by
it. Only the first MAX_INPUT_TOKENS tokens of a text are encoded (a real encoder's context
window); TOKENS still counts them all, as providers bill the whole input.

The numpy part (`TinyEncoder`) does not import Triton, so vector_search builds its index
with it and tests can call it directly; `TritonPythonModel` is the adapter Triton loads.
"""

from __future__ import annotations

# Import the backend utils before numpy (see tiny_lm's model.py: the generated shim puts the
# launching venv's site-packages on sys.path first).
try:  # Only present inside the Triton Python backend stub.
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised when imported outside Triton.
    pb_utils = None

import re
import zlib
from typing import Any

import numpy as np

DIMENSIONS = 128
TABLE_SIZE = 16_384  # hashed token ids; collisions are rare for a few thousand distinct words
N_HEADS = 4
MAX_INPUT_TOKENS = 512
WEIGHT_SEED = 4321
ATTENTION_SCALE = np.float32(0.25)  # the attention layer refines, the words dominate
# Common function words and punctuation weigh this much in the mean: a trained encoder learns
# that "the" and "?" say little about a text; this seeded one is told, so a question finds the
# document about its subject rather than one that shares its grammar.
FUNCTION_WORD_WEIGHT = np.float32(0.1)
FUNCTION_WORDS = frozenset(
    "the a an and or but of to in on at for with from by about into over is are was were be"
    " been has have had do does did can could will would should may might must not no this"
    " that these those it its they them their we our you your he she his her i my me who what"
    " when where why how which all some many more most each every other tell please there"
    " here as than then so if . , ? ! ; : ' \" ( ) -".split()
)

_TOKEN_RE = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


def split(text: str) -> list[str]:
    """The pieces counted as tokens: lower-cased words and punctuation (tiny_lm's split)."""
    return _TOKEN_RE.findall(text.lower())


def token_ids(text: str) -> list[int]:
    """Stable ids for a text's tokens: crc32 (not Python's salted hash) into the table."""
    return [zlib.crc32(piece.encode("utf-8")) % TABLE_SIZE for piece in split(text)]


def _layer_norm(x: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5)


class TinyEncoder:
    """Seeded weights and one batched forward pass: texts in, unit vectors and counts out."""

    def __init__(self, seed: int = WEIGHT_SEED) -> None:
        rng = np.random.default_rng(seed)

        def init(*shape: int, std: float) -> np.ndarray:
            return (rng.standard_normal(shape) * std).astype(np.float32)

        self.table = init(TABLE_SIZE, DIMENSIONS, std=1.0)
        self.w_qkv = init(DIMENSIONS, 3 * DIMENSIONS, std=DIMENSIONS**-0.5)
        self.w_o = init(DIMENSIONS, DIMENSIONS, std=DIMENSIONS**-0.5)
        self.w_proj = init(DIMENSIONS, DIMENSIONS, std=DIMENSIONS**-0.5)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """(vectors [rows, DIMENSIONS] float32 of norm 1, token count of each text).

        A text without tokens (empty, or only spaces) has no meaning to encode: ValueError.
        Rows are right-padded to the longest and padding is masked out of attention and of
        the mean, so a row's vector does not depend on the batch it came in.
        """
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32), []
        ids = [token_ids(text) for text in texts]
        counts = [len(row) for row in ids]
        if min(counts) == 0:
            empty = counts.index(0)
            raise ValueError(f"row {empty} has no tokens to encode (empty or only whitespace)")
        windows = [row[:MAX_INPUT_TOKENS] for row in ids]
        batch, steps = len(windows), max(len(row) for row in windows)
        tokens = np.zeros((batch, steps), dtype=np.int64)
        valid = np.zeros((batch, steps), dtype=bool)
        weight = np.zeros((batch, steps), dtype=np.float32)
        for index, (text, row) in enumerate(zip(texts, windows, strict=True)):
            tokens[index, : len(row)] = row
            valid[index, : len(row)] = True
            weight[index, : len(row)] = [
                FUNCTION_WORD_WEIGHT if piece in FUNCTION_WORDS else 1.0
                for piece in split(text)[: len(row)]
            ]
        x = self.table[tokens]  # (B, T, D)
        head = DIMENSIONS // N_HEADS
        qkv = (_layer_norm(x) @ self.w_qkv).reshape(batch, steps, 3, N_HEADS, head)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (B, H, T, head)
        scores = q @ k.transpose(0, 1, 3, 2) * np.float32(head**-0.5)
        scores = np.where(valid[:, None, None, :], scores, np.float32(-1e9))
        scores -= scores.max(axis=-1, keepdims=True)
        weights = np.exp(scores)
        weights /= weights.sum(axis=-1, keepdims=True)
        mixed = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, steps, DIMENSIONS)
        x = x + ATTENTION_SCALE * (mixed @ self.w_o)
        pooled = (x * weight[:, :, None]).sum(axis=1) / weight.sum(axis=1, keepdims=True)
        vectors = pooled @ self.w_proj
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors.astype(np.float32), counts


def _texts(request: Any, name: str) -> list[str]:
    """A request's [rows, 1] string input as text (bytes decoded as UTF-8)."""
    raw = pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)
    return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in raw]


class TritonPythonModel:
    """Triton adapter: every row of every request encoded in one pass, split back."""

    def initialize(self, args: dict[str, str]) -> None:
        """Build the seeded weights once per instance."""
        self.encoder = TinyEncoder(WEIGHT_SEED)

    def execute(self, requests: list[Any]) -> list[Any]:
        """One forward pass over all rows; a request with an empty row fails alone."""
        texts: list[str] = []
        spans: list[tuple[int, int] | Any] = []
        for request in requests:
            try:
                rows = _texts(request, "TEXT")
                if any(not split(text) for text in rows):
                    raise ValueError("every TEXT row needs at least one token")
            except Exception as exc:  # Reported to that client, not swallowed.
                spans.append(pb_utils.TritonError(f"embed_tiny: bad request: {exc}"))
                continue
            spans.append((len(texts), len(texts) + len(rows)))
            texts.extend(rows)
        vectors, counts = self.encoder.encode(texts)
        responses = []
        for span in spans:
            if not isinstance(span, tuple):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=span))
                continue
            start, end = span
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("EMBEDDING", vectors[start:end]),
                        pb_utils.Tensor(
                            "TOKENS", np.array([[n] for n in counts[start:end]], dtype=np.int32)
                        ),
                    ]
                )
            )
        return responses

    def finalize(self) -> None:
        """Nothing to release: the weights are plain numpy arrays."""
