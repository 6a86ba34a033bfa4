"""RetryPolicy: validation, backoff with jitter, Retry-After as a floor, and the deadline.

Why exact figures: every retry loop in the mesh (hosted calls, node calls, billing) trusts this
one arithmetic, so the tests pin it with jitter off or a seeded generator.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from libs.retry import RetryPolicy

NO_JITTER = RetryPolicy(attempts=5, base_s=0.1, max_s=1.0, jitter=0.0)


def test_defaults_are_valid_and_frozen() -> None:
    policy = RetryPolicy()
    assert policy.attempts == 4 and policy.retries == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.attempts = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ({"attempts": 0}, "attempts must be at least 1"),
        ({"attempts": 2.5}, "attempts must be an integer"),
        ({"attempts": True}, "attempts must be an integer"),
        ({"base_s": -1.0}, "base_s"),
        ({"max_s": float("inf")}, "max_s"),
        ({"base_s": 2.0, "max_s": 1.0}, "max_s (1.0) must be >= base_s (2.0)"),
        ({"jitter": 1.5}, "jitter"),
        ({"jitter": float("nan")}, "jitter"),
        ({"min_attempt_s": -0.1}, "min_attempt_s"),
        ({"attempt_timeout_s": 0.0}, "attempt_timeout_s"),
    ],
)
def test_invalid_settings_are_refused_with_the_reason(
    settings: dict[str, object], complaint: str
) -> None:
    with pytest.raises(ValueError, match="invalid RetryPolicy") as info:
        RetryPolicy(**settings)  # type: ignore[arg-type]
    assert complaint in str(info.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValueError) as info:
        RetryPolicy(attempts=0, jitter=2.0)
    assert "attempts" in str(info.value) and "jitter" in str(info.value)


def test_backoff_doubles_up_to_the_cap() -> None:
    delays = [NO_JITTER.backoff(n) for n in range(1, 7)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert NO_JITTER.backoff(10_000) == 1.0  # no overflow for absurd attempt numbers
    with pytest.raises(ValueError):
        NO_JITTER.backoff(0)


def test_equal_jitter_keeps_half_the_backoff_fixed() -> None:
    policy = RetryPolicy(attempts=10, base_s=1.0, max_s=8.0, jitter=0.5)
    rng = random.Random(1)
    samples = [policy.backoff(3, rng) for _ in range(500)]  # ceiling 4 s
    assert min(samples) >= 2.0 and max(samples) <= 4.0
    assert max(samples) - min(samples) > 1.5, "the random half is really random"
    again = [policy.backoff(3, random.Random(1)) for _ in range(1)]
    assert again[0] == samples[0], "a seeded generator makes it reproducible"


def test_full_jitter_can_go_to_zero() -> None:
    policy = RetryPolicy(base_s=1.0, max_s=1.0, jitter=1.0)
    samples = [policy.backoff(1, random.Random(seed)) for seed in range(200)]
    assert min(samples) < 0.05 and max(samples) <= 1.0


def test_next_delay_stops_after_the_last_attempt() -> None:
    policy = RetryPolicy(attempts=3, base_s=0.1, max_s=1.0, jitter=0.0)
    assert policy.next_delay(1) == pytest.approx(0.1)
    assert policy.next_delay(2) == pytest.approx(0.2)
    assert policy.next_delay(3) is None
    assert RetryPolicy(attempts=1).next_delay(1) is None


def test_retry_after_is_a_floor_but_never_beyond_the_cap() -> None:
    assert NO_JITTER.next_delay(1, retry_after=0.7) == pytest.approx(0.7)
    assert NO_JITTER.next_delay(4, retry_after=0.0) == pytest.approx(0.8), "backoff still holds"
    assert NO_JITTER.next_delay(1, retry_after=1.0) == pytest.approx(1.0)
    # A server asking for more than the longest wait: give up now, pass its Retry-After on.
    assert NO_JITTER.next_delay(1, retry_after=1.01) is None


def test_never_sleeps_past_the_deadline() -> None:
    now = 100.0
    assert NO_JITTER.next_delay(1, deadline=now + 0.5, now=now) == pytest.approx(0.1)
    assert NO_JITTER.next_delay(1, deadline=now + 0.1, now=now) is None, "no time to try"
    assert NO_JITTER.next_delay(1, retry_after=0.6, deadline=now + 0.5, now=now) is None
    assert NO_JITTER.next_delay(1, deadline=now - 1, now=now) is None


def test_min_attempt_s_leaves_room_for_the_attempt_itself() -> None:
    policy = dataclasses.replace(NO_JITTER, min_attempt_s=0.3)
    now = 5.0
    assert policy.next_delay(1, deadline=now + 0.5, now=now) == pytest.approx(0.1)
    assert policy.next_delay(1, deadline=now + 0.35, now=now) is None


def test_next_delay_reads_the_monotonic_clock_by_default() -> None:
    import time

    assert NO_JITTER.next_delay(1, deadline=time.monotonic() + 10) == pytest.approx(0.1)
    assert NO_JITTER.next_delay(1, deadline=time.monotonic() + 0.05) is None


def test_attempt_timeout_is_the_sooner_of_its_cap_and_the_time_left() -> None:
    capped = RetryPolicy(attempt_timeout_s=2.0)
    assert capped.attempt_timeout(None) == 2.0
    assert capped.attempt_timeout(10.0, now=9.5) == pytest.approx(0.5)
    assert capped.attempt_timeout(10.0, now=1.0) == 2.0
    uncapped = RetryPolicy()
    assert uncapped.attempt_timeout(None) is None
    assert uncapped.attempt_timeout(10.0, now=7.0) == pytest.approx(3.0)
    assert uncapped.attempt_timeout(10.0, now=11.0) == pytest.approx(-1.0), "do not start"
