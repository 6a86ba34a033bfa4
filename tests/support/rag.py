"""The shipped RAG models' own code, loaded from the model repository, for tests to compare
against what the Triton node answers: embed_tiny's tokenizer and encoder, vector_search's
corpus, rag_prompt's assembly and the corpus generator.

Each model.py imports Triton's backend utilities only when they exist, so its numpy part
loads here unchanged (as tests/support/tiny_lm.py does for tiny_lm).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from deploy.local.triton import DEFAULT_MODEL_REPOSITORY

EMBEDDING_MODEL = "embed_tiny"
SEARCH_MODEL = "vector_search"
ENSEMBLE = "rag_tiny"
# The ensemble's steps in order, as its config.pbtxt wires them.
STEPS = ("rag_query", "embed_tiny", "vector_search", "rag_prompt", "tiny_lm")


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


embed_tiny = _load("test_embed_tiny", DEFAULT_MODEL_REPOSITORY / "embed_tiny" / "1" / "model.py")
vector_search = _load(
    "test_vector_search", DEFAULT_MODEL_REPOSITORY / "vector_search" / "1" / "model.py"
)
rag_prompt = _load("test_rag_prompt", DEFAULT_MODEL_REPOSITORY / "rag_prompt" / "1" / "model.py")
rag_query = _load("test_rag_query", DEFAULT_MODEL_REPOSITORY / "rag_query" / "1" / "model.py")
make_corpus = _load(
    "test_make_corpus", DEFAULT_MODEL_REPOSITORY / "vector_search" / "make_corpus.py"
)


def corpus() -> list[tuple[str, str, str]]:
    """The shipped corpus as (id, title, text), in file order."""
    return [(doc.id, doc.title, doc.text) for doc in vector_search.read_corpus()]


def first_sentence(text: str) -> str:
    """A query built from a document: its first sentence."""
    return text.split(". ")[0]


def embedding_tokens(text: str) -> int:
    """The tokens embed_tiny counts (and Shepherd bills) for `text`."""
    return len(embed_tiny.split(text))


def copy_ensemble(root: Path, name: str, generator: str) -> None:
    """rag_tiny under another name in `root`, answering with the Triton model `generator`."""
    config = (DEFAULT_MODEL_REPOSITORY / ENSEMBLE / "config.pbtxt").read_text()
    config = config.replace(f'name: "{ENSEMBLE}"', f'name: "{name}"')
    config = config.replace('model_name: "tiny_lm"', f'model_name: "{generator}"')
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(config)
