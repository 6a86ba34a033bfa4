"""The API key store in Redis, shared by the router (which checks keys) and AdminService.

A key is random (256 bits), shown once when it is issued, and stored only as its SHA-256
hash, so a leaked Redis dump reveals no usable key. The router's hot path is one HGET of
`shepherd:auth:api_keys` (hash → tenant). Each key also has a record (`shepherd:auth:key:<id>`)
with a short, non-secret prefix, its tenant and when it was issued, so operators can list
and revoke keys without ever seeing one again.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as redis

from libs.server import open_redis, text

KEYS_HASH = "shepherd:auth:api_keys"
KEY_RECORD = "shepherd:auth:key:"
KEY_IDS = "shepherd:auth:key_ids"
KEY_PREFIX = "sk-shepherd-"
SHOWN_CHARS = len(KEY_PREFIX) + 6


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(digest: str) -> str:
    """A key's public id, derived from its hash: safe to show, useless to authenticate."""
    return "key_" + digest[:16]


def valid_tenant(tenant: str) -> bool:
    """Tenant names are ASCII letters, digits, '-' and '_', so they are safe inside Redis keys."""
    return (
        bool(tenant)
        and len(tenant) <= 64
        and tenant.isascii()
        and tenant.replace("-", "").replace("_", "").isalnum()
    )


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown of an issued key."""

    key_id: str
    prefix: str
    tenant: str
    created_unix_ms: int


class KeyStore:
    """Issues, lists, revokes and resolves API keys through a Redis client made at start-up."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    async def tenant_of(self, key: str) -> str | None:
        """The tenant a presented key belongs to, or None for an unknown or revoked key."""
        tenant = await self._client.hget(KEYS_HASH, hash_key(key))
        return None if tenant is None else text(tenant)

    async def issue(self, tenant: str) -> tuple[str, KeyInfo]:
        """Create a key for `tenant`; return it (shown only now) and its public record."""
        if not valid_tenant(tenant):
            raise ValueError("tenant must be 1-64 letters, digits, '-' or '_'")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = hash_key(key)
        created_us = time.time_ns() // 1_000
        info = KeyInfo(
            key_id=key_id_of(digest),
            prefix=key[:SHOWN_CHARS],
            tenant=tenant,
            created_unix_ms=created_us // 1_000,
        )
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(KEYS_HASH, digest, tenant)
            pipe.hset(
                KEY_RECORD + info.key_id,
                mapping={
                    "digest": digest,
                    "prefix": info.prefix,
                    "tenant": tenant,
                    "created_unix_ms": info.created_unix_ms,
                },
            )
            # Ordered by microsecond, so keys issued within one millisecond still list newest
            # first (older entries scored in milliseconds sort below every newer one).
            pipe.zadd(KEY_IDS, {info.key_id: created_us})
            await pipe.execute()
        return key, info

    async def list(self, tenant: str = "") -> list[KeyInfo]:
        """Every key's public record, newest first; only `tenant`'s when given."""
        ids: list[str] = [text(i) for i in await self._client.zrevrange(KEY_IDS, 0, -1)]  # type: ignore[arg-type]
        async with self._client.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(KEY_RECORD + key_id)
            records = await pipe.execute()
        keys = []
        for key_id, record in zip(ids, records, strict=True):
            fields = {k.decode(): v.decode() for k, v in record.items()}
            if not fields or (tenant and fields["tenant"] != tenant):
                continue
            keys.append(
                KeyInfo(
                    key_id=key_id,
                    prefix=fields["prefix"],
                    tenant=fields["tenant"],
                    created_unix_ms=int(fields["created_unix_ms"]),
                )
            )
        return keys

    async def revoke(self, key_id: str) -> KeyInfo | None:
        """Revoke a key by id; None when no such key exists."""
        record = {
            text(k): text(v) for k, v in (await self._client.hgetall(KEY_RECORD + key_id)).items()
        }
        if not record:
            return None
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hdel(KEYS_HASH, record["digest"])
            pipe.delete(KEY_RECORD + key_id)
            pipe.zrem(KEY_IDS, key_id)
            await pipe.execute()
        return KeyInfo(
            key_id=key_id,
            prefix=record["prefix"],
            tenant=record["tenant"],
            created_unix_ms=int(record["created_unix_ms"]),
        )


async def issue_key_at(url: str, tenant: str) -> str:
    """Issue a key through a short-lived connection (operators' CLI and the local launcher)."""
    client = open_redis(url, 5.0)
    try:
        key, _ = await KeyStore(client).issue(tenant)
        return key
    finally:
        await client.aclose()
