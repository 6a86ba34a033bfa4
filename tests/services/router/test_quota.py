"""The router's admission by budget and rate, against a real Valkey server."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import string

import grpc
import pytest
import redis.asyncio as redis
from google.rpc import error_details_pb2
from shepherd.common.v1 import common_pb2

from deploy.local.ports import free_port
from deploy.local.provider_sim import count_prompt_tokens
from libs.accounts import Accounts, Admission, Limits, TenantLimits
from libs.catalog import load_catalog
from libs.config import DEFAULT_CATALOG
from libs.errors import ShepherdError
from libs.server import open_redis
from services.router.config import QuotaConfig
from services.router.quota import Quota, prompt_token_bound, refusal
from services.scheduler.triton import render_prompt
from tests.support.tiny_lm import tiny_lm_tokenize

CATALOG = load_catalog(DEFAULT_CATALOG, env={})
GPT = CATALOG.resolve("gpt4")
CONFIG = QuotaConfig(fail_open=False, lease_grace_s=30.0, budget_wait_s=2.0)
ROLES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
}


def messages(*texts: str) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=t) for t in texts]


def random_text(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \n\t" + "éß漢字🙂"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200)))


def test_the_prompt_bound_is_never_below_what_a_backend_counts() -> None:
    # The worst case must really be the worst: a budget reserved below the bill could be
    # overshot. Check against both local backends' own tokenizers on adversarial text.
    rng = random.Random(7)
    for _ in range(500):
        conversation = [
            common_pb2.ChatMessage(role=rng.choice(list(ROLES)), content=random_text(rng))
            for _ in range(rng.randint(1, 6))
        ]
        bound = prompt_token_bound(conversation)
        openai_format = [{"role": ROLES[m.role], "content": m.content} for m in conversation]
        assert count_prompt_tokens(openai_format) <= bound
        tiny = render_prompt([(ROLES[m.role], m.content) for m in conversation])
        assert len(tiny_lm_tokenize(tiny)) <= bound


async def admit(quota: Quota, request_id: str, **overrides: object) -> object:
    arguments: dict[str, object] = {
        "tenant": "acme",
        "request_id": request_id,
        "fingerprint": "fp-" + request_id,
        "model": GPT,
        "messages": messages("hello"),
        "max_tokens": 100,
        "timeout_s": 10.0,
        **overrides,
    }
    return await quota.admit(**arguments)  # type: ignore[arg-type]


async def bill(accounts: Accounts, request_id: str, cost: int) -> None:
    """Billing's side: record the request admitted by `admit` at `cost`."""
    await accounts.record(
        tenant="acme",
        request_id=request_id,
        fingerprint="fp-" + request_id,
        model=GPT.name,
        deployment="d",
        prompt_tokens=5,
        completion_tokens=10,
        cost_nano=cost,
        cache_hit=False,
        now=dt.datetime.now(dt.UTC),
        retention_s=60,
    )


async def test_a_budget_refusal_names_the_budget_and_when_it_resets(client: redis.Redis) -> None:
    accounts = Accounts(client)
    worst = GPT.price.cost_nano(prompt_token_bound(messages("hello")), 100)
    await accounts.set_limits("acme", TenantLimits(overall=Limits(day_nano=worst)))
    quota = Quota(accounts, CONFIG)
    ticket = await admit(quota, "r1")
    await bill(accounts, "r1", worst - 1)
    with pytest.raises(ShepherdError) as caught:
        await admit(quota, "r2")
    error = caught.value
    assert ticket is not None and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "daily budget" in error.message and "resets at" in error.message
    quota_failure, retry = (
        next(d for d in error.details if isinstance(d, kind))
        for kind in (error_details_pb2.QuotaFailure, error_details_pb2.RetryInfo)
    )
    assert quota_failure.violations[0].subject == "tenant:acme/budget:day"
    assert 0 < retry.retry_delay.seconds <= 86_400


async def test_a_request_waits_for_reservations_in_flight_rather_than_being_refused(
    client: redis.Redis,
) -> None:
    accounts = Accounts(client)
    worst = GPT.price.cost_nano(prompt_token_bound(messages("hello")), 100)
    await accounts.set_limits("acme", TenantLimits(overall=Limits(day_nano=worst + worst // 2)))
    quota = Quota(accounts, CONFIG)
    await admit(quota, "first")
    waiting = asyncio.ensure_future(admit(quota, "second"))
    await asyncio.sleep(0.2)
    assert not waiting.done()  # the first request's reservation stands in its way
    await bill(accounts, "first", worst // 4)
    assert (await asyncio.wait_for(waiting, 2.0)).leased  # type: ignore[attr-defined]


async def test_a_failed_request_gives_its_reservation_back(client: redis.Redis) -> None:
    accounts = Accounts(client)
    quota = Quota(accounts, CONFIG)
    ticket = await admit(quota, "r1")
    await quota.release(ticket)  # type: ignore[arg-type]
    overall, _ = await accounts.period("acme", "day", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"))
    assert overall.reserved_nano == 0


@pytest.mark.parametrize(("fail_open", "expected"), [(False, "closed"), (True, "open")])
async def test_an_unreachable_accounts_store_fails_closed_unless_configured(
    fail_open: bool, expected: str
) -> None:
    client = open_redis(f"redis://127.0.0.1:{free_port()}/0", 0.25)
    quota = Quota(
        Accounts(client), QuotaConfig(fail_open=fail_open, lease_grace_s=1.0, budget_wait_s=0.0)
    )
    try:
        if expected == "closed":
            with pytest.raises(ShepherdError) as caught:
                await admit(quota, "r1")
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            assert "accounts store is unreachable" in caught.value.message
        else:
            ticket = await admit(quota, "r1")
            assert not ticket.leased  # type: ignore[attr-defined]
    finally:
        await client.aclose()


def test_rate_refusals_say_when_to_come_back() -> None:
    now = dt.datetime(2026, 11, 21, 12, tzinfo=dt.UTC)
    error = refusal(
        Admission("rpm", scope="m", limit=60, retry_after_ms=1_500), "acme", "r", GPT, 1, now
    )
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant:acme/model:gpt-4.1 may use 60 requests per minute" in error.message
    retry = next(d for d in error.details if isinstance(d, error_details_pb2.RetryInfo))
    assert retry.retry_delay.ToMilliseconds() == 1_500
    never = refusal(Admission("tpm_never", scope="t", limit=50), "acme", "r", GPT, 1, now)
    assert "lower params.max_tokens" in never.message
    assert not any(isinstance(d, error_details_pb2.RetryInfo) for d in never.details)
    conflict = refusal(Admission("conflict"), "acme", "r-9", GPT, 1, now)
    assert conflict.code == grpc.StatusCode.INVALID_ARGUMENT and "'r-9'" in conflict.message
