"""Every service of a real mesh, fuzzed with well-formed messages and garbled credentials.

What must hold for any message the proto types allow (any text, empty or not; any integer,
huge or negative; NaN and infinite floats; unknown enum numbers; repeated and nested fields)
and for calls whose credentials are missing, wrong or sent twice:

- no call ends UNKNOWN or INTERNAL, which tell the caller nothing they can act on; nor
  DEADLINE_EXCEEDED, since every case is cheap (small max_tokens, bounded sizes), so a passed
  deadline means a request got stuck; nor with a status too large for the client to read;
- a call without valid credentials is refused: UNAUTHENTICATED or PERMISSION_DENIED;
- no process of the mesh dies or is replaced, and an ordinary chat still answers afterwards.

How: Hypothesis draws each RPC's requests from the request's descriptor
(tests/support/proto_strategies.py) with a fixed seed. Half of them are biased toward
realistic values (catalog model names, known roles and enums, small max_tokens, valid
tenants and cache keys) and a quarter mix realistic and arbitrary fields, so calls get past
the first validation into the queues, batches, backends, cache and ledger; the rest are
arbitrary. A service's cases are drawn first and then sent concurrently (grpc.aio), since one
at a time they take minutes on a small machine; a failure is reported with the request that
caused it, which the fixed seed draws again. AdminService is fuzzed through its read-only
calls only: a fuzzed SetTenantLimits or RevokeKey could lock the mesh's own tenant out.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory, text_format
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from shepherd.billing.v1 import admin_pb2, billing_pb2
from shepherd.cache.v1 import cache_pb2
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2
from shepherd.scheduler.v1 import scheduler_pb2

from tests.fuzz.conftest import FUZZ_TENANT, FuzzMesh, Metadata
from tests.support.catalog import GROUP_TENANTS, SOVEREIGN_TENANT
from tests.support.proto_strategies import field_values, messages

# Generous, so a loaded machine cannot fail a case: each normally takes well under a second.
CALL_TIMEOUT_S = 30.0
UNIQUE_ID = "<unique>"
CONCURRENCY = 16
# Names as callers write them (aliases, canonical, odd case and spacing); the test catalog's
# offline and deliberately slow models are left out: their calls are slow by design.
MODELS = (
    "tiny",
    "shepherd-tiny",
    "Tiny-Stream",
    " echo ",
    "shared-tiny",
    "sovereign-local",
    "sovereign-hosted",
    "tiny-engine",
    "embed",
    "rag",
    "gpt4",
    "deepseek",
    "gemini",
)
FAMILIES = (
    "shepherd-tiny",
    "shared-tiny",
    "sovereign",
    "shepherd-echo",
    "shepherd-embed",
    "gpt-4.1",
)
TENANTS = (FUZZ_TENANT, "fuzz-b", *GROUP_TENANTS, SOVEREIGN_TENANT, "regulated-health")
NAMESPACES = ("shared", "group:corp", *(f"tenant:{tenant}" for tenant in TENANTS))
# What a gRPC client says when a status's message and details are too large for it to read
# (over 8 KiB of trailers): the caller learns nothing from the status the service meant.
UNREADABLE = "received metadata size exceeds"
REFUSALS = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
FORBIDDEN = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _hex(length: int) -> st.SearchStrategy[str]:
    return st.text("0123456789abcdef", min_size=length, max_size=length)


def _days() -> st.SearchStrategy[str]:
    """No day, a day near now, or any day a date can be: year 1 to 9999, the ends included."""
    return st.one_of(
        st.just(""),
        st.just(""),
        st.dates(date(2025, 1, 1), date(2027, 12, 31)).map(date.isoformat),
        st.dates().map(date.isoformat),
        st.sampled_from([date.min, date.max]).map(date.isoformat),
    )


# Some prompts recur, so that answers are cached and later requests are served from the cache.
_PROMPT = st.one_of(
    st.sampled_from(["Hello", "What is 2+2?", "Write a haiku about sheep."]),
    st.text(min_size=1, max_size=120).map(lambda text: text if text.strip() else "Hello"),
    # A long prompt (up to 40,000 characters): cheap to draw, longer than tiny_lm's window.
    st.builds(
        lambda text, times: (text or "sheep ") * times, st.text(max_size=20), st.integers(50, 2_000)
    ),
)
_CHAT_MESSAGE = messages(
    common_pb2.ChatMessage.DESCRIPTOR,
    {
        "shepherd.common.v1.ChatMessage.role": st.sampled_from(
            [common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT]
        ),
        "shepherd.common.v1.ChatMessage.content": _PROMPT,
    },
)
_TOKENS = st.integers(0, 4_000)
# Realistic values by field name, wherever the name occurs in a request (nested ones too).
REALISTIC: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(MODELS),
    "messages": st.lists(_CHAT_MESSAGE, min_size=1, max_size=3),
    "inputs": st.lists(_PROMPT, min_size=1, max_size=4),
    "max_tokens": st.integers(1, 8),
    # In range, the ends and the smallest positive numbers included (5e-324 is subnormal).
    "temperature": st.one_of(
        st.just(0.0), st.floats(0.0, 2.0), st.sampled_from([5e-324, 1e-300, 1e-8, 2.0])
    ),
    "top_p": st.one_of(
        st.just(0.0), st.floats(0.0, 1.0), st.sampled_from([5e-324, 1e-300, 1e-8, 1.0])
    ),
    "priority": st.sampled_from(common_pb2.Priority.values()),
    "cache_policy": st.sampled_from(common_pb2.CachePolicy.values()),
    "policy": st.sampled_from(common_pb2.CachePolicy.values()),
    # Mostly fresh ids (UNIQUE_ID is replaced by one after drawing), some shared on purpose:
    # retries and conflicting reuses of one id, sent concurrently.
    "request_id": st.sampled_from([UNIQUE_ID, UNIQUE_ID, UNIQUE_ID, "fuzz-dup-1", "fuzz-dup-2"]),
    "tenant": st.sampled_from(TENANTS),
    "model_family": st.sampled_from(FAMILIES),
    "key": st.builds(
        lambda space, family, digest: f"shepherd:cache:v2:{space}:{family}:{digest}",
        st.sampled_from(NAMESPACES),
        st.sampled_from(FAMILIES),
        _hex(64),
    ),
    "ttl_seconds": st.integers(0, 3_600),
    "prompt_tokens": _TOKENS,
    "completion_tokens": _TOKENS,
    "total_tokens": _TOKENS,
    "fingerprint": _hex(64),
    "traceparent": st.builds(
        lambda trace, span, flags: f"00-{trace}-{span}-{flags}",
        _hex(32),
        _hex(16),
        st.sampled_from(["00", "01"]),
    ),
    "start_day": _days(),
    "end_day": _days(),
}


# Where one message needs other realistic values than the field name's: Embed's model is
# mostly the embedding model (a chat model is refused), so cases reach the batches.
_EMBED_MODELS = st.sampled_from(["embed", "shepherd-embed", " Embed ", "embed", "rag"])
REALISTIC_BY_FIELD: dict[str, st.SearchStrategy[Any]] = {
    "shepherd.router.v1.EmbedRequest.model": _EMBED_MODELS,
    "shepherd.scheduler.v1.EmbedRequest.model": _EMBED_MODELS,
}


def _realistic_overrides(descriptor: Descriptor) -> dict[str, st.SearchStrategy[Any]]:
    """REALISTIC keyed by the full name of every matching field reachable from `descriptor`
    (REALISTIC_BY_FIELD first)."""
    overrides: dict[str, st.SearchStrategy[Any]] = {}
    seen: set[str] = set()
    todo = [descriptor]
    while todo:
        current = todo.pop()
        if current.full_name in seen:
            continue
        seen.add(current.full_name)
        for field in current.fields:
            if field.full_name in REALISTIC_BY_FIELD:
                overrides[field.full_name] = REALISTIC_BY_FIELD[field.full_name]
            elif field.name in REALISTIC:
                overrides[field.full_name] = REALISTIC[field.name]
            elif field.message_type is not None:
                todo.append(field.message_type)
    return overrides


def requests_of(descriptor: Descriptor) -> st.SearchStrategy[Message]:
    """Half realistic, a quarter realistic and arbitrary field by field, a quarter arbitrary."""
    realistic = _realistic_overrides(descriptor)
    pool = descriptor_pool.Default()
    mixed = {
        name: st.one_of(values, field_values(pool.FindFieldByName(name), {}))
        for name, values in realistic.items()
    }
    real = messages(descriptor, realistic)
    return st.sampled_from([real, real, messages(descriptor, mixed), messages(descriptor)]).flatmap(
        lambda chosen: chosen
    )


_JUNK_KEY = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12).map(
    lambda key: "x-fuzz-" + key
)
_PRINTABLE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)
_JUNK = st.lists(
    st.one_of(
        st.tuples(_JUNK_KEY, _PRINTABLE),
        st.tuples(_JUNK_KEY.map(lambda key: key + "-bin"), st.binary(max_size=40)),
    ),
    max_size=3,
).map(tuple)


@dataclass(frozen=True)
class Credential:
    """What a case sends as metadata, and whether the call must be refused for it."""

    kind: str
    metadata: Metadata
    refused: bool


def credentials(good: Metadata, other: Metadata) -> st.SearchStrategy[Credential]:
    """Mostly the right credential; some missing, wrong, duplicated or another caller's."""
    ((name, value),) = good
    scheme, _, secret = value.rpartition(" ")
    prefix = f"{scheme} " if scheme else ""

    def case(kind: str, metadata: st.SearchStrategy[Any], refused: bool) -> st.SearchStrategy:
        return metadata.map(lambda md: Credential(kind, tuple(md), refused))

    right = case("right", st.just(good), False)
    junk = case("right+junk", st.tuples(_JUNK, _JUNK).map(lambda j: (*j[0], *good, *j[1])), False)
    choices = [
        *[right] * 12,
        *[junk] * 3,
        case("missing", _JUNK, True),
        case("wrong", _PRINTABLE.map(lambda text: ((name, prefix + text),)), True),
        case("twice", st.just((good[0], good[0])), True),
        case("twice-differing", _PRINTABLE.map(lambda t: (good[0], (name, prefix + t))), True),
        case(
            "wrong-scheme",
            st.sampled_from(["Basic ", "Token ", ""]).map(
                lambda s: (("authorization", s + secret),)
            ),
            True,
        ),
        # Another caller's credential: refused or accepted as the method's policy says.
        case("other", st.just(other), False),
    ]
    return st.sampled_from(choices).flatmap(lambda chosen: chosen)


@dataclass(frozen=True)
class Rpc:
    """One method to fuzz, how many cases it gets, and which caller's credential it needs."""

    service: ServiceDescriptor
    method: str
    count: int
    credential: str  # a FuzzMesh attribute: api_key, internal or admin
    other: str  # another caller's, sent in some cases

    @property
    def path(self) -> str:
        return f"/{self.service.full_name}/{self.method}"

    @property
    def descriptor(self) -> MethodDescriptor:
        return self.service.methods_by_name[self.method]


_ROUTER = router_pb2.DESCRIPTOR.services_by_name["RouterService"]
_SCHEDULER = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"]
_CACHE = cache_pb2.DESCRIPTOR.services_by_name["CacheService"]
_BILLING = billing_pb2.DESCRIPTOR.services_by_name["BillingService"]
_ADMIN = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
# Each service's methods, cases per method (1,000 per service), the credential each needs and
# another caller's. Only AdminService's read-only calls: see the module's docstring.
PLAN = {
    "router": [
        Rpc(_ROUTER, "Chat", 350, "api_key", "internal"),
        Rpc(_ROUTER, "ChatStream", 300, "api_key", "admin"),
        Rpc(_ROUTER, "ListModels", 100, "api_key", "internal"),
        Rpc(_ROUTER, "GetUsage", 100, "api_key", "admin"),
        Rpc(_ROUTER, "Embed", 150, "api_key", "internal"),
    ],
    "scheduler": [
        Rpc(_SCHEDULER, "Infer", 400, "internal", "admin"),
        Rpc(_SCHEDULER, "InferStream", 400, "internal", "api_key"),
        Rpc(_SCHEDULER, "GetStats", 100, "internal", "admin"),
        Rpc(_SCHEDULER, "Embed", 100, "internal", "api_key"),
    ],
    "cache": [
        Rpc(_CACHE, "Lookup", 450, "internal", "admin"),
        Rpc(_CACHE, "Store", 250, "internal", "api_key"),
        Rpc(_CACHE, "Follow", 120, "internal", "api_key"),
        Rpc(_CACHE, "Renew", 60, "internal", "admin"),
        Rpc(_CACHE, "Abandon", 60, "internal", "api_key"),
        Rpc(_CACHE, "GetStats", 30, "internal", "api_key"),
        Rpc(_CACHE, "Purge", 30, "admin", "internal"),
    ],
    "billing": [
        Rpc(_BILLING, "RecordUsage", 250, "internal", "admin"),
        Rpc(_BILLING, "RecordUsageBatch", 150, "internal", "api_key"),
        Rpc(_BILLING, "GetTenantUsage", 100, "internal", "admin"),
        Rpc(_BILLING, "GetUsage", 125, "internal", "admin"),
        Rpc(_BILLING, "RecordPoolUsage", 60, "internal", "api_key"),
        Rpc(_ADMIN, "ListKeys", 75, "admin", "internal"),
        Rpc(_ADMIN, "GetTenantLimits", 75, "admin", "internal"),
        Rpc(_ADMIN, "GetTenantReport", 125, "admin", "api_key"),
        Rpc(_ADMIN, "GetPoolReport", 40, "admin", "internal"),
    ],
}


@dataclass(frozen=True)
class Outcome:
    rpc: Rpc
    request: Message
    credential: Credential
    code: grpc.StatusCode
    details: str


def _fresh_ids(request: Message, prefix: str, serial: Iterator[int]) -> None:
    """Give every request_id drawn as UNIQUE_ID (nested ones too) an id no other case has."""
    for field, value in request.ListFields():
        if field.name == "request_id" and value == UNIQUE_ID:
            setattr(request, field.name, f"{prefix}-{next(serial)}")
        elif field.message_type is not None:
            for child in value if field.is_repeated else [value]:
                _fresh_ids(child, prefix, serial)


def draw(strategy: st.SearchStrategy[Any], count: int, label: str) -> list[Any]:
    """`count` examples of `strategy`, the same ones on every run (a seed fixed per label)."""
    drawn: list[Any] = []

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @seed(zlib.crc32(label.encode()))
    @given(strategy)
    def collect(example: Any) -> None:
        drawn.append(example)

    collect()
    assert len(drawn) >= count, f"{label}: Hypothesis drew {len(drawn)} cases, not {count}"
    return drawn[:count]


async def _call(
    channel: grpc.aio.Channel, rpc: Rpc, request: Message, metadata: Metadata
) -> tuple[grpc.StatusCode, str]:
    method = rpc.descriptor
    options = {
        "request_serializer": type(request).SerializeToString,
        "response_deserializer": message_factory.GetMessageClass(method.output_type).FromString,
    }
    try:
        if method.server_streaming:
            call = channel.unary_stream(rpc.path, **options)(
                request, metadata=metadata, timeout=CALL_TIMEOUT_S
            )
            async for _ in call:
                pass
            return await call.code(), await call.details() or ""
        await channel.unary_unary(rpc.path, **options)(
            request, metadata=metadata, timeout=CALL_TIMEOUT_S
        )
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("service", list(PLAN))
async def test_fuzzed_calls_get_actionable_statuses_and_harm_nothing(
    fuzz_mesh: FuzzMesh, service: str
) -> None:
    """Draw every RPC's cases, send them all concurrently, and check each outcome."""
    fuzz = fuzz_mesh
    started = time.monotonic()
    cases: list[tuple[Rpc, Message, Credential]] = []
    serial = itertools.count()
    for rpc in PLAN[service]:
        good, other = getattr(fuzz, rpc.credential), getattr(fuzz, rpc.other)
        strategy = st.tuples(requests_of(rpc.descriptor.input_type), credentials(good, other))
        for request, cred in draw(strategy, rpc.count, rpc.path):
            _fresh_ids(request, rpc.path.rsplit("/", 1)[1], serial)
            cases.append((rpc, request, cred))
    assert len(cases) >= 1_000, "the fuzz promises at least 1,000 cases per service"
    drawn = time.monotonic()
    gate = asyncio.Semaphore(CONCURRENCY)

    async def send(
        channel: grpc.aio.Channel, rpc: Rpc, request: Message, cred: Credential
    ) -> Outcome:
        async with gate:
            code, details = await _call(channel, rpc, request, cred.metadata)
        return Outcome(rpc, request, cred, code, details)

    async with grpc.aio.insecure_channel(fuzz.address(service)) as channel:
        outcomes = await asyncio.gather(*(send(channel, *case) for case in cases))
    sent = time.monotonic()

    codes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for outcome in outcomes:
        codes[outcome.rpc.path][outcome.code.name] += 1
    print(
        f"\n{service}: {len(cases)} cases, drawn in {drawn - started:.1f}s, sent in "
        f"{sent - drawn:.1f}s"
    )
    for path, counter in codes.items():
        print(f"  {path}: {dict(counter.most_common())}")
    bad = [
        o
        for o in outcomes
        if o.code in FORBIDDEN
        or (o.credential.refused and o.code not in REFUSALS)
        or UNREADABLE in o.details
    ]
    report = "\n".join(
        f"{o.rpc.path} -> {o.code.name} {o.details!r} (credential: {o.credential.kind})\n    "
        + text_format.MessageToString(o.request, as_one_line=True)[:800]
        for o in bad[:10]
    )
    assert not bad, f"{len(bad)} of {len(cases)} {service} cases failed, e.g.:\n{report}"
    fuzz.assert_unharmed()
