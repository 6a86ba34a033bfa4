"""One retry policy for every retry loop in the mesh: hosted API calls, node calls, billing.

Why one object: each loop used to carry its own attempts, backoff and deadline arithmetic, and
each got a different corner wrong (sleeping past the caller's deadline, ignoring the server's
Retry-After, retrying in lock-step from many replicas). `RetryPolicy` answers the one question
a retry loop has, "how long do I wait before the next attempt, if I try again at all?", and
the loop stays a few lines:

    attempt = 0
    while True:
        attempt += 1
        try:
            return await call(timeout=policy.attempt_timeout(deadline))
        except Transient as error:
            delay = policy.next_delay(attempt, retry_after=error.retry_after, deadline=deadline)
            if delay is None:
                raise
            await asyncio.sleep(delay)

The rules, in the order `next_delay` applies them:

1. At most `attempts` attempts in all (the first one included).
2. The backoff after attempt n is `base_s * 2**(n-1)`, capped at `max_s`; `jitter` of it is
   random (0.5, the default, is "equal jitter": half fixed so retries really back off, half
   random so replicas that failed together do not retry together).
3. A server's Retry-After is a floor: we never come back sooner than asked. But no wait is
   ever longer than `max_s`: a server asking for more is telling us to give up now and pass
   the Retry-After on to our caller, rather than hold the caller's request.
4. Never sleep past the deadline: if the wait plus `min_attempt_s` (the least time an
   attempt needs to be worth making) does not fit before the deadline, give up now.

Deadlines are absolute `time.monotonic()` instants, as everywhere in the scheduler.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

__all__ = ["RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry; frozen and validated so every loop sees one rule.

    `attempts`: attempts in all, the first included (1 means never retry).
    `base_s`, `max_s`: the first backoff and the cap on every wait (Retry-After included).
    `jitter`: the random fraction of each backoff, 0 (none) to 1 ("full jitter").
    `min_attempt_s`: a retry is only made if at least this much time is left for it after the
    wait; 0 means any time left will do.
    `attempt_timeout_s`: how long one attempt may go without an answer before it counts as
    failed and may be retried; None leaves only the deadline. (A streaming call applies it
    to the first byte: after that nothing is retried, so only the deadline bounds it.)
    """

    attempts: int = 4
    base_s: float = 0.25
    max_s: float = 8.0
    jitter: float = 0.5
    min_attempt_s: float = 0.0
    attempt_timeout_s: float | None = None

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            problems.append(f"attempts must be an integer, not {self.attempts!r}")
        elif self.attempts < 1:
            problems.append(f"attempts must be at least 1 (the first attempt), not {self.attempts}")
        for name in ("base_s", "max_s", "min_attempt_s"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                problems.append(f"{name} must be a finite number >= 0, not {value!r}")
        if _finite(self.base_s) and _finite(self.max_s) and self.max_s < self.base_s:
            problems.append(f"max_s ({self.max_s}) must be >= base_s ({self.base_s})")
        if not _finite(self.jitter) or not 0 <= self.jitter <= 1:
            problems.append(f"jitter must be between 0 and 1, not {self.jitter!r}")
        timeout = self.attempt_timeout_s
        if timeout is not None and (not _finite(timeout) or timeout <= 0):
            problems.append(f"attempt_timeout_s must be > 0 and finite, or None, not {timeout!r}")
        if problems:
            raise ValueError("invalid RetryPolicy: " + "; ".join(problems))

    @property
    def retries(self) -> int:
        """Retries after the first attempt (`attempts - 1`)."""
        return self.attempts - 1

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait after failed attempt number `attempt` (1-based), ignoring any Retry-After."""
        if attempt < 1:
            raise ValueError(f"attempt is 1-based, not {attempt}")
        # min() before the power would overflow for a large attempt number.
        ceiling = min(self.max_s, self.base_s * 2.0 ** min(attempt - 1, 64))
        random_part = ceiling * self.jitter
        return ceiling - random_part + (rng or random).uniform(0.0, random_part)

    def next_delay(
        self,
        attempt: int,
        *,
        retry_after: float | None = None,
        deadline: float | None = None,
        now: float | None = None,
        rng: random.Random | None = None,
    ) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to give up now.

        `attempt` is the number of attempts made so far (1 after the first failed);
        `retry_after` is the server's Retry-After in seconds, if it sent one; `deadline` is an
        absolute `time.monotonic()` instant (None: no deadline); `now` defaults to the clock.
        """
        if attempt >= self.attempts:
            return None
        delay = self.backoff(attempt, rng)
        if retry_after is not None:
            if retry_after > self.max_s:
                return None
            delay = max(delay, retry_after)
        if deadline is not None:
            left = deadline - (time.monotonic() if now is None else now)
            if delay + self.min_attempt_s >= left:
                return None
        return delay

    def attempt_timeout(self, deadline: float | None, now: float | None = None) -> float | None:
        """The timeout for the next attempt: `attempt_timeout_s` or the time left, the sooner.

        None when there is neither; may be <= 0 when the deadline has passed (do not start).
        """
        left = None if deadline is None else deadline - (time.monotonic() if now is None else now)
        if self.attempt_timeout_s is None:
            return left
        return self.attempt_timeout_s if left is None else min(self.attempt_timeout_s, left)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
