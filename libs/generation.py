"""What a valid request for a model looks like, checked by every service that receives one.

The router checks a caller's request; the scheduler checks the router's again, because an
internal caller can be wrong too, and one bad row must never reach a backend batch where it
could fail its batch-mates (a NaN temperature once failed five legitimate requests with
INTERNAL). One set of rules, here, so the two services cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from shepherd.common.v1 import common_pb2

from libs.catalog import Model

Violation = tuple[str, str]

ROLES = (common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT)
PRIORITIES = frozenset(common_pb2.Priority.values())
CACHE_POLICIES = frozenset(common_pb2.CachePolicy.values())
# An Embed request's inputs: each is one row of the embedding model's batches.
MAX_EMBEDDING_INPUTS = 256
MAX_EMBEDDING_INPUT_CHARS = 100_000


def message_violations(messages: Iterable[common_pb2.ChatMessage]) -> list[Violation]:
    """Every message needs a known role."""
    return [
        (f"messages[{index}].role", "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
        for index, message in enumerate(messages)
        if message.role not in ROLES
    ]


def params_violations(
    params: common_pb2.GenerationParams, model: Model, *, resolved: bool
) -> list[Violation]:
    """The sampling parameters' bounds; `resolved` requests (the scheduler's) need max_tokens."""
    violations: list[Violation] = []
    low = 1 if resolved else 0
    if not low <= params.max_tokens <= model.max_output_tokens:
        default = "" if resolved else " (0 uses the model's default)"
        violations.append(
            (
                "params.max_tokens",
                f"must be between 1 and {model.max_output_tokens} for {model.name}{default}",
            )
        )
    violations.extend(sampling_violations(params))
    return violations


def sampling_violations(params: common_pb2.GenerationParams) -> list[Violation]:
    """Temperature and top_p: finite and in range (NaN must never reach a batch or a key)."""
    violations: list[Violation] = []
    if not math.isfinite(params.temperature) or not 0.0 <= params.temperature <= 2.0:
        violations.append(("params.temperature", "must be between 0 and 2"))
    if not math.isfinite(params.top_p) or not 0.0 <= params.top_p <= 1.0:
        violations.append(("params.top_p", "must be in (0, 1], or 0 for the default"))
    return violations


def priority_violations(priority: int) -> list[Violation]:
    """An unknown priority is refused rather than read as some default."""
    if priority in PRIORITIES:
        return []
    return [("priority", "must be PRIORITY_LOW, PRIORITY_NORMAL or PRIORITY_HIGH (or unset)")]


def cache_policy_violations(policy: int, field: str = "cache_policy") -> list[Violation]:
    """An unknown cache policy is refused rather than read as some default.

    `field` names it as the caller's message does (the cache's LookupRequest says `policy`).
    """
    if policy in CACHE_POLICIES:
        return []
    return [
        (
            field,
            "must be CACHE_POLICY_AUTO, CACHE_POLICY_BYPASS or CACHE_POLICY_ALWAYS (or unset)",
        )
    ]


def embedding_violations(inputs: Sequence[str]) -> list[Violation]:
    """An Embed request's inputs: at least one, not too many, each with some text to embed."""
    violations: list[Violation] = []
    if not inputs:
        violations.append(("inputs", "at least one input is required"))
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        violations.append(("inputs", f"at most {MAX_EMBEDDING_INPUTS} inputs are allowed"))
    for index, text in enumerate(inputs[:MAX_EMBEDDING_INPUTS]):
        if not text.strip():
            violations.append((f"inputs[{index}]", "must hold some text, not only whitespace"))
        elif len(text) > MAX_EMBEDDING_INPUT_CHARS:
            violations.append(
                (f"inputs[{index}]", f"must be at most {MAX_EMBEDDING_INPUT_CHARS} characters")
            )
    return violations


def task_violations(model: Model, task: str) -> list[Violation]:
    """A chat call needs a chat model and Embed an embedding model."""
    if model.task == task:
        return []
    if model.task == "embedding":
        return [("model", f"{model.name} is an embedding model: it answers Embed only")]
    return [("model", f"{model.name} is a chat model: it does not answer Embed")]
