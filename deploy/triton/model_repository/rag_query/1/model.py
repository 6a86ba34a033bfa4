"""rag_query: the retrieval query of a chat, the first step of the rag_tiny ensemble.

Why it exists: Shepherd sends every self-hosted chat model one PROMPT, the conversation
rendered with role tags (services/scheduler/triton.py, render_prompt):

    <|system|>\\n...\\n<|user|>\\n...\\n<|assistant|>\\n...\\n<|user|>\\n<question>\\n<|assistant|>\\n

What should be looked up is the question, the last user turn, not the tags or earlier turns,
so this step cuts it out and the ensemble embeds that. Keeping it a model of its own keeps the
mesh ignorant of RAG: the ensemble takes the same inputs as any chat model. A prompt without
role tags is a query as it is.

Input PROMPT [rows, 1] (string); output QUERY [rows, 1] (string).
"""

from __future__ import annotations

# Before numpy, as in tiny_lm: the utils module put the venv's site-packages on sys.path.
try:  # Only present inside the Triton Python backend stub.
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised when imported outside Triton.
    pb_utils = None

import re
from typing import Any

import numpy as np

_TURN = re.compile(r"^<\|(system|user|assistant)\|>$", re.MULTILINE)


def last_user_turn(prompt: str) -> str:
    """The text of the conversation's last user turn; the whole prompt when it has no tags."""
    tags = list(_TURN.finditer(prompt))
    if not tags:
        return prompt.strip()
    query = ""
    for index, tag in enumerate(tags):
        if tag.group(1) != "user":
            continue
        end = tags[index + 1].start() if index + 1 < len(tags) else len(prompt)
        query = prompt[tag.end() : end].strip()
    return query or prompt.strip()


class TritonPythonModel:
    """Triton adapter: one QUERY row per PROMPT row."""

    def initialize(self, args: dict[str, str]) -> None:
        """Nothing to build: a parser has no weights."""

    def execute(self, requests: list[Any]) -> list[Any]:
        """Cut each row's query out of its prompt."""
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy().reshape(-1)
            prompts = [
                v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in raw
            ]
            queries = np.array([[last_user_turn(p).encode()] for p in prompts], np.object_)
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("QUERY", queries)])
            )
        return responses

    def finalize(self) -> None:
        """Nothing to release."""
