"""SchedulerService/InferMany, called as the router calls it (services/router/multiplex.py).

A real scheduler process and a real Triton node: many requests on one open stream are
answered as unary calls would be, streamed ones delta by delta, one bad request fails alone,
a cancelled or expired call never reaches Triton, a draining scheduler finishes what it had
and refuses the rest, and a stream that broke fails its calls with the status the router
retries on, then opens again.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from shepherd.common.v1 import common_pb2
from shepherd.scheduler.v1 import scheduler_pb2

from deploy.local.triton import TritonNode
from libs.peers import PeerChannel
from services.router.multiplex import InferManyClient, MultiplexedCall
from tests.services.scheduler.test_scheduling import (
    BLOCKER_TOKENS,
    one_node_catalog,
    stats_of,
    successes,
    unload,
    until,
)
from tests.support.scheduler import (
    SchedulerProcess,
    infer_request,
    internal_channel,
    model_repository,
    start_node,
    stub,
)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonNode]:
    repository = model_repository(tmp_path_factory.mktemp("repo"), ["tiny_a"])
    started = start_node(tmp_path_factory.mktemp("node"), repository, load=["tiny_a"])
    yield started
    started.stop()


@pytest.fixture
def scheduler(tmp_path: Path, node: TritonNode) -> Iterator[SchedulerProcess]:
    """A scheduler for `node`, started by the test: a test that unloads tiny_a first gets a
    scheduler that loads it on first use (a second or more in which requests queue)."""
    process = SchedulerProcess(tmp_path, one_node_catalog(node, chat={"model": "tiny_a"}))
    yield process
    process.stop()


@pytest.fixture
async def channel(scheduler: SchedulerProcess) -> AsyncIterator[PeerChannel]:
    """A channel as the router's; it connects when first used, once the test started the
    scheduler."""
    opened = internal_channel(scheduler.address)
    yield opened
    await opened.close()


@pytest.fixture
async def client(channel: PeerChannel) -> AsyncIterator[InferManyClient]:
    opened = InferManyClient(channel)
    yield opened
    await opened.close()


def request(
    request_id: str, max_tokens: int = 4, temperature: float | None = None, streamed: bool = False
) -> scheduler_pb2.InferStreamRequest:
    unary = infer_request("chat", request_id=request_id, max_tokens=max_tokens)
    chat = scheduler_pb2.InferStreamRequest.FromString(unary.SerializeToString())
    chat.final_only = not streamed
    if temperature is not None:
        chat.params.temperature = temperature
    return chat


async def outcome(call: MultiplexedCall) -> tuple[common_pb2.CompletionFinal | None, Any]:
    """The final chunk (None if none) and then how the call ended: EOF or the error."""
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as error:
        return None, error
    assert isinstance(first, scheduler_pb2.InferStreamResponse) and first.HasField("final")
    try:
        return first.final, await call.read()
    except grpc.aio.AioRpcError as error:
        return first.final, error


async def test_many_requests_on_one_stream_answer_as_unary_calls_and_a_bad_one_fails_alone(
    client: InferManyClient, channel: PeerChannel, scheduler: SchedulerProcess
) -> None:
    scheduler.start()
    good = [client.start(request(f"many-{n}"), 30) for n in range(6)]
    bad = client.start(request("bad", temperature=7.5), 30)
    answers = await asyncio.gather(*(outcome(call) for call in good))
    failed_final, failed = await outcome(bad)

    unary = await asyncio.gather(
        *(
            stub(channel).Infer(
                infer_request("chat", request_id=f"many-{n}", max_tokens=4), timeout=30
            )
            for n in range(6)
        )
    )
    for (final, end), reply in zip(answers, unary, strict=True):
        assert end is grpc.aio.EOF
        assert final is not None and final.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert final.text == reply.completion.text and final.text
        assert final.usage == reply.completion.usage
        assert final.placement.backend_model == "tiny_a"
    # The bad request gets the status a call of its own would have had, details included.
    assert failed_final is None
    assert failed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in failed.details()
    details = dict(failed.trailing_metadata() or ())["grpc-status-details-bin"]
    bad_request = error_details_pb2.BadRequest()
    assert status_pb2.Status.FromString(details).details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == "params.temperature"


async def test_a_streamed_request_sends_its_deltas_then_the_final_chunk(
    client: InferManyClient, channel: PeerChannel, scheduler: SchedulerProcess
) -> None:
    scheduler.start()
    together = [
        client.start(request(f"streamed-{n}", max_tokens=12, streamed=True), 30) for n in range(3)
    ]
    for n, call in enumerate(together):
        chunks = []
        while (chunk := await call.read()) is not grpc.aio.EOF:
            assert isinstance(chunk, scheduler_pb2.InferStreamResponse)
            chunks.append(chunk)
        *deltas, final = chunks
        assert deltas and all(c.HasField("delta") for c in deltas) and final.HasField("final")
        assert final.final.text == "", "a streamed answer's text is in its deltas"
        unary = await stub(channel).Infer(
            infer_request("chat", request_id=f"streamed-{n}", max_tokens=12), timeout=30
        )
        assert "".join(c.delta.text for c in deltas) == unary.completion.text
        assert final.final.usage == unary.completion.usage


async def test_a_cancelled_or_expired_call_never_reaches_triton(
    client: InferManyClient, channel: PeerChannel, node: TritonNode, scheduler: SchedulerProcess
) -> None:
    unload(node, "tiny_a")  # the first request loads it: a second or more of queueing
    scheduler.start()
    before = successes(node, "tiny_a")
    kept = client.start(request("kept"), 30)
    cancelled = client.start(request("cancelled"), 30)
    expired = client.start(request("expired"), 0.2)
    await until(lambda: _depth(channel, 3))
    cancelled.cancel()
    final, error = await outcome(expired)
    assert final is None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    kept_final, end = await outcome(kept)
    assert kept_final is not None and kept_final.text and end is grpc.aio.EOF
    await asyncio.sleep(0.3)  # long enough for a wrongly dispatched request to be counted
    assert successes(node, "tiny_a") - before == 1, "only the request still wanted may run"
    stats = await stats_of(stub(channel), "chat")
    assert stats.cancelled == 1 and stats.expired == 1 and stats.completed == 1


async def _depth(channel: PeerChannel, depth: int) -> bool:
    return (await stats_of(stub(channel), "chat")).queue_depth == depth


async def test_a_draining_scheduler_finishes_its_calls_and_refuses_new_ones_on_the_stream(
    client: InferManyClient, scheduler: SchedulerProcess
) -> None:
    scheduler.start()
    first = await outcome(client.start(request("warm"), 30))  # the stream is open
    assert first[1] is grpc.aio.EOF
    running = client.start(request("long", max_tokens=BLOCKER_TOKENS), 30)
    await asyncio.sleep(0.2)  # on its way to Triton
    assert scheduler.process is not None
    scheduler.process.send_signal(signal.SIGTERM)
    await until(_logged(scheduler, "shutting down"))
    refused_final, refused = await outcome(client.start(request("late"), 30))
    assert refused_final is None and refused.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down: retry on another replica" in refused.details()
    final, end = await outcome(running)
    assert end is grpc.aio.EOF and final is not None
    assert final.usage.completion_tokens == BLOCKER_TOKENS, "the running call was served to its end"


def _logged(scheduler: SchedulerProcess, text: str) -> Callable[[], Any]:
    async def seen() -> bool:
        return text in scheduler.log()

    return seen


async def test_a_broken_stream_fails_its_calls_as_unreachable_then_opens_again(
    client: InferManyClient, scheduler: SchedulerProcess, node: TritonNode
) -> None:
    unload(node, "tiny_a")  # so the first call is still queued when the process dies
    scheduler.start()
    waiting = client.start(request("orphan"), 30)
    await asyncio.sleep(0.3)
    assert scheduler.process is not None
    scheduler.process.kill()
    final, error = await outcome(waiting)
    assert final is None and error.code() == grpc.StatusCode.UNAVAILABLE
    scheduler.stop()
    scheduler.start()  # the same address, as a restarted replica has
    final, end = await outcome(client.start(request("after"), 30))
    assert end is grpc.aio.EOF and final is not None and final.text


async def test_a_call_id_in_use_is_refused_without_touching_the_call_that_has_it(
    channel: PeerChannel, scheduler: SchedulerProcess
) -> None:
    scheduler.start()
    call = stub(channel).InferMany(timeout=30)
    twice = scheduler_pb2.InferCall(id=7, request=request("twice"), timeout_ms=30_000)
    await call.write(scheduler_pb2.InferManyRequest(calls=[twice, twice]))
    events: list[scheduler_pb2.InferEvent] = []
    while len(events) < 2:
        message = await call.read()
        events.extend(message.events)
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF  # the stream ends once the caller is done
    refused, answered = sorted(events, key=lambda e: e.HasField("final"))
    assert refused.id == answered.id == 7
    assert refused.failure.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "already in use" in refused.failure.message
    assert answered.final.text and not answered.HasField("failure")
