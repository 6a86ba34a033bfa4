"""API keys against a real Valkey server: issued once, stored hashed, mapped to a tenant."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest
import redis.asyncio as redis

from deploy.local.ports import free_port
from libs.apikeys import KEY_PREFIX, KEYS_HASH, KeyStore
from libs.credentials import INTERNAL_TOKEN_HEADER, Access, Credentials, check_access
from libs.errors import ShepherdError
from libs.server import open_redis
from services.router.auth import Authenticator


async def issue_key(client: redis.Redis, tenant: str) -> str:
    key, _ = await KeyStore(client).issue(tenant)
    return key


def bearer(key: str) -> list[tuple[str, str]]:
    return [("user-agent", "grpc-python"), ("authorization", f"Bearer {key}")]


async def test_issued_key_maps_to_its_tenant(client: redis.Redis) -> None:
    acme_key = await issue_key(client, "acme")
    globex_key = await issue_key(client, "globex_2")
    auth = Authenticator(KeyStore(client))

    assert acme_key.startswith(KEY_PREFIX)
    assert acme_key != globex_key
    assert await auth.tenant_for(bearer(acme_key)) == "acme"
    assert await auth.tenant_for(bearer(globex_key)) == "globex_2"
    assert await auth.tenant_for([("authorization", f"bearer {acme_key}")]) == "acme"


async def test_only_the_hash_is_stored(client: redis.Redis) -> None:
    key = await issue_key(client, "acme")

    stored = await client.hgetall(KEYS_HASH)
    assert stored == {hashlib.sha256(key.encode()).hexdigest().encode(): b"acme"}
    secret = key.removeprefix(KEY_PREFIX).encode()
    for name in await client.keys("*"):
        assert secret not in name
        dump = await client.dump(name)
        assert dump is not None and secret not in dump


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param(None, id="no-metadata"),
        pytest.param([], id="empty-metadata"),
        pytest.param([("x-api-key", "sk-shepherd-abc")], id="other-header"),
        pytest.param([("authorization", "")], id="empty-header"),
        pytest.param([("authorization", "Bearer")], id="scheme-only"),
        pytest.param([("authorization", "Bearer    ")], id="blank-key"),
        pytest.param([("authorization", "Basic dXNlcjpwYXNz")], id="basic-scheme"),
        pytest.param([("authorization", "sk-shepherd-abc")], id="no-scheme"),
    ],
)
async def test_missing_or_malformed_header_is_unauthenticated(
    client: redis.Redis, metadata: list[tuple[str, str]] | None
) -> None:
    with pytest.raises(ShepherdError) as caught:
        await Authenticator(KeyStore(client)).tenant_for(metadata)

    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <key>" in caught.value.message


async def test_unknown_key_is_unauthenticated_and_says_how_to_get_one(
    client: redis.Redis,
) -> None:
    await issue_key(client, "acme")

    with pytest.raises(ShepherdError) as caught:
        await Authenticator(KeyStore(client)).tenant_for(bearer("sk-shepherd-not-a-real-key"))

    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "not registered" in caught.value.message
    assert "python -m services.router.auth issue --tenant" in caught.value.message
    assert "sk-shepherd-not-a-real-key" not in caught.value.message


async def test_revoked_key_stops_working_after_the_cache_ttl(client: redis.Redis) -> None:
    key = await issue_key(client, "acme")
    keys = KeyStore(client)
    auth = Authenticator(keys, cache_ttl_s=0.0)
    assert await auth.tenant_for(bearer(key)) == "acme"

    (info,) = await keys.list("acme")
    assert hashlib.sha256(key.encode()).hexdigest().startswith(info.key_id.removeprefix("key_"))
    assert await keys.revoke(info.key_id) == info

    with pytest.raises(ShepherdError) as caught:
        await auth.tenant_for(bearer(key))
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_unreachable_key_store_is_unavailable_not_unauthenticated() -> None:
    client = open_redis(f"redis://127.0.0.1:{free_port()}/0", 0.25)
    try:
        with pytest.raises(ShepherdError) as caught:
            await Authenticator(KeyStore(client)).tenant_for(bearer("sk-shepherd-whatever"))
    finally:
        await client.aclose()

    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "key store is unreachable" in caught.value.message


@pytest.mark.parametrize("tenant", ["", "acme corp", "a/b", "x:y"])
async def test_issue_key_rejects_bad_tenant_names(client: redis.Redis, tenant: str) -> None:
    with pytest.raises(ValueError, match="tenant"):
        await issue_key(client, tenant)
    assert await client.hlen(KEYS_HASH) == 0


async def test_keys_are_listed_by_prefix_and_tenant_never_by_secret(client: redis.Redis) -> None:
    keys = KeyStore(client)
    first, first_info = await keys.issue("acme")
    second, _ = await keys.issue("globex")
    third, third_info = await keys.issue("acme")

    listed = await keys.list("acme")
    assert [k.key_id for k in listed] == [third_info.key_id, first_info.key_id]
    assert all(k.tenant == "acme" for k in listed)
    assert first.startswith(first_info.prefix) and len(first_info.prefix) < len(first) // 2
    assert {k.tenant for k in await keys.list()} == {"acme", "globex"}
    for info in await keys.list():
        assert all(secret not in repr(info) for secret in (first, second, third))


async def test_a_revoked_key_is_refused_once_the_short_cache_lapses(client: redis.Redis) -> None:
    keys = KeyStore(client)
    key, info = await keys.issue("acme")
    auth = Authenticator(keys, cache_ttl_s=0.2)
    assert await auth.tenant_for(bearer(key)) == "acme"
    await keys.revoke(info.key_id)
    assert await auth.tenant_for(bearer(key)) == "acme"  # still cached, for at most 0.2 s
    await asyncio.sleep(0.25)
    with pytest.raises(ShepherdError) as caught:
        await auth.tenant_for(bearer(key))
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in caught.value.message
    assert await keys.revoke(info.key_id) is None


def test_the_key_cache_can_never_outlast_five_seconds(client: redis.Redis) -> None:
    with pytest.raises(ValueError, match="5"):
        Authenticator(KeyStore(client), cache_ttl_s=6.0)


async def test_two_authorization_entries_are_refused_whatever_their_order(
    client: redis.Redis,
) -> None:
    keys = KeyStore(client)
    key, _ = await keys.issue("acme")
    other, _ = await keys.issue("globex")
    authenticator = Authenticator(keys)
    for metadata in (bearer(key) + bearer(other), bearer(other) + bearer(key)):
        with pytest.raises(ShepherdError) as caught:
            await authenticator.tenant_for(metadata)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "send one 'authorization' metadata entry, not 2" in caught.value.message


def test_an_internal_call_with_two_service_tokens_is_refused() -> None:
    credentials = Credentials(internal_tokens=("token-a", "token-b"))
    metadata = [(INTERNAL_TOKEN_HEADER, "token-a"), (INTERNAL_TOKEN_HEADER, "forged")]

    refusal = check_access(credentials, Access.INTERNAL, metadata)

    assert refusal is not None
    assert refusal[0] == grpc.StatusCode.UNAUTHENTICATED
    assert f"send one '{INTERNAL_TOKEN_HEADER}' metadata entry, not 2" in refusal[1]
    assert check_access(credentials, Access.INTERNAL, metadata[:1]) is None
