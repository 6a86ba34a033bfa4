"""What identifies a chat request: its canonical bytes, and the fingerprint made from them.

Two requests that mean the same thing must produce the same bytes whichever service or
language built them: the messages and the generation parameters, serialised as JSON with
sorted keys and no whitespace. The cache keys answers by them (within a model family), and
the ledger uses the fingerprint (within a model) to tell a retry of a request from a new
request that reuses its id. `is_cacheable` is the cache policy: the router asks it to skip the
cache hop for a request the cache would not answer, and the cache applies it to its input.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from shepherd.common.v1 import common_pb2


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


def request_fingerprint(
    model: str,
    messages: Sequence[common_pb2.ChatMessage],
    params: common_pb2.GenerationParams,
) -> str:
    """SHA-256, in hex, of the canonical model name and request."""
    digest = hashlib.sha256(model.encode())
    digest.update(b"\n")
    digest.update(canonical_request(messages, params))
    return digest.hexdigest()


def is_cacheable(policy: int, params: common_pb2.GenerationParams) -> bool:
    """Whether a request may be answered from, or stored in, the cache."""
    if policy == common_pb2.CACHE_POLICY_BYPASS:
        return False
    if policy == common_pb2.CACHE_POLICY_ALWAYS:
        return True
    # Deterministic work only: greedy decoding, or sampling with a seed the caller fixed.
    return params.temperature == 0.0 or params.HasField("seed")
