"""rag_prompt: prompt assembly, the step of the rag_tiny ensemble between retrieval and tiny_lm.

Why it exists: the generator must see what was retrieved. This step puts the retrieved
documents in front of the conversation as a system turn, each tagged with its id so that the
answer can cite it, in the role-tag format tiny_lm reads (the same tags Shepherd renders):

    <|system|>
    Answer from these documents and cite them by id.
    [doc-012] Wisteln. Wisteln is a town ...
    [doc-207] ...
    <|user|>
    ...the conversation as it came...

Inputs PROMPT [rows, 1], DOC_IDS and DOC_TEXTS [rows, k] (strings, best first); output
AUGMENTED_PROMPT [rows, 1]. Its tokens are what tiny_lm counts as the request's prompt
tokens, so the caller is billed for the context it was given, as hosted RAG services bill.
"""

from __future__ import annotations

# Before numpy, as in tiny_lm: the utils module put the venv's site-packages on sys.path.
try:  # Only present inside the Triton Python backend stub.
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised when imported outside Triton.
    pb_utils = None

from collections.abc import Sequence
from typing import Any

import numpy as np

INSTRUCTION = "Answer from these documents and cite them by id."


def assemble(prompt: str, doc_ids: Sequence[str], doc_texts: Sequence[str]) -> str:
    """The documents as a leading system turn, then the conversation unchanged."""
    lines = ["<|system|>", INSTRUCTION]
    lines += [f"[{doc_id}] {text}" for doc_id, text in zip(doc_ids, doc_texts, strict=True)]
    return "\n".join(lines) + "\n" + prompt


def _strings(request: Any, name: str) -> np.ndarray:
    """A string input as a numpy array of str, its shape kept."""
    raw = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
    return np.vectorize(
        lambda v: v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v),
        otypes=[object],
    )(raw)


class TritonPythonModel:
    """Triton adapter: one assembled prompt per row."""

    def initialize(self, args: dict[str, str]) -> None:
        """Nothing to build: assembly is string formatting."""

    def execute(self, requests: list[Any]) -> list[Any]:
        """Assemble each row's prompt; a request whose tensors disagree fails alone."""
        responses = []
        for request in requests:
            try:
                prompts = _strings(request, "PROMPT").reshape(-1)
                ids = _strings(request, "DOC_IDS")
                texts = _strings(request, "DOC_TEXTS")
                ids = ids.reshape(len(prompts), -1)
                texts = texts.reshape(len(prompts), -1)
                if ids.shape != texts.shape:
                    raise ValueError(f"DOC_IDS is {ids.shape}, DOC_TEXTS {texts.shape}")
            except Exception as exc:  # Reported to that client, not swallowed.
                error = pb_utils.TritonError(f"rag_prompt: bad request: {exc}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            assembled = np.array(
                [
                    [assemble(prompt, list(ids[row]), list(texts[row])).encode()]
                    for row, prompt in enumerate(prompts)
                ],
                np.object_,
            )
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("AUGMENTED_PROMPT", assembled)]
                )
            )
        return responses

    def finalize(self) -> None:
        """Nothing to release."""
