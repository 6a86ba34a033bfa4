"""The router's side of single-flight: a leader's lease, and what a follower is told.

The cache decides who leads (services/cache/flights.py). A leader computes the answer as
any miss does, and meanwhile: renews its lease while the work lasts longer than half of it
(so followers of a slow but live leader never take over), publishes its text as it comes
when it streams (so followers stream it live), and at the end either hands the completion
to its followers with Store or, on an error, Abandons the lease with the error so they
retry. A leader's calls to the cache fail open: followers whose leader went quiet take over
when its lease expires, so nothing waits for ever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from shepherd.cache.v1 import cache_pb2, cache_pb2_grpc
from shepherd.common.v1 import common_pb2

from libs.tasks import log_failure

_log = logging.getLogger(__name__)
# The deadline of each of a leader's calls to the cache: they are small, and must never hold
# up the leader's own answer.
_CALL_TIMEOUT_S = 0.5


class Leadership:
    """One lease held by this router for one request; see the module docstring."""

    def __init__(
        self,
        cache: cache_pb2_grpc.CacheServiceStub,
        key: str,
        token: str,
        tenant: str,
        lease_ms: int,
        *,
        publish: bool,
    ) -> None:
        self._cache = cache
        self._key = key
        self._token = token
        self._tenant = tenant
        self._renew_every_s = max(lease_ms / 2000, 0.05)
        self.settled = False
        self._texts: asyncio.Queue[str | None] | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._renewal = asyncio.get_running_loop().call_later(self._renew_every_s, self._renew)
        if publish:
            self._texts = asyncio.Queue()

    def publish(self, text: str) -> None:
        """Queue a piece of text for the followers (a streaming leader's deltas)."""
        if self._texts is None or self.settled:
            return
        if self._publisher is None:
            # Opened on the first text: a leader that fails before any costs no call.
            self._publisher = asyncio.create_task(self._publish(self._texts))
            self._publisher.add_done_callback(log_failure)
        self._texts.put_nowait(text)

    async def _publish(self, texts: asyncio.Queue[str | None]) -> None:
        async def pieces() -> AsyncIterator[cache_pb2.PublishRequest]:
            while (text := await texts.get()) is not None:
                yield cache_pb2.PublishRequest(
                    key=self._key, lease_token=self._token, tenant=self._tenant, text=text
                )

        try:
            await self._cache.Publish(pieces(), timeout=600)
        except grpc.aio.AioRpcError as error:
            _log.info("publishing to followers failed", extra={"error": error.code().name})

    async def _end_publishing(self) -> None:
        if self._publisher is not None and self._texts is not None:
            self._texts.put_nowait(None)
            # Followers must see every piece before the completion: the stream ends first.
            await asyncio.wait({self._publisher}, timeout=_CALL_TIMEOUT_S)

    def _renew(self) -> None:
        if self.settled:
            return
        task = asyncio.create_task(self._renew_once())
        task.add_done_callback(log_failure)
        self._renewal = asyncio.get_running_loop().call_later(self._renew_every_s, self._renew)

    async def _renew_once(self) -> None:
        try:
            await self._cache.Renew(
                cache_pb2.RenewRequest(key=self._key, lease_token=self._token, tenant=self._tenant),
                timeout=_CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as error:
            _log.info("lease renewal failed", extra={"error": error.code().name})

    def _settle(self) -> bool:
        if self.settled:
            return False
        self.settled = True
        self._renewal.cancel()
        return True

    async def finish(self, completion: common_pb2.Completion, *, keep: bool, ttl_s: int) -> None:
        """Hand the answer to the followers, and store it when `keep` (a cacheable answer)."""
        if not self._settle():
            return
        await self._end_publishing()
        try:
            await self._cache.Store(
                cache_pb2.StoreRequest(
                    key=self._key,
                    completion=completion,
                    ttl_seconds=ttl_s,
                    tenant=self._tenant,
                    lease_token=self._token,
                    keep=keep,
                ),
                timeout=_CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as error:
            _log.warning("cache store failed open", extra={"error": error.details()})

    async def abandon(self, code: grpc.StatusCode, message: str) -> None:
        """Give the lease up with the error: followers retry (or share a caller's mistake)."""
        if not self._settle():
            return
        await self._end_publishing()
        try:
            await self._cache.Abandon(
                cache_pb2.AbandonRequest(
                    key=self._key,
                    lease_token=self._token,
                    tenant=self._tenant,
                    code=code.value[0],
                    message=message,
                ),
                timeout=_CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as error:
            _log.info("abandoning a lease failed", extra={"error": error.code().name})


def trimmed_text(text: str, skip: int) -> tuple[str, int]:
    """`text` without the first `skip` characters already sent; and what is left to skip.

    A follower that streamed part of a leader's answer and then has to compute the answer
    itself (the leader died) gets the same text again, since the work is deterministic: it
    sends its caller only what comes after the part already sent.
    """
    if skip <= 0:
        return text, 0
    if len(text) <= skip:
        return "", skip - len(text)
    return text[skip:], 0
