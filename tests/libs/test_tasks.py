"""A crashed background loop is logged and restarted, or stops the service; never dies silently."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

import pytest

from libs.tasks import log_failure, set_fatal_handler, supervise


@pytest.fixture
def fatal_reasons() -> Iterator[list[str]]:
    reasons: list[str] = []
    set_fatal_handler(reasons.append)
    yield reasons
    set_fatal_handler(None)


async def test_a_loop_that_crashes_is_logged_with_its_traceback_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs = 0
    second_run = asyncio.Event()

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("the first run breaks")
        second_run.set()
        await asyncio.Event().wait()  # a healthy loop runs until cancelled

    with caplog.at_level(logging.ERROR, logger="libs.tasks"):
        task = supervise("poll:test", loop, min_backoff_s=0.01)
        await asyncio.wait_for(second_run.wait(), 10)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

    assert runs == 2
    (crash,) = [r for r in caplog.records if r.name == "libs.tasks"]
    assert crash.getMessage() == "background task crashed; restarting it"
    assert crash.__dict__["task"] == "poll:test"
    assert crash.exc_info is not None and "the first run breaks" in str(crash.exc_info[1])


async def test_a_loop_that_keeps_crashing_backs_off_instead_of_spinning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    crashes: list[float] = []
    fourth = asyncio.Event()

    async def loop() -> None:
        crashes.append(time.monotonic())
        if len(crashes) == 4:
            fourth.set()
        raise RuntimeError("broken for good")

    with caplog.at_level(logging.ERROR, logger="libs.tasks"):
        task = supervise("batcher:test", loop, min_backoff_s=0.05, max_backoff_s=10)
        await asyncio.wait_for(fourth.wait(), 30)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    delays = [r.__dict__["restart_in_s"] for r in caplog.records if r.name == "libs.tasks"]
    assert delays[:3] == [0.05, 0.1, 0.2]  # doubling
    assert crashes[3] - crashes[0] >= 0.05 + 0.1 + 0.2  # and really waited


async def test_a_fatal_loop_that_crashes_stops_the_service(
    fatal_reasons: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    async def loop() -> None:
        raise RuntimeError("cannot go on")

    with caplog.at_level(logging.CRITICAL, logger="libs.tasks"):
        await supervise("spool", loop, fatal=True)

    assert fatal_reasons == ["background task spool crashed"]
    (line,) = [r for r in caplog.records if r.name == "libs.tasks"]
    assert "stopping the service" in line.getMessage()


async def test_a_short_lived_task_that_fails_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def work() -> None:
        raise ValueError("lost otherwise")

    with caplog.at_level(logging.ERROR, logger="libs.tasks"):
        task = asyncio.get_running_loop().create_task(work(), name="load:tiny")
        task.add_done_callback(log_failure)
        with contextlib.suppress(ValueError):
            await task
        await asyncio.sleep(0)  # done-callbacks run on the next turn of the loop

    (line,) = [r for r in caplog.records if r.name == "libs.tasks"]
    assert line.__dict__["task"] == "load:tiny"
    assert line.exc_info is not None and isinstance(line.exc_info[1], ValueError)
