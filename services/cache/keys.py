"""Cache keys, and the policy that decides which requests may be cached.

A key is the cache namespace, the model family and the SHA-256 of the canonical request
(`libs/fingerprint.py`). The namespace is what keeps one tenant's answers from another:
`tenant:<name>` by default, `group:<name>` for tenants the catalog puts in one cache group,
and `shared` only for a model family whose catalog entry says `cache_scope: shared` (the
seeds' "shared inference", switched on explicitly).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from shepherd.common.v1 import common_pb2

from libs.catalog import Catalog
from libs.fingerprint import canonical_request

KEY_PREFIX = "shepherd:cache:v2"
SHARED = "shared"


def namespace(catalog: Catalog, tenant: str, family: str) -> str:
    """Whose answers a tenant may read and write in a model family."""
    if catalog.family_cache_scope(family) == "shared":
        return SHARED
    return catalog.tenant(tenant).cache_namespace


def cache_key(
    space: str,
    family: str,
    messages: Sequence[common_pb2.ChatMessage],
    params: common_pb2.GenerationParams,
) -> str:
    """The Redis key for a request's answer within a namespace and model family."""
    digest = hashlib.sha256(canonical_request(messages, params)).hexdigest()
    return f"{KEY_PREFIX}:{space}:{family}:{digest}"


def key_namespace(key: str) -> tuple[str, str] | None:
    """The (namespace, family) a key belongs to, or None when it is not a cache key."""
    if not key.startswith(KEY_PREFIX + ":"):
        return None
    parts = key[len(KEY_PREFIX) + 1 :].split(":")
    if len(parts) == 3 and parts[0] == SHARED:
        return SHARED, parts[1]
    if len(parts) == 4 and parts[0] in ("tenant", "group"):
        return f"{parts[0]}:{parts[1]}", parts[2]
    return None
