"""The shipped tiny_lm model's own tokenizer, loaded from the model repository.

model.py imports Triton's backend utilities only when they exist, so its numpy part and its
tokenizer load here unchanged: tests compare against what the Triton node really counts.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from deploy.local.triton import DEFAULT_MODEL_REPOSITORY


def _load() -> ModuleType:
    path = DEFAULT_MODEL_REPOSITORY / "tiny_lm" / "1" / "model.py"
    spec = importlib.util.spec_from_file_location("tiny_lm_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


_MODEL = _load()


def tiny_lm_tokenize(text: str) -> list[int]:
    """The token ids tiny_lm counts as prompt tokens for `text`."""
    return list(_MODEL.tokenize(text))
