"""Tenants and money, end to end through a real mesh with several router replicas.

What a tenant, an operator and an attacker on the internal network would each see: request
ids and cached answers scoped by tenant, budgets never overshot under concurrency (also when
a router dies mid-load), rate limits exact across replicas, keys revoked everywhere within
seconds, and internal ports closed to callers without the service token.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from shepherd.billing.v1 import admin_pb2, admin_pb2_grpc, billing_pb2, billing_pb2_grpc
from shepherd.cache.v1 import cache_pb2, cache_pb2_grpc
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2, router_pb2_grpc
from shepherd.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from deploy.local.launcher import LocalMesh, Replica
from deploy.local.ports import free_port
from deploy.local.processes import stop
from libs.credentials import INTERNAL_TOKEN_HEADER
from libs.errors import unpack_details
from services.router.quota import prompt_token_bound
from tests.integration.conftest import Metadata, tenant_totals
from tests.integration.test_mesh import CATALOG, GRPCURL, auth, chat_request, grpcurl
from tests.support.catalog import GROUP_TENANTS, SHARED_MODEL, SOVEREIGN_HOSTED, SOVEREIGN_LOCAL

TIMEOUT_S = 30.0
# Budget requests: gpt-4.1 on the simulator, whose answers run past 10 tokens, so each one
# generates exactly max_tokens and every request costs the same.
BUDGET_MODEL = "gpt4"
BUDGET_MAX_TOKENS = 10


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def details_of(error: grpc.RpcError) -> list[object]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    return list(unpack_details(status)) if status else []


def rpc_error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value


@pytest.fixture(scope="module")
def admin(mesh: LocalMesh) -> Iterator[admin_pb2_grpc.AdminServiceStub]:
    with grpc.insecure_channel(mesh.address("billing")) as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel)


@pytest.fixture(scope="module")
def replicas(mesh: LocalMesh) -> list[Replica]:
    """Two more router replicas: with the mesh's own router, three share one Redis."""
    return [mesh.add_router(), mesh.add_router()]


@pytest.fixture(scope="module")
def router_addresses(mesh: LocalMesh, replicas: list[Replica]) -> list[str]:
    return [mesh.address("router"), *(r.address for r in replicas)]


def new_tenant(admin: admin_pb2_grpc.AdminServiceStub, admin_md: Metadata, name: str) -> str:
    """Issue a key through AdminService, as an operator would."""
    issued = admin.IssueKey(admin_pb2.IssueKeyRequest(tenant=name), metadata=admin_md, timeout=5)
    assert issued.info.tenant == name and issued.key.startswith(issued.info.prefix)
    return issued.key


def set_limits(
    admin: admin_pb2_grpc.AdminServiceStub,
    admin_md: Metadata,
    tenant: str,
    overall: admin_pb2.Limits | None = None,
    models: Sequence[admin_pb2.ModelLimits] = (),
) -> None:
    admin.SetTenantLimits(
        admin_pb2.SetTenantLimitsRequest(
            tenant=tenant, limits=admin_pb2.TenantLimits(overall=overall, models=models)
        ),
        metadata=admin_md,
        timeout=5,
    )


def standing(
    admin: admin_pb2_grpc.AdminServiceStub, admin_md: Metadata, tenant: str
) -> admin_pb2.GetTenantLimitsResponse:
    return admin.GetTenantLimits(
        admin_pb2.GetTenantLimitsRequest(tenant=tenant), metadata=admin_md, timeout=5
    )


def ledger_cost(
    billing: billing_pb2_grpc.BillingServiceStub, admin_md: Metadata, tenant: str
) -> int:
    return tenant_totals(billing, admin_md, tenant).cost.nano_usd


# -- isolation ---------------------------------------------------------------------------------


def test_a_request_id_belongs_to_its_tenant(
    router: router_pb2_grpc.RouterServiceStub,
    billing: billing_pb2_grpc.BillingServiceStub,
    admin: admin_pb2_grpc.AdminServiceStub,
    admin_md: Metadata,
) -> None:
    acme, globex = unique("acme"), unique("globex")
    acme_key, globex_key = (new_tenant(admin, admin_md, t) for t in (acme, globex))
    request_id = unique("shared-id")

    first = chat_request("deepseek", "acme's question", max_tokens=8)
    first.request_id = request_id
    acme_answer = router.Chat(first, metadata=auth(acme_key), timeout=TIMEOUT_S)
    # globex sends another prompt under the same id: its own request, billed to it in full,
    # not acme's cost echoed back.
    second = chat_request(
        "deepseek", "globex asks something much longer than acme did", max_tokens=8
    )
    second.request_id = request_id
    globex_answer = router.Chat(second, metadata=auth(globex_key), timeout=TIMEOUT_S)

    assert globex_answer.text != acme_answer.text
    assert globex_answer.usage.prompt_tokens > acme_answer.usage.prompt_tokens
    assert globex_answer.cost.nano_usd > acme_answer.cost.nano_usd > 0
    assert ledger_cost(billing, admin_md, acme) == acme_answer.cost.nano_usd
    assert ledger_cost(billing, admin_md, globex) == globex_answer.cost.nano_usd


def test_one_id_for_different_prompts_is_refused_not_billed_once(
    router: router_pb2_grpc.RouterServiceStub,
    billing: billing_pb2_grpc.BillingServiceStub,
    admin: admin_pb2_grpc.AdminServiceStub,
    admin_md: Metadata,
) -> None:
    tenant = unique("reuser")
    key = new_tenant(admin, admin_md, tenant)
    request_id = unique("one-id")
    answers, errors = [], []
    for prompt in ("first prompt", "second prompt", "third prompt"):
        request = chat_request("deepseek", prompt, max_tokens=8)
        request.request_id = request_id
        try:
            answers.append(router.Chat(request, metadata=auth(key), timeout=TIMEOUT_S))
        except grpc.RpcError as error:
            errors.append(error)

    assert len(answers) == 1 and len(errors) == 2
    for error in errors:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id" in error.details() and "different request" in error.details()
        (bad,) = details_of(error)
        assert isinstance(bad, error_details_pb2.BadRequest)
        assert bad.field_violations[0].field == "request_id"
    # The retry of the one accepted request is still answered, and billed once.
    retry = chat_request("deepseek", "first prompt", max_tokens=8)
    retry.request_id = request_id
    assert router.Chat(retry, metadata=auth(key), timeout=TIMEOUT_S).cost == answers[0].cost
    assert ledger_cost(billing, admin_md, tenant) == answers[0].cost.nano_usd


def test_cached_answers_are_private_to_a_tenant_unless_the_catalog_shares_them(
    router: router_pb2_grpc.RouterServiceStub,
    admin: admin_pb2_grpc.AdminServiceStub,
    admin_md: Metadata,
) -> None:
    acme_key = new_tenant(admin, admin_md, unique("acme"))
    dev_key = new_tenant(admin, admin_md, unique("dev"))
    prompt = f"private question {uuid.uuid4().hex}"

    def hit(model: str, key: str) -> bool:
        request = chat_request(model, prompt)
        return router.Chat(request, metadata=auth(key), timeout=TIMEOUT_S).cache_hit

    assert not hit("tiny", dev_key)
    assert not hit("tiny", acme_key)  # dev's answer is not acme's
    assert hit("tiny", acme_key) and hit("tiny", dev_key)  # each has its own now
    # A family the catalog marks cache_scope: shared is shared by every tenant.
    assert not hit(SHARED_MODEL, dev_key)
    assert hit(SHARED_MODEL, acme_key)
    # Tenants of one cache group share with each other, and with nobody else.
    group_keys = [new_tenant(admin, admin_md, name) for name in GROUP_TENANTS]
    assert not hit("tiny", group_keys[0])
    assert hit("tiny", group_keys[1])


def test_a_self_hosted_only_request_is_never_answered_from_a_hosted_answer(
    router: router_pb2_grpc.RouterServiceStub,
    admin: admin_pb2_grpc.AdminServiceStub,
    admin_md: Metadata,
) -> None:
    key = new_tenant(admin, admin_md, unique("careful"))
    prompt = f"patient record {uuid.uuid4().hex}"

    def ask(model: str, self_hosted_only: bool) -> router_pb2.ChatResponse:
        request = chat_request(model, prompt, max_tokens=8)
        request.self_hosted_only = self_hosted_only
        return router.Chat(request, metadata=auth(key), timeout=TIMEOUT_S)

    hosted = ask(SOVEREIGN_HOSTED, False)
    assert hosted.placement.kind == common_pb2.BACKEND_KIND_HOSTED
    # The two models share a family, so the hosted answer is cached for the local one too...
    shared = ask(SOVEREIGN_LOCAL, False)
    assert shared.cache_hit and shared.placement.kind == common_pb2.BACKEND_KIND_HOSTED
    # ...but never for a request that must stay on self-hosted nodes. For the hosted-only
    # model that means FAILED_PRECONDITION, although its answer is in the cache...
    error = rpc_error(lambda: ask(SOVEREIGN_HOSTED, True))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    # ...and for the local model it means running on Triton instead of the cached answer.
    local = ask(SOVEREIGN_LOCAL, True)
    assert not local.cache_hit and local.placement.kind == common_pb2.BACKEND_KIND_TRITON


def test_an_answer_computed_while_billing_is_down_is_delivered_and_billed_once_later(
    mesh: LocalMesh,
    router: router_pb2_grpc.RouterServiceStub,
    billing: billing_pb2_grpc.BillingServiceStub,
    admin: admin_pb2_grpc.AdminServiceStub,
    admin_md: Metadata,
) -> None:
    tenant = unique("unbilled")
    key = new_tenant(admin, admin_md, tenant)
    spool = mesh.config.run_dir / "spool" / unique("cut-off")
    # A router replica whose billing service cannot be reached (nothing listens there).
    broken = mesh.add_router(
        {
            "SHEPHERD_BILLING_ADDR": f"127.0.0.1:{free_port()}",
            "SHEPHERD_ROUTER_BILLING_TIMEOUT_S": "0.5",
            "SHEPHERD_ROUTER_SPOOL_DIR": str(spool),
        }
    )
    request = chat_request("tiny", f"bill me later {uuid.uuid4().hex}")
    request.request_id = unique("spooled")
    with grpc.insecure_channel(broken.address) as channel:
        answer = router_pb2_grpc.RouterServiceStub(channel).Chat(
            request, metadata=auth(key), timeout=TIMEOUT_S
        )
    # The caller has the answer and its price; the ledger does not have it yet, and the
    # request's reservation is still held, so the budget cannot be spent twice meanwhile.
    assert answer.text and answer.cost.nano_usd > 0
    assert ledger_cost(billing, admin_md, tenant) == 0
    assert standing(admin, admin_md, tenant).open_reservations == 1

    # That replica stops (billing never came back for it); a new one on the same spool
    # bills what it left, once, at the price the caller was told.
    stop(broken.process)
    mesh.add_router({"SHEPHERD_ROUTER_SPOOL_DIR": str(spool)})
    give_up = time.monotonic() + 30
    while ledger_cost(billing, admin_md, tenant) == 0:
        assert time.monotonic() < give_up, "the spooled usage never reached the ledger"
        time.sleep(0.1)
    assert ledger_cost(billing, admin_md, tenant) == answer.cost.nano_usd
    assert tenant_totals(billing, admin_md, tenant).requests == 1
    now = standing(admin, admin_md, tenant)
    assert now.open_reservations == 0
    assert all(b.reserved.nano_usd == 0 for b in now.budgets)

    # A retry of the same request is answered at the same price and not billed again.
    again = router.Chat(request, metadata=auth(key), timeout=TIMEOUT_S)
    assert again.cost == answer.cost and again.request_id == answer.request_id
    assert ledger_cost(billing, admin_md, tenant) == answer.cost.nano_usd


# -- internal authentication -----------------------------------------------------------------


def test_internal_services_refuse_calls_without_the_service_token(
    mesh: LocalMesh, admin_md: Metadata
) -> None:
    token = ((INTERNAL_TOKEN_HEADER, mesh.config.internal_token),)
    wrong = ((INTERNAL_TOKEN_HEADER, "not-the-token-0123456789abcdef"),)
    message = [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="free inference?")]
    with (
        grpc.insecure_channel(mesh.address("scheduler")) as scheduler_channel,
        grpc.insecure_channel(mesh.address("cache")) as cache_channel,
        grpc.insecure_channel(mesh.address("billing")) as billing_channel,
    ):
        scheduler = scheduler_pb2_grpc.SchedulerServiceStub(scheduler_channel)
        cache = cache_pb2_grpc.CacheServiceStub(cache_channel)
        billing = billing_pb2_grpc.BillingServiceStub(billing_channel)
        admin = admin_pb2_grpc.AdminServiceStub(billing_channel)
        calls = {
            "Infer": lambda md: scheduler.Infer(
                scheduler_pb2.InferRequest(
                    request_id="x",
                    tenant="victim",
                    model="tiny",
                    messages=message,
                    params=common_pb2.GenerationParams(max_tokens=4),
                ),
                metadata=md,
                timeout=10,
            ),
            "Store": lambda md: cache.Store(
                cache_pb2.StoreRequest(
                    key="shepherd:cache:v2:tenant:victim:fam:x", tenant="victim"
                ),
                metadata=md,
                timeout=10,
            ),
            "RecordUsage": lambda md: billing.RecordUsage(
                billing_pb2.RecordUsageRequest(
                    request_id="x", tenant="victim", model="gpt4", usage=common_pb2.Usage()
                ),
                metadata=md,
                timeout=10,
            ),
            "GetTenantUsage": lambda md: billing.GetTenantUsage(
                billing_pb2.GetTenantUsageRequest(tenant="victim"), metadata=md, timeout=10
            ),
            "IssueKey": lambda md: admin.IssueKey(
                admin_pb2.IssueKeyRequest(tenant="victim"), metadata=md, timeout=10
            ),
        }
        for name, call in calls.items():
            for metadata in ((), wrong, (("authorization", "Bearer sk-shepherd-nope-0123456789"),)):
                error = rpc_error(lambda call=call, metadata=metadata: call(metadata))
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (name, metadata)
        # The service token does not make a caller an admin.
        error = rpc_error(lambda: calls["IssueKey"](token))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "admin key" in error.details()
        # Operators read usage with the admin key; health and reflection stay open.
        assert calls["GetTenantUsage"](admin_md).tenant == "victim"
    assert "shepherd.billing.v1.AdminService" in grpcurl(mesh.address("billing"), "list").split()


def test_admin_calls_need_the_admin_key_and_an_operator_can_use_grpcurl(
    mesh: LocalMesh, router: router_pb2_grpc.RouterServiceStub
) -> None:
    billing = mesh.address("billing")
    tenant = unique("cli")
    refused = subprocess.run(
        [GRPCURL, "-plaintext", "-d", json.dumps({"tenant": tenant}), billing,
         "shepherd.billing.v1.AdminService/IssueKey"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr
    header = f"authorization: Bearer {mesh.config.admin_key}"
    issued = json.loads(
        grpcurl("-H", header, "-d", json.dumps({"tenant": tenant}), billing,
                "shepherd.billing.v1.AdminService/IssueKey")
    )  # fmt: skip
    listed = json.loads(
        grpcurl("-H", header, "-d", json.dumps({"tenant": tenant}), billing,
                "shepherd.billing.v1.AdminService/ListKeys")
    )  # fmt: skip
    assert [k["key_id"] for k in listed["keys"]] == [issued["info"]["key_id"]]
    assert issued["key"] not in json.dumps(listed)
    assert router.ListModels(
        router_pb2.ListModelsRequest(), metadata=auth(issued["key"]), timeout=5
    ).models


def test_a_revoked_key_is_refused_by_every_router_within_five_seconds(
    router_addresses: list[str], admin: admin_pb2_grpc.AdminServiceStub, admin_md: Metadata
) -> None:
    tenant = unique("leaver")
    issued = admin.IssueKey(admin_pb2.IssueKeyRequest(tenant=tenant), metadata=admin_md, timeout=5)
    channels = [grpc.insecure_channel(address) for address in router_addresses]
    try:
        stubs = [router_pb2_grpc.RouterServiceStub(channel) for channel in channels]
        for stub in stubs:  # every replica has the key in its cache now
            stub.ListModels(router_pb2.ListModelsRequest(), metadata=auth(issued.key), timeout=5)
        admin.RevokeKey(
            admin_pb2.RevokeKeyRequest(key_id=issued.info.key_id), metadata=admin_md, timeout=5
        )
        revoked_at = time.monotonic()
        refused_after: dict[int, float] = {}
        while len(refused_after) < len(stubs) and time.monotonic() - revoked_at < 10:
            for index, stub in enumerate(stubs):
                if index in refused_after:
                    continue
                try:
                    stub.ListModels(
                        router_pb2.ListModelsRequest(), metadata=auth(issued.key), timeout=5
                    )
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                    refused_after[index] = time.monotonic() - revoked_at
            time.sleep(0.05)
    finally:
        for channel in channels:
            channel.close()
    assert len(refused_after) == 3, f"still accepted by some replicas: {refused_after}"
    assert max(refused_after.values()) <= 5.0


# -- budgets -----------------------------------------------------------------------------------


async def _chat_async(
    stub: router_pb2_grpc.RouterServiceStub, key: str, n: int, timeout_s: float
) -> router_pb2.ChatResponse | grpc.aio.AioRpcError:
    request = chat_request(BUDGET_MODEL, f"budget probe {n:03d}", max_tokens=BUDGET_MAX_TOKENS)
    request.cache_policy = common_pb2.CACHE_POLICY_BYPASS
    try:
        return await stub.Chat(request, metadata=auth(key), timeout=timeout_s)
    except grpc.aio.AioRpcError as error:
        return error


def worst_case() -> int:
    """What the router reserves for one budget request: prompt bound and max_tokens, priced."""
    request = chat_request(BUDGET_MODEL, "budget probe 000")
    bound = prompt_token_bound(request.messages)
    return CATALOG.resolve(BUDGET_MODEL).price.cost_nano(bound, BUDGET_MAX_TOKENS)


def budget_tenant(
    router: router_pb2_grpc.RouterServiceStub,
    admin: admin_pb2_grpc.AdminServiceStub,
    admin_md: Metadata,
    prefix: str,
) -> tuple[str, str, int, int]:
    """A new tenant with a daily budget worth 50 budget requests and half of one more.

    Returns the tenant, its key, what one request costs (measured by another tenant) and the
    budget.
    """
    calibration = new_tenant(admin, admin_md, unique("calibrate"))
    request = chat_request(BUDGET_MODEL, "budget probe 999", max_tokens=BUDGET_MAX_TOKENS)
    request.cache_policy = common_pb2.CACHE_POLICY_BYPASS
    cost = router.Chat(request, metadata=auth(calibration), timeout=TIMEOUT_S).cost.nano_usd
    budget = 50 * cost + cost // 2
    tenant = unique(prefix)
    key = new_tenant(admin, admin_md, tenant)
    set_limits(
        admin, admin_md, tenant, admin_pb2.Limits(daily_budget=common_pb2.Money(nano_usd=budget))
    )
    return tenant, key, cost, budget


async def _load(
    addresses: Sequence[str], key: str, count: int, timeout_s: float, kill: Replica | None = None
) -> list[router_pb2.ChatResponse | grpc.aio.AioRpcError]:
    """`count` concurrent requests spread over the routers; SIGKILL `kill` mid-load."""
    channels = [grpc.aio.insecure_channel(address) for address in addresses]
    try:
        stubs = [router_pb2_grpc.RouterServiceStub(channel) for channel in channels]
        turn = itertools.cycle(stubs)
        tasks = [
            asyncio.ensure_future(_chat_async(next(turn), key, n, timeout_s)) for n in range(count)
        ]
        if kill is not None:
            for answered, finished in enumerate(asyncio.as_completed(tasks), start=1):
                await finished
                if answered == 10:
                    break
            kill.process.send_signal(signal.SIGKILL)
        return await asyncio.gather(*tasks)
    finally:
        for channel in channels:
            await channel.close()


def _served(results: Sequence[object]) -> list[router_pb2.ChatResponse]:
    return [r for r in results if isinstance(r, router_pb2.ChatResponse)]


async def test_concurrent_requests_on_three_replicas_never_overshoot_a_budget(
    router: router_pb2_grpc.RouterServiceStub,
    router_addresses: list[str],
    billing: billing_pb2_grpc.BillingServiceStub,
    admin: admin_pb2_grpc.AdminServiceStub,
    admin_md: Metadata,
) -> None:
    tenant, key, cost, budget = budget_tenant(router, admin, admin_md, "budget")

    results = await _load(router_addresses, key, 200, TIMEOUT_S)

    served = _served(results)
    refused = [r for r in results if not isinstance(r, router_pb2.ChatResponse)]
    assert {r.cost.nano_usd for r in served} == {cost}
    committed = ledger_cost(billing, admin_md, tenant)
    print(
        f"\nbudget {budget} nano-USD (50.5 requests of {cost}): {len(served)} served of 200,"
        f" committed {committed}, {budget - committed} left, overshoot {max(0, committed - budget)}"
    )
    assert committed == sum(r.cost.nano_usd for r in served) <= budget
    assert len(served) in (49, 50), f"served {len(served)}; the budget allows 50"
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "budget" in error.details()
    quota = [d for d in details_of(refused[-1]) if isinstance(d, error_details_pb2.QuotaFailure)]
    assert quota and quota[0].violations[0].subject == f"tenant:{tenant}/budget:day"
    now = standing(admin, admin_md, tenant)
    (day,) = [b for b in now.budgets if b.period == admin_pb2.BUDGET_PERIOD_DAY and not b.model]
    assert (day.limit.nano_usd, day.spent.nano_usd, day.reserved.nano_usd) == (
        budget,
        committed,
        0,
    )
    assert now.open_reservations == 0


async def test_a_router_killed_mid_load_leaves_no_money_reserved(
    mesh: LocalMesh,
    router: router_pb2_grpc.RouterServiceStub,
    router_addresses: list[str],
    billing: billing_pb2_grpc.BillingServiceStub,
    admin: admin_pb2_grpc.AdminServiceStub,
    admin_md: Metadata,
) -> None:
    tenant, key, _, budget = budget_tenant(router, admin, admin_md, "crash")
    doomed = mesh.add_router({"SHEPHERD_ROUTER_LEASE_GRACE_S": "1"})

    results = await _load([*router_addresses[:2], doomed.address], key, 200, 8.0, kill=doomed)

    assert doomed.process.poll() is not None
    lost = [
        r for r in results if isinstance(r, grpc.aio.AioRpcError) and "budget" not in r.details()
    ]
    assert lost, "killing a router mid-load should have cut some calls"
    assert ledger_cost(billing, admin_md, tenant) <= budget
    # The dead router's reservations expire (8 s deadline + 1 s grace) and are released.
    deadline = time.monotonic() + 20
    now = standing(admin, admin_md, tenant)
    for _ in range(80):
        if not now.open_reservations or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.25)
        now = standing(admin, admin_md, tenant)
    assert now.open_reservations == 0
    assert all(b.reserved.nano_usd == 0 for b in now.budgets)
    # The freed money is spendable: requests are served until less than the worst case of one
    # (what admission must be able to reserve) is left.
    for _ in range(60):
        (result,) = await _load(router_addresses[:1], key, 1, TIMEOUT_S)
        if not isinstance(result, router_pb2.ChatResponse):
            assert result.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, result.details()
            break
    committed = ledger_cost(billing, admin_md, tenant)
    print(
        f"\nrouter killed: {len(lost)} calls cut, budget {budget}, committed {committed},"
        f" {budget - committed} left (one request reserves {worst_case()})"
    )
    assert budget - worst_case() < committed <= budget, (committed, budget)


# -- rate limits -------------------------------------------------------------------------------


async def test_requests_per_minute_hold_across_three_replicas(
    router_addresses: list[str], admin: admin_pb2_grpc.AdminServiceStub, admin_md: Metadata
) -> None:
    tenant = unique("rpm")
    key = new_tenant(admin, admin_md, tenant)
    set_limits(admin, admin_md, tenant, admin_pb2.Limits(requests_per_minute=60))
    channels = [grpc.aio.insecure_channel(address) for address in router_addresses]
    try:
        stubs = itertools.cycle([router_pb2_grpc.RouterServiceStub(c) for c in channels])
        request = chat_request("tiny", f"rate me {uuid.uuid4().hex}")
        began = time.monotonic()

        async def call(stub: router_pb2_grpc.RouterServiceStub) -> grpc.aio.AioRpcError | None:
            try:
                await stub.Chat(request, metadata=auth(key), timeout=TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                return error
            return None

        outcomes = await asyncio.gather(*(call(next(stubs)) for _ in range(90)))
        elapsed = time.monotonic() - began
    finally:
        for channel in channels:
            await channel.close()
    assert elapsed < 50, "the burst must fit in one window for the count to mean anything"
    refused = [e for e in outcomes if e is not None]
    print(f"\nrpm 60: {90 - len(refused)} of 90 accepted in {elapsed:.2f} s over 3 replicas")
    assert 60 <= len(outcomes) - len(refused) <= 61
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "60 requests per minute" in error.details()
        retry = [d for d in details_of(error) if isinstance(d, error_details_pb2.RetryInfo)]
        assert retry and 0 < retry[0].retry_delay.ToNanoseconds() <= 60e9


def test_tokens_per_minute_reserve_the_estimate_and_count_what_was_used(
    router_addresses: list[str], admin: admin_pb2_grpc.AdminServiceStub, admin_md: Metadata
) -> None:
    tenant = unique("tpm")
    key = new_tenant(admin, admin_md, tenant)
    limit = 400
    set_limits(
        admin,
        admin_md,
        tenant,
        models=[
            admin_pb2.ModelLimits(model="tiny", limits=admin_pb2.Limits(tokens_per_minute=limit))
        ],
    )
    channels = [grpc.insecure_channel(address) for address in router_addresses]
    used, accepted, refusal = 0, 0, None
    try:
        stubs = itertools.cycle([router_pb2_grpc.RouterServiceStub(c) for c in channels])
        for n in range(60):
            request = chat_request("tiny", f"tpm probe {n}", max_tokens=16)
            request.cache_policy = common_pb2.CACHE_POLICY_BYPASS
            try:
                answer = next(stubs).Chat(request, metadata=auth(key), timeout=TIMEOUT_S)
            except grpc.RpcError as error:
                refusal = error
                break
            used += answer.usage.total_tokens
            accepted += 1
        # Another model is not limited by tiny's limit.
        other = chat_request("deepseek", "unlimited here", max_tokens=4)
        router_pb2_grpc.RouterServiceStub(channels[0]).Chat(other, metadata=auth(key), timeout=30)
    finally:
        for channel in channels:
            channel.close()
    print(f"\ntpm {limit}: {accepted} requests accepted using {used} tokens")
    assert refusal is not None and refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"{limit} tokens per minute" in refusal.details()
    assert used <= limit
    # Each request reserved about 60 tokens (prompt bound + max_tokens) but used fewer: the
    # window settles to what was used, so more requests fit than the estimate alone allows.
    assert accepted > limit // 60


# -- reports ------------------------------------------------------------------------------------


def test_usage_reports_by_day_and_model_show_a_tenant_only_its_own(
    router: router_pb2_grpc.RouterServiceStub,
    admin: admin_pb2_grpc.AdminServiceStub,
    admin_md: Metadata,
) -> None:
    tenant, other = unique("reporter"), unique("neighbour")
    key, other_key = new_tenant(admin, admin_md, tenant), new_tenant(admin, admin_md, other)
    answers = [
        router.Chat(chat_request(model, f"report {n} {uuid.uuid4().hex}", max_tokens=8),
                    metadata=auth(key), timeout=TIMEOUT_S)
        for n, model in enumerate(["tiny", "tiny", "gpt4"])
    ]  # fmt: skip
    router.Chat(
        chat_request("tiny", "not yours", max_tokens=8), metadata=auth(other_key), timeout=30
    )

    mine = router.GetUsage(router_pb2.GetUsageRequest(), metadata=auth(key), timeout=5)
    assert mine.tenant == tenant
    by_model = {b.model: b for b in mine.buckets}
    assert set(by_model) == {"shepherd-tiny", "gpt-4.1"}
    assert by_model["shepherd-tiny"].requests == 2 and by_model["gpt-4.1"].requests == 1
    assert mine.total_cost.nano_usd == sum(a.cost.nano_usd for a in answers)
    assert len({b.day for b in mine.buckets}) == 1
    report = admin.GetTenantReport(
        admin_pb2.GetTenantReportRequest(tenant=tenant), metadata=admin_md, timeout=5
    )
    # The operator's report also says what the GPU time cost Shepherd; the tenant's does not.
    for bucket in report.buckets:
        for field in ("gpu_cost", "hosted_equivalent_cost", "savings"):
            assert not mine.buckets[0].HasField(field)
            bucket.ClearField(field)
    assert list(report.buckets) == list(mine.buckets)
    bad = rpc_error(
        lambda: router.GetUsage(
            router_pb2.GetUsageRequest(start_day="last week"), metadata=auth(key), timeout=5
        )
    )
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "start_day" in bad.details()
