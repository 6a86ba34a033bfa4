"""GroupedScript against a real Valkey: concurrent calls share a pipeline, each keeps its own
result or error, a lost script is loaded again, and a caller who left is not run."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as redis
from redis.exceptions import ResponseError

from libs.scripts import GroupedScript

# Counts its key up and answers with the new value; `fail` is refused, `slow` takes a while.
SCRIPT = """
if ARGV[1] == 'fail' then return redis.error_reply('refused ' .. KEYS[1]) end
if ARGV[1] == 'slow' then local x = 0 for i = 1, 3000000 do x = x + i end end
return redis.call('INCR', KEYS[1])
"""


async def reads_processed(client: redis.Redis) -> int:
    return int((await client.info("stats"))["total_reads_processed"])


async def test_a_lone_call_goes_at_once_and_concurrent_calls_share_round_trips(
    client: redis.Redis,
) -> None:
    script = GroupedScript(client, SCRIPT, max_in_flight=1)
    assert await script(keys=["alone"], args=["go"]) == 1
    before = await reads_processed(client)
    results = await asyncio.gather(*(script(keys=[f"k{n}"], args=["go"]) for n in range(40)))
    after = await reads_processed(client)
    assert results == [1] * 40
    assert [int(await client.get(f"k{n}")) for n in range(40)] == [1] * 40
    # One call went alone, the other 39 waited for it and went in one pipeline: a handful of
    # reads for Valkey, where 40 separate calls would have been 40.
    assert after - before <= 10


async def test_one_failing_call_fails_alone(client: redis.Redis) -> None:
    script = GroupedScript(client, SCRIPT, max_in_flight=1)
    calls = [script(keys=[f"e{n}"], args=["fail" if n == 3 else "go"]) for n in range(8)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[3], ResponseError) and "refused e3" in str(results[3])
    assert [r for n, r in enumerate(results) if n != 3] == [1] * 7


async def test_a_group_sent_after_valkey_lost_the_script_loads_it_again(
    client: redis.Redis,
) -> None:
    script = GroupedScript(client, SCRIPT, max_in_flight=1)
    assert await script(keys=["x"], args=["go"]) == 1
    await client.script_flush()
    # A call that goes alone reloads a lost script before any group could follow it, so the
    # group's own path is driven directly here: six calls that waited, sent as one pipeline.
    loop = asyncio.get_running_loop()
    waited = [loop.create_future() for _ in range(6)]
    script._in_flight += 1  # as _send_waiting counts the group it sends
    await script._send([(["x"], ["go"], future) for future in waited])
    assert sorted([future.result() for future in waited]) == [2, 3, 4, 5, 6, 7]


async def test_a_caller_that_left_while_waiting_is_not_run(client: redis.Redis) -> None:
    script = GroupedScript(client, SCRIPT, max_in_flight=1)
    slow = asyncio.ensure_future(script(keys=["slow"], args=["slow"]))
    await asyncio.sleep(0.01)  # sent: the script runs for tens of milliseconds
    left = asyncio.ensure_future(script(keys=["left"], args=["go"]))
    stayed = asyncio.ensure_future(script(keys=["stayed"], args=["go"]))
    await asyncio.sleep(0)
    left.cancel()
    assert await slow == 1 and await stayed == 1
    with pytest.raises(asyncio.CancelledError):
        await left
    assert await client.get("left") is None
