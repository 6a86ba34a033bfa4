"""A request's event channel: deltas in order, coalesced while the reader is busy."""

from __future__ import annotations

import asyncio

from shepherd.common.v1 import common_pb2

from services.scheduler.events import Delta, EventChannel, Final, usage


def delta(text: str, tokens: int) -> Delta:
    return Delta(text, usage(3, tokens))


async def test_an_idle_reader_gets_each_delta_as_it_comes() -> None:
    channel = EventChannel()
    reader = channel.deltas()

    channel.delta(delta("Hel", 1), now=0.0)
    first = await anext(reader)
    channel.delta(delta("lo", 2), now=0.1)
    second = await anext(reader)

    assert (first.text, second.text) == ("Hel", "lo")
    assert second.usage.completion_tokens == 2


async def test_deltas_queued_while_the_reader_was_busy_come_as_one_in_order() -> None:
    channel = EventChannel()
    for n, piece in enumerate(["The", " cat", " sat"], start=1):
        channel.delta(delta(piece, n), now=float(n))
    channel.finish(
        Final(common_pb2.Completion(text="The cat sat", usage=usage(3, 3)), estimated=False)
    )
    await asyncio.sleep(0)  # the outcome's callback queues the end

    received = [d async for d in channel.deltas()]

    assert [d.text for d in received] == ["The cat sat"]
    assert received[0].usage.completion_tokens == 3  # the latest (cumulative) usage
    assert (await channel.outcome).text == "The cat sat"


async def test_with_an_interval_the_first_delta_goes_at_once_and_later_ones_wait_for_it() -> None:
    loop = asyncio.get_running_loop()
    channel = EventChannel()
    reader = channel.deltas(interval_s=0.05)

    channel.delta(delta("Hel", 1), now=0.0)
    async with asyncio.timeout(5):
        first = await anext(reader)
    sent_at = loop.time()
    channel.delta(delta("lo", 2), now=0.1)
    channel.delta(delta(" there", 3), now=0.2)
    async with asyncio.timeout(5):
        second = await anext(reader)

    assert first.text == "Hel"
    # Both later pieces waited out the interval after the first send, and came as one.
    assert loop.time() - sent_at >= 0.045
    assert (second.text, second.usage.completion_tokens) == ("lo there", 3)


async def test_the_end_of_a_request_cuts_the_interval_short() -> None:
    channel = EventChannel()
    # An interval far longer than the test's timeout: only the end can let the reader go.
    reader = channel.deltas(interval_s=60.0)
    channel.delta(delta("The", 1), now=0.0)
    async with asyncio.timeout(5):
        assert (await anext(reader)).text == "The"

    channel.delta(delta(" end", 2), now=0.1)
    waiting = asyncio.ensure_future(anext(reader))
    await asyncio.sleep(0.01)
    channel.finish(Final(common_pb2.Completion(text="The end", usage=usage(3, 2))))
    async with asyncio.timeout(5):
        last = await waiting
        rest = [d async for d in reader]

    assert last.text == " end" and rest == []
    assert (await channel.outcome).text == "The end"
