"""Cache keys and the policy that decides which requests may be cached.

A key is the model family plus the SHA-256 of the canonical request: the messages and the
generation parameters serialised as JSON with sorted keys and no whitespace, so two requests
that mean the same thing produce the same key whichever service or language built them.
Models in one family share answers, as in the seed's "shared KV cache".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from shepherd.common.v1 import common_pb2

KEY_PREFIX = "shepherd:cache:v1"


def is_cacheable(policy: int, params: common_pb2.GenerationParams) -> bool:
    """Whether a request may be answered from, or stored in, the cache."""
    if policy == common_pb2.CACHE_POLICY_BYPASS:
        return False
    if policy == common_pb2.CACHE_POLICY_ALWAYS:
        return True
    return params.temperature == 0.0


def canonical_request(
    messages: Sequence[common_pb2.ChatMessage], params: common_pb2.GenerationParams
) -> bytes:
    """The bytes that identify a request: everything that can change the answer, nothing else."""
    body = {
        "messages": [[common_pb2.Role.Name(m.role), m.content] for m in messages],
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": params.seed if params.HasField("seed") else None,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def cache_key(
    family: str,
    messages: Sequence[common_pb2.ChatMessage],
    params: common_pb2.GenerationParams,
) -> str:
    """The Redis key for a request's answer within its model family."""
    digest = hashlib.sha256(canonical_request(messages, params)).hexdigest()
    return f"{KEY_PREFIX}:{family}:{digest}"
