"""A circuit breaker per tier: after `failures` consecutive errors the tier is skipped
for `cooldown_ms`, then one trial call decides whether it closes again."""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import IntEnum

__all__ = ["Breaker", "BreakerState", "monotonic_ms"]


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class BreakerState(IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class Breaker:
    def __init__(
        self, failures: int = 5, cooldown_ms: int = 2_000, clock: Callable[[], int] = monotonic_ms
    ) -> None:
        self.failures = failures
        self.cooldown_ms = cooldown_ms
        self.clock = clock
        self.state = BreakerState.CLOSED
        self._errors = 0
        self._opened_at = 0

    def allow(self) -> bool:
        """May a call go to the tier now? In half-open, only one trial at a time."""
        if self.state is BreakerState.CLOSED:
            return True
        now = self.clock()
        if now - self._opened_at >= self.cooldown_ms:  # open, or a trial that never reported
            self.state = BreakerState.HALF_OPEN
            self._opened_at = now
            return True
        return False

    def success(self) -> None:
        self._errors = 0
        self.state = BreakerState.CLOSED

    def failure(self) -> None:
        self._errors += 1
        if self.state is BreakerState.HALF_OPEN or self._errors >= self.failures:
            self.state = BreakerState.OPEN
            self._opened_at = self.clock()
