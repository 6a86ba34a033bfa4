"""What a backend produces for each request of a batch, and the channel that carries it.

Why events and not one result per request: an LLM answers token by token, and a caller who
streams wants each piece as it comes; a unary caller simply collects them. So every backend
(a Triton batch, a Triton model that batches inside its engine, a hosted API) implements one
protocol, `Backend.run`, which yields `(row, event)` pairs for the rows of the batch it was
given:

* `Delta`: new text for that row, with the usage so far (cumulative);
* `Final`: the row is done; its Completion holds the whole text, usage, finish reason and
  placement;
* `Failed`: the row ended in an error after `usage` was already consumed.

A backend that cannot run the batch at all raises before yielding anything (NodeUnavailable
for "try another node", any other ShepherdError for "answer every row with this"), so the
dispatcher can retry or fall back only while nothing has reached the caller.

Each request has an `EventChannel`: deltas go into its queue, and its `outcome` future holds
the terminal event (a Completion, or the error). The queue and the batcher watch the outcome
future: a request whose caller went away has a cancelled outcome and is dropped before it
reaches a backend, and as soon as its deltas stop being wanted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from shepherd.common.v1 import common_pb2

from libs.errors import ShepherdError

# The finish reasons backends report as text, and the enum callers get.
FINISH_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "content_filter": common_pb2.FINISH_REASON_CONTENT_FILTER,
    "cancelled": common_pb2.FINISH_REASON_CANCELLED,
    "error": common_pb2.FINISH_REASON_ERROR,
}


def finish_reason(text: str) -> int:
    """The FinishReason of a backend's finish reason text ("stop", "length", ...)."""
    return FINISH_REASONS.get(text, common_pb2.FINISH_REASON_STOP)


def usage(prompt_tokens: int, completion_tokens: int) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


@dataclass(frozen=True)
class Delta:
    """New text for one request, with the tokens consumed so far (cumulative)."""

    text: str
    usage: common_pb2.Usage


@dataclass(frozen=True)
class Final:
    """One request is done. `estimated` is True when the backend reported no usage."""

    completion: common_pb2.Completion
    estimated: bool = False


@dataclass(frozen=True)
class Failed:
    """One request ended in `error` after consuming `usage` (zero when nothing was generated)."""

    error: ShepherdError
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)


Event = Delta | Final | Failed


class Backend(Protocol):
    """Runs a batch of requests on one deployment and yields each row's events as they come."""

    def run(self, target: object, batch: Sequence[object]) -> AsyncIterator[tuple[int, Event]]:
        """Yield (row, event) for the rows of `batch`; every row ends with Final or Failed."""
        ...


class EventChannel:
    """The events of one request, from the dispatcher to its RPC handler.

    `outcome` resolves with the Completion (or the error) when the request ends, and is
    cancelled when the caller goes away; deltas before it are read with `deltas()`.
    `estimated` and `partial_usage` travel with a terminal event for the final chunk.
    """

    def __init__(self) -> None:
        self.outcome: asyncio.Future[common_pb2.Completion] = (
            asyncio.get_running_loop().create_future()
        )
        self._queue: asyncio.Queue[Delta | None] = asyncio.Queue()
        self.started = False  # a delta was sent: no retry or fallback may follow
        self.first_delta_at: float | None = None
        self.estimated = False
        self.partial_usage = common_pb2.Usage()
        # Set while `deltas` waits out its interval; the end of the request wakes it at once.
        self._waker: asyncio.Future[None] | None = None
        self.outcome.add_done_callback(self._ended)

    def _ended(self, _outcome: object) -> None:
        self._queue.put_nowait(None)
        _wake(self._waker)

    @property
    def done(self) -> bool:
        return self.outcome.done()

    def delta(self, event: Delta, now: float) -> None:
        if self.outcome.done() or not event.text:
            return
        if self.first_delta_at is None:
            self.first_delta_at = now
        self.started = True
        self.partial_usage = event.usage
        self._queue.put_nowait(event)

    def finish(self, final: Final) -> None:
        if not self.outcome.done():
            self.estimated = final.estimated
            self.partial_usage = final.completion.usage
            self.outcome.set_result(final.completion)

    def fail(self, error: ShepherdError, used: common_pb2.Usage | None = None) -> None:
        if not self.outcome.done():
            if used is not None and used.total_tokens:
                self.partial_usage = used
            self.outcome.set_exception(error)

    async def deltas(self, interval_s: float = 0.0) -> AsyncIterator[Delta]:
        """The text in order, ending when the request ends; then read `outcome`.

        Deltas that queued while the reader was busy (sending the previous one) come as one,
        their texts joined and the latest usage (usage is cumulative): nothing is lost or
        reordered. With `interval_s`, a delta goes at most that often: the first at once
        (time to first token is not touched), each later one gathering what was generated
        since the previous send, and the request's end cuts the wait short, so the final
        chunk is never held back. Why: every message costs CPU on each hop to the caller
        (about 0.5 ms over both ends of a grpc.aio stream here, `make bench-grpc-floor`), and
        a model that decodes a token every millisecond would otherwise send a thousand
        messages a second to a reader who sees text at the pace of a screen.
        """
        queue = self._queue
        loop = asyncio.get_running_loop()
        sent_at: float | None = None
        while True:
            if sent_at is not None and interval_s > 0 and not self.outcome.done():
                wait = sent_at + interval_s - loop.time()
                if wait > 0:
                    await self._pause(loop, wait)
            item = await queue.get()
            if item is None:
                return
            ended = False
            if not queue.empty():
                texts = [item.text]
                while not queue.empty():
                    more = queue.get_nowait()
                    if more is None:
                        ended = True
                        break
                    texts.append(more.text)
                    item = more
                item = Delta("".join(texts), item.usage)
            yield item
            if ended:
                return
            sent_at = loop.time()

    async def _pause(self, loop: asyncio.AbstractEventLoop, wait_s: float) -> None:
        """Wait `wait_s`, or less if the request ends meanwhile."""
        waker = self._waker = loop.create_future()
        timer = loop.call_later(wait_s, _wake, waker)
        try:
            await waker
        finally:
            timer.cancel()
            self._waker = None


def _wake(waker: asyncio.Future[None] | None) -> None:
    if waker is not None and not waker.done():
        waker.set_result(None)
