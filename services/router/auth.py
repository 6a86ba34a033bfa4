"""API keys: callers present one, the router maps it to a tenant.

Keys live in the shared key store (`libs/apikeys.py`), hashed. Operators issue, list and
revoke them with AdminService (billing's port), or issue one from a shell with
`python -m services.router.auth issue --tenant NAME`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence

import grpc
from redis.exceptions import RedisError

from libs.apikeys import KeyStore, hash_key, issue_key_at
from libs.config import redis_url
from libs.credentials import AmbiguousCredential, bearer
from libs.errors import ShepherdError
from libs.telemetry import set_tenant

# A revoked key must stop working on every router replica within 5 s (issue 7).
MAX_CACHE_TTL_S = 5.0


class Authenticator:
    """Resolves the `authorization: Bearer <key>` metadata to a tenant, and names that tenant
    on the request's span and log lines (libs/telemetry.set_tenant).

    Positive answers are remembered for `cache_ttl_s` (at most 5 s) so the hot path usually
    skips Redis; a revoked key therefore stops working on every replica within that time.
    """

    def __init__(self, keys: KeyStore, cache_ttl_s: float = 2.0) -> None:
        if not 0.0 <= cache_ttl_s <= MAX_CACHE_TTL_S:
            raise ValueError(f"cache_ttl_s must be between 0 and {MAX_CACHE_TTL_S} seconds")
        self._keys = keys
        self._cache_ttl_s = cache_ttl_s
        self._known: dict[str, tuple[str, float]] = {}

    async def tenant_for(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        try:
            key = bearer(metadata)
        except AmbiguousCredential as error:
            raise ShepherdError(grpc.StatusCode.UNAUTHENTICATED, str(error)) from None
        if not key:
            raise ShepherdError(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing API key: send metadata 'authorization: Bearer <key>'"
                " (grpcurl: -H 'authorization: Bearer <key>')",
            )
        digest = hash_key(key)
        now = time.monotonic()
        cached = self._known.get(digest)
        if cached is not None and cached[1] > now:
            set_tenant(cached[0])
            return cached[0]
        try:
            tenant = await self._keys.tenant_of(key)
        except RedisError as error:
            raise ShepherdError(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot check the API key: the key store is unreachable ({error})",
            ) from error
        if tenant is None:
            self._known.pop(digest, None)
            raise ShepherdError(
                grpc.StatusCode.UNAUTHENTICATED,
                "invalid API key: it is not registered with Shepherd, or it was revoked"
                " (issue one with AdminService/IssueKey or"
                " `python -m services.router.auth issue --tenant NAME`)",
            )
        if len(self._known) > 100_000:
            self._known.clear()  # bounded memory against a flood of distinct valid keys
        self._known[digest] = (tenant, now + self._cache_ttl_s)
        set_tenant(tenant)
        return tenant


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.router.auth")
    commands = parser.add_subparsers(dest="command", required=True)
    issue = commands.add_parser("issue", help="issue a new API key for a tenant (uses REDIS_URL)")
    issue.add_argument("--tenant", required=True)
    args = parser.parse_args(argv)
    print(asyncio.run(issue_key_at(redis_url(), args.tenant)))


if __name__ == "__main__":
    main()
