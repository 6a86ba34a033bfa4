"""The scheduler's circuit breaker, shared by Triton nodes and hosted providers.

Why a breaker: a backend that keeps failing should stop getting work at once, so requests go
to a node or deployment that can answer instead of each paying a timeout; and it should get
traffic back by itself once it recovers, without an operator.

States:

* UNKNOWN: nothing heard yet; work goes through.
* HEALTHY (closed): work goes through; failures are counted, a success resets the count.
* OPEN: after `failure_threshold` consecutive failures. Nothing goes through until the
  cool-down has passed. The cool-down starts at `open_cooldown_s` and doubles each time the
  breaker opens again without a success in between, up to `max_cooldown_s`.
* HALF_OPEN: the cool-down is over; exactly one probe may go through. Its success closes the
  breaker, its failure opens it again with the doubled cool-down.

The breaker only keeps this state; its owner decides what counts as a failure and what a
probe is. A Triton node's probe is its health poll or the single batch it then admits (the
node allows one batch in flight while HALF_OPEN); a hosted provider's probe is the one call
that `allow()` lets through.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum


class BreakerState(Enum):
    """Where a breaker stands."""

    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    """When a breaker opens and how long it stays open."""

    failure_threshold: int = 2
    open_cooldown_s: float = 1.0
    max_cooldown_s: float = 30.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, not {self.failure_threshold}")
        # open_cooldown_s above max_cooldown_s is allowed: the cap wins, as it always has.
        if not (self.open_cooldown_s > 0 and self.max_cooldown_s > 0):
            raise ValueError(
                "open_cooldown_s and max_cooldown_s must be > 0, got "
                f"{self.open_cooldown_s} and {self.max_cooldown_s}"
            )


class CircuitBreaker:
    """One backend's breaker (see the module docstring for the states)."""

    def __init__(
        self, config: BreakerConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self.state = BreakerState.UNKNOWN
        self.failures = 0  # consecutive failures since the last success
        self.cooldown_s = 0.0
        self.retry_at = 0.0  # when an OPEN breaker turns HALF_OPEN
        self.probing = False  # allow() let the HALF_OPEN probe through and it has not ended

    def current(self, now: float | None = None) -> BreakerState:
        """The state now: an OPEN breaker whose cool-down is over turns HALF_OPEN."""
        if self.state is BreakerState.OPEN and (self._clock() if now is None else now) >= (
            self.retry_at
        ):
            self.state = BreakerState.HALF_OPEN
            self.probing = False
        return self.state

    def blocked_until(self, now: float | None = None) -> float | None:
        """When an OPEN breaker may be probed again; None when it is not blocked."""
        now = self._clock() if now is None else now
        if self.state is BreakerState.OPEN and now < self.retry_at:
            return self.retry_at
        return None

    def allow(self, now: float | None = None) -> bool:
        """Whether one call may go through now; in HALF_OPEN only the first caller, the probe.

        Every call allowed must end in `succeeded()`, `failed()` or `release()`, or a
        HALF_OPEN breaker would wait for its probe forever.
        """
        state = self.current(now)
        if state is BreakerState.OPEN:
            return False
        if state is BreakerState.HALF_OPEN:
            if self.probing:
                return False
            self.probing = True
        return True

    def succeeded(self) -> bool:
        """A call or probe worked: close. True when this changed the state (for logging)."""
        changed = self.state is not BreakerState.HEALTHY
        self.state = BreakerState.HEALTHY
        self.failures = 0
        self.cooldown_s = 0.0
        self.probing = False
        return changed

    def failed(self) -> bool:
        """A call or probe failed. True when this failure opened the breaker (for logging).

        A failure while HALF_OPEN, or the threshold-th in a row, (re)opens it with the
        doubled cool-down; a failure while already OPEN (a call that started before it
        opened) pushes the next probe out the same way.
        """
        self.failures += 1
        self.probing = False
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.config.failure_threshold:
            config = self.config
            self.cooldown_s = min(
                config.max_cooldown_s, max(config.open_cooldown_s, self.cooldown_s * 2)
            )
            self.retry_at = self._clock() + self.cooldown_s
            opened = self.state is not BreakerState.OPEN
            self.state = BreakerState.OPEN
            return opened
        return False

    def end_cooldown(self, now: float | None = None) -> None:
        """The backend shows it is back (a health check passed): probe it now, not later.

        An OPEN breaker turns HALF_OPEN at once instead of waiting out a cool-down that may
        have doubled to its maximum while the backend was down; the probe decides as ever.
        """
        if self.state is BreakerState.OPEN:
            self.retry_at = min(self.retry_at, self._clock() if now is None else now)

    def release(self) -> None:
        """An allowed call ended without telling anything (cancelled, deadline): no verdict."""
        self.probing = False
