"""echo_lm: a Triton Python-backend model that answers with the start of its own prompt.

Why it exists: the gateway benchmark (bench/gateway.py) measures what the Shepherd mesh itself
costs per request. Behind tiny_lm, a numpy transformer, the model's own CPU would hide the
mesh's; echo_lm does almost nothing, so the mesh is the bottleneck and its cost shows, as in
public gateway benchmarks that put a mock backend behind the gateway under test.

It keeps tiny_lm's interface exactly (the same inputs, outputs, shapes and batching), so the
scheduler calls it the way it calls tiny_lm, and it counts with tiny_lm's own tokenizer,
loaded from tiny_lm's model.py rather than copied: TEXT is the first min(MAX_TOKENS, n)
tokens of the prompt (n = its token count), PROMPT_TOKENS is n, COMPLETION_TOKENS is how many
were echoed, and FINISH_REASON is "length" when MAX_TOKENS cut the echo short, else "stop".
TEMPERATURE and SEED are validated as tiny_lm validates them, and otherwise ignored: an echo
is deterministic.
"""

from __future__ import annotations

# Before numpy, as in tiny_lm: the utils module put the venv's site-packages on sys.path.
try:  # Only present inside the Triton Python backend stub.
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised when imported outside Triton.
    pb_utils = None

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

# model.py of tiny_lm, next to this model in the repository. resolve() follows a symlinked
# model directory (the tests link the shipped models into repositories of their own).
TINY_LM_MODEL = Path(__file__).resolve().parents[2] / "tiny_lm" / "1" / "model.py"


def _load_tiny_lm() -> ModuleType:
    """tiny_lm's model.py as a module of its own name: its tokenizer and row helpers."""
    spec = importlib.util.spec_from_file_location("echo_lm_tiny_lm", TINY_LM_MODEL)
    if spec is None or spec.loader is None:
        raise ImportError(f"echo_lm needs tiny_lm's model.py at {TINY_LM_MODEL}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


tiny_lm = _load_tiny_lm()


@dataclass(frozen=True)
class Echo:
    """One answered row."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def echo(prompt: str, max_tokens: int) -> Echo:
    """The first min(max_tokens, n) of the prompt's n tokens, spaced as tiny_lm spaces words.

    max_tokens is clamped as tiny_lm clamps it (0 to 256).
    """
    pieces = tiny_lm.split(prompt)
    limit = min(max(int(max_tokens), 0), tiny_lm.MAX_TOKENS_CAP)
    kept = pieces[:limit]
    text = "".join(tiny_lm.piece_text(piece, index == 0) for index, piece in enumerate(kept))
    return Echo(text, len(pieces), len(kept), "length" if len(pieces) > limit else "stop")


class TritonPythonModel:
    """Triton adapter: every row of every request echoed, one response per request."""

    def initialize(self, args: dict[str, str]) -> None:
        """Nothing to build: an echo has no weights."""

    def execute(self, requests: list[Any]) -> list[Any]:
        """Answer each request; a malformed one gets its own error, as with tiny_lm."""
        rows = tiny_lm._read_rows(requests, model="echo_lm")
        responses = []
        for span in rows.spans:
            if not isinstance(span, tuple):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=span))
                continue
            start, end = span
            part = [echo(rows.prompts[i], rows.max_tokens[i]) for i in range(start, end)]
            responses.append(
                tiny_lm._response(
                    [e.text for e in part],
                    [e.prompt_tokens for e in part],
                    [e.completion_tokens for e in part],
                    [e.finish_reason for e in part],
                )
            )
        return responses

    def finalize(self) -> None:
        """Nothing to release."""
