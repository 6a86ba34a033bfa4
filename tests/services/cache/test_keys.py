"""Cache keys identify a request's meaning; the policy decides what may be cached."""

from __future__ import annotations

import pytest
from shepherd.common.v1 import common_pb2

from libs.catalog import parse_catalog
from libs.fingerprint import canonical_request, is_cacheable, request_fingerprint
from services.cache.keys import KEY_PREFIX, cache_key, key_namespace, namespace

SYSTEM = common_pb2.ROLE_SYSTEM
USER = common_pb2.ROLE_USER
ASSISTANT = common_pb2.ROLE_ASSISTANT


def messages(*turns: tuple[int, str]) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=role, content=content) for role, content in turns]


BASE_MESSAGES = messages((SYSTEM, "Be brief."), (USER, "How many sheep?"))


def params(**fields: float | int) -> common_pb2.GenerationParams:
    return common_pb2.GenerationParams(**{"max_tokens": 64, **fields})  # type: ignore[arg-type]


def cache_key_of(
    family: str, msgs: object, gen: common_pb2.GenerationParams, space: str = "tenant:acme"
) -> str:
    return cache_key(space, family, msgs, gen)  # type: ignore[arg-type]


def test_key_is_prefixed_with_namespace_family_and_sha256() -> None:
    key = cache_key_of("gpt-4.1", BASE_MESSAGES, params())

    prefix, digest = key.rsplit(":", 1)
    assert prefix == f"{KEY_PREFIX}:tenant:acme:gpt-4.1"
    assert key_namespace(key) == ("tenant:acme", "gpt-4.1")
    assert len(digest) == 64
    int(digest, 16)


def test_key_is_stable_across_calls_and_separately_built_requests() -> None:
    first = cache_key_of("gpt-4.1", BASE_MESSAGES, params(temperature=0.0, top_p=0.9, seed=7))
    again = cache_key_of(
        "gpt-4.1",
        [
            common_pb2.ChatMessage(content="Be brief.", role=SYSTEM),
            common_pb2.ChatMessage(content="How many sheep?", role=USER),
        ],
        common_pb2.GenerationParams(seed=7, top_p=0.9, max_tokens=64),
    )
    assert first == again
    assert first == cache_key_of("gpt-4.1", tuple(BASE_MESSAGES), params(top_p=0.9, seed=7))


def test_key_is_pinned_to_the_canonical_json() -> None:
    # Other services (and languages) build the same key, so the canonical form is a contract.
    body = canonical_request(messages((USER, "héllo")), params(temperature=0.5))
    assert (
        body
        == (
            '{"max_tokens":64,"messages":[["ROLE_USER","héllo"]],"seed":null,'
            '"temperature":0.5,"top_p":0.0}'
        ).encode()
    )


@pytest.mark.parametrize(
    ("family", "msgs", "gen"),
    [
        pytest.param("deepseek-v3.2", BASE_MESSAGES, params(), id="family"),
        pytest.param(
            "gpt-4.1",
            messages((SYSTEM, "Be brief."), (USER, "How many goats?")),
            params(),
            id="content",
        ),
        pytest.param(
            "gpt-4.1",
            messages((SYSTEM, "Be brief."), (ASSISTANT, "How many sheep?")),
            params(),
            id="role",
        ),
        pytest.param(
            "gpt-4.1",
            messages((USER, "How many sheep?"), (SYSTEM, "Be brief.")),
            params(),
            id="order",
        ),
        pytest.param("gpt-4.1", BASE_MESSAGES[:1], params(), id="fewer-messages"),
        pytest.param(
            "gpt-4.1",
            messages((SYSTEM, "Be brief.How many sheep?")),
            params(),
            id="joined-content",
        ),
        pytest.param("gpt-4.1", BASE_MESSAGES, params(max_tokens=65), id="max_tokens"),
        pytest.param("gpt-4.1", BASE_MESSAGES, params(temperature=0.7), id="temperature"),
        pytest.param("gpt-4.1", BASE_MESSAGES, params(top_p=0.5), id="top_p"),
        pytest.param("gpt-4.1", BASE_MESSAGES, params(seed=1), id="seed-set"),
        pytest.param("gpt-4.1", BASE_MESSAGES, params(seed=0), id="seed-zero-vs-unset"),
    ],
)
def test_key_changes_with_anything_that_changes_the_answer(
    family: str, msgs: list[common_pb2.ChatMessage], gen: common_pb2.GenerationParams
) -> None:
    assert cache_key_of(family, msgs, gen) != cache_key_of("gpt-4.1", BASE_MESSAGES, params())


@pytest.mark.parametrize(
    ("policy", "temperature", "expected"),
    [
        (common_pb2.CACHE_POLICY_AUTO, 0.0, True),
        (common_pb2.CACHE_POLICY_AUTO, 0.7, False),
        (common_pb2.CACHE_POLICY_AUTO, 1e-9, False),
        (common_pb2.CACHE_POLICY_UNSPECIFIED, 0.0, True),
        (common_pb2.CACHE_POLICY_UNSPECIFIED, 1.0, False),
        (common_pb2.CACHE_POLICY_BYPASS, 0.0, False),
        (common_pb2.CACHE_POLICY_BYPASS, 1.0, False),
        (common_pb2.CACHE_POLICY_ALWAYS, 0.0, True),
        (common_pb2.CACHE_POLICY_ALWAYS, 1.3, True),
    ],
)
def test_is_cacheable(policy: int, temperature: float, expected: bool) -> None:
    assert is_cacheable(policy, params(temperature=temperature)) is expected


CATALOG = parse_catalog(
    {
        "providers": {"p": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "K"}},
        "tenants": {"team-a": {"cache_group": "corp"}, "team-b": {"cache_group": "corp"}},
        "models": {
            "private": {
                "price": {"input_usd_per_million": "1", "output_usd_per_million": "1"},
                "deployments": [{"kind": "hosted", "provider": "p", "model": "m"}],
            },
            "public": {
                "cache_scope": "shared",
                "price": {"input_usd_per_million": "1", "output_usd_per_million": "1"},
                "deployments": [{"kind": "hosted", "provider": "p", "model": "m"}],
            },
        },
    },
    env={},
)


def test_answers_are_private_to_a_tenant_unless_grouped_or_shared() -> None:
    assert namespace(CATALOG, "acme", "private") == "tenant:acme"
    assert namespace(CATALOG, "globex", "private") == "tenant:globex"
    assert namespace(CATALOG, "team-a", "private") == namespace(CATALOG, "team-b", "private")
    assert namespace(CATALOG, "team-a", "private") == "group:corp"
    assert namespace(CATALOG, "acme", "public") == namespace(CATALOG, "globex", "public")
    acme = cache_key_of("private", BASE_MESSAGES, params(), namespace(CATALOG, "acme", "private"))
    globex = cache_key_of(
        "private", BASE_MESSAGES, params(), namespace(CATALOG, "globex", "private")
    )
    assert acme != globex


@pytest.mark.parametrize(
    "key",
    [
        "",
        "shepherd:cache:v1:gpt-4.1:abc",
        f"{KEY_PREFIX}:tenant:acme:abc",
        f"{KEY_PREFIX}:other:acme:gpt-4.1:abc",
        f"{KEY_PREFIX}:shared:gpt-4.1:extra:abc",
    ],
)
def test_keys_not_made_by_cache_key_have_no_namespace(key: str) -> None:
    assert key_namespace(key) is None


def test_fingerprint_covers_the_model_and_the_request() -> None:
    base = request_fingerprint("gpt-4.1", BASE_MESSAGES, params())
    assert base == request_fingerprint("gpt-4.1", list(BASE_MESSAGES), params())
    assert base != request_fingerprint("gpt-4.1-mini", BASE_MESSAGES, params())
    assert base != request_fingerprint("gpt-4.1", BASE_MESSAGES, params(max_tokens=1))
