"""API keys: callers present one, the router maps it to a tenant.

Keys are stored only as SHA-256 hashes in a Redis hash shared by every router replica, so a
leaked Redis dump reveals no usable key. A key is random (256 bits) and shown once, when it
is issued. Run `python -m services.router.auth issue --tenant NAME` to issue one.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
import time
from collections.abc import Sequence

import grpc
import redis.asyncio as redis
from redis.exceptions import RedisError

from libs.config import redis_url
from libs.errors import ShepherdError
from libs.server import open_redis

KEYS_HASH = "shepherd:auth:api_keys"
KEY_PREFIX = "sk-shepherd-"


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


async def issue_key(client: redis.Redis, tenant: str) -> str:
    """Create a new key for `tenant`, store its hash, and return the key (shown only now)."""
    if not tenant or not tenant.replace("-", "").replace("_", "").isalnum():
        raise ValueError("tenant must be letters, digits, '-' or '_'")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    await client.hset(KEYS_HASH, hash_key(key), tenant)
    return key


class Authenticator:
    """Resolves the `authorization: Bearer <key>` metadata to a tenant.

    Positive answers are remembered for a short time so the hot path usually skips Redis; a
    revoked key therefore stops working within `cache_ttl_s`.
    """

    def __init__(self, client: redis.Redis, cache_ttl_s: float = 10.0) -> None:
        self._client = client
        self._cache_ttl_s = cache_ttl_s
        self._known: dict[str, tuple[str, float]] = {}

    async def tenant_for(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        header = ""
        for name, value in metadata or ():
            if name == "authorization" and isinstance(value, str):
                header = value
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ShepherdError(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing API key: send metadata 'authorization: Bearer <key>'"
                " (grpcurl: -H 'authorization: Bearer <key>')",
            )
        digest = hash_key(key.strip())
        now = time.monotonic()
        cached = self._known.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            tenant = await self._client.hget(KEYS_HASH, digest)
        except RedisError as error:
            raise ShepherdError(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot check the API key: the key store is unreachable ({error})",
            ) from error
        if tenant is None:
            raise ShepherdError(
                grpc.StatusCode.UNAUTHENTICATED,
                "invalid API key: it is not registered with Shepherd"
                " (issue one with `python -m services.router.auth issue --tenant NAME`)",
            )
        name = tenant.decode()
        self._known[digest] = (name, now + self._cache_ttl_s)
        return name


async def issue_key_at(url: str, tenant: str) -> str:
    """Issue a key through a short-lived connection (operators' CLI and the local launcher)."""
    client = open_redis(url, 5.0)
    try:
        return await issue_key(client, tenant)
    finally:
        await client.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.router.auth")
    commands = parser.add_subparsers(dest="command", required=True)
    issue = commands.add_parser("issue", help="issue a new API key for a tenant (uses REDIS_URL)")
    issue.add_argument("--tenant", required=True)
    args = parser.parse_args(argv)
    print(asyncio.run(issue_key_at(redis_url(), args.tenant)))


if __name__ == "__main__":
    main()
