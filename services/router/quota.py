"""Admission by money and rate: budgets reserved before dispatch, limits exact across replicas.

Before a request is dispatched the router takes its worst-case cost out of every budget that
applies (the tenant's, and the tenant's on this model, per UTC day and month) and its place
in the requests- and tokens-per-minute windows, in one atomic Redis script
(`libs/accounts.py`). Because every router replica runs the same script on the same keys,
limits do not multiply with the replica count, and a budget cannot be overshot by
concurrency: Σ committed ≤ Σ reserved ≤ budget, to the nano-dollar.

The worst case is the prompt's token bound at the input price plus max_tokens at the output
price. No tokenizer emits more tokens than the text has UTF-8 bytes (byte-level BPE and
SentencePiece with byte fallback both hold to it), and chat framing adds a few tokens per
message, so `prompt_token_bound` can never be below what a backend reports; billing still
caps a request at its reservation in case a backend miscounts.

When only other requests' reservations stand between a request and its budget, it waits
(briefly, within its deadline) for them to settle, since they usually cost less than they
reserved: refusing at once would leave money unspent that the tenant was entitled to.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from redis.exceptions import RedisError
from shepherd.common.v1 import common_pb2

from libs.accounts import Accounts, Admission, period_end, utc_now
from libs.catalog import Model
from libs.errors import ShepherdError, invalid_argument, retry_info
from services.router.config import QuotaConfig

_log = logging.getLogger(__name__)

# Bytes of chat framing a message can add (the role tags of the self-hosted prompt format,
# OpenAI's per-message tokens), and once per request (the reply priming).
MESSAGE_OVERHEAD_TOKENS = 16
REQUEST_OVERHEAD_TOKENS = 16
_FIRST_WAIT_S = 0.01
_MAX_WAIT_S = 0.1


def prompt_token_bound(messages: Sequence[common_pb2.ChatMessage]) -> int:
    """A number of prompt tokens no backend's tokenizer can exceed for these messages."""
    return REQUEST_OVERHEAD_TOKENS + sum(
        len(m.content.encode("utf-8")) + MESSAGE_OVERHEAD_TOKENS for m in messages
    )


@dataclass(frozen=True)
class Ticket:
    """An admitted request: whether it holds a reservation of its own to release on failure."""

    tenant: str
    request_id: str
    leased: bool
    # The worst-case cost reserved for it (nano-USD): billing never charges a leased request
    # more, and the router prices usage the same way when billing has to wait (spool.py).
    reserved_nano: int = 0


def _subject(tenant: str, model: Model, scope: str) -> str:
    return f"tenant:{tenant}" if scope == "t" else f"tenant:{tenant}/model:{model.name}"


def _quota_failure(subject: str, description: str) -> error_details_pb2.QuotaFailure:
    return error_details_pb2.QuotaFailure(
        violations=[
            error_details_pb2.QuotaFailure.Violation(subject=subject, description=description)
        ]
    )


def refusal(
    admission: Admission, tenant: str, request_id: str, model: Model, worst: int, now: dt.datetime
) -> ShepherdError:
    """The status a refused admission becomes: what was exceeded, and when to come back."""
    subject = _subject(tenant, model, admission.scope)
    if admission.outcome == "conflict":
        return invalid_argument(
            [
                (
                    "request_id",
                    f"{request_id!r} was already used by this tenant for a different request;"
                    " a retry must repeat the request exactly, and a new request needs a new id",
                )
            ]
        )
    if admission.outcome in ("rpm", "tpm"):
        what = "requests" if admission.outcome == "rpm" else "tokens"
        after_s = max(admission.retry_after_ms, 1) / 1000
        message = (
            f"rate limit: {subject} may use {admission.limit} {what} per minute;"
            f" retry in {after_s:.1f}s"
        )
        return ShepherdError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            message,
            [retry_info(after_s), _quota_failure(subject, f"{admission.limit} {what} per minute")],
        )
    if admission.outcome == "tpm_never":
        return ShepherdError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"this request alone may use more tokens than {subject}'s limit of {admission.limit}"
            " tokens per minute; lower params.max_tokens or shorten the prompt",
            [_quota_failure(subject, f"{admission.limit} tokens per minute")],
        )
    # A budget: refused until the period resets, unless reservations in flight may free room.
    period = "daily" if admission.period == "day" else "monthly"
    left = admission.limit - admission.spent - admission.reserved
    resets = period_end(admission.period, now)
    if admission.reserved and admission.spent + worst <= admission.limit:
        after_s = 1.0
        when = "requests in flight hold the rest; retry in a moment"
    else:
        after_s = max((resets - now).total_seconds(), 1.0)
        when = f"it resets at {resets:%Y-%m-%d %H:%M} UTC"
    description = (
        f"{period} budget of {admission.limit} nano-USD: {admission.spent} spent,"
        f" {admission.reserved} reserved by requests in flight, {max(left, 0)} left;"
        f" this request may cost up to {worst}"
    )
    return ShepherdError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"budget exhausted: {subject} {description}; {when}",
        [retry_info(after_s), _quota_failure(f"{subject}/budget:{admission.period}", description)],
    )


class Quota:
    """The router's side of tenant accounts: admit before dispatch, release on failure."""

    def __init__(self, accounts: Accounts, config: QuotaConfig) -> None:
        self._accounts = accounts
        self._config = config

    async def admit(
        self,
        *,
        tenant: str,
        request_id: str,
        fingerprint: str,
        model: Model,
        messages: Sequence[common_pb2.ChatMessage],
        max_tokens: int,
        timeout_s: float,
    ) -> Ticket:
        """Reserve the request's worst case and its rate-limit place, or raise why not.

        A model whose deployment adds context to the prompt (a RAG model's documents, which
        its backend counts and bills) reserves for that too (`context_tokens`).
        """
        prompt_bound = prompt_token_bound(messages) + model.context_tokens
        worst = model.price.cost_nano(prompt_bound, max_tokens)
        member = uuid.uuid4().hex
        lease_ms = int((timeout_s + self._config.lease_grace_s) * 1000)
        give_up = time.monotonic() + min(self._config.budget_wait_s, timeout_s / 2)
        delay = _FIRST_WAIT_S
        while True:
            now = utc_now()
            try:
                admission = await self._accounts.admit(
                    tenant=tenant,
                    request_id=request_id,
                    fingerprint=fingerprint,
                    model=model.name,
                    worst_cost_nano=worst,
                    estimated_tokens=prompt_bound + max_tokens,
                    lease_ms=lease_ms,
                    member=member,
                    now=now,
                )
            except RedisError as error:
                if self._config.fail_open:
                    _log.warning(
                        "quota store unreachable; admitting unreserved (fail-open)",
                        extra={"error": str(error), "tenant": tenant},
                    )
                    return Ticket(tenant, request_id, leased=False)
                raise ShepherdError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"cannot check the tenant's budget and rate limits: the accounts store is"
                    f" unreachable ({error}); retry shortly",
                ) from error
            if admission.accepted:
                leased = admission.outcome == "admitted"
                return Ticket(
                    tenant, request_id, leased=leased, reserved_nano=worst if leased else 0
                )
            may_fit = (
                admission.outcome == "budget"
                and admission.reserved > 0
                and admission.spent + worst <= admission.limit
            )
            if not may_fit or time.monotonic() + delay > give_up:
                raise refusal(admission, tenant, request_id, model, worst, now)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_WAIT_S)

    async def hold(self, ticket: Ticket, seconds: float) -> None:
        """Keep a reservation for `seconds` more: its usage is spooled, not yet billed."""
        if not ticket.leased:
            return
        try:
            await self._accounts.hold(ticket.tenant, ticket.request_id, utc_now(), seconds)
        except RedisError as error:
            # Redis is down too: the lease keeps its original expiry (deadline + grace).
            _log.warning(
                "could not extend a spooled request's reservation", extra={"error": str(error)}
            )

    async def release(self, ticket: Ticket) -> None:
        """Give back the reservation of a request that failed before generating anything."""
        if not ticket.leased:
            return
        try:
            await self._accounts.release(ticket.tenant, ticket.request_id)
        except RedisError as error:
            # The lease expires on its own after the deadline and grace; nothing is lost.
            _log.warning("could not release a reservation", extra={"error": str(error)})
