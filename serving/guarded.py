"""One tier's calls under a timeout and a circuit breaker, failures counted, never raised.

Every call serving makes to Redis or the store goes through a `GuardedTier`: an open
breaker skips the tier, a call that fails with a `StoreError` or outlives its timeout is
answered as None (the caller falls through to the next tier or answers 503), counted in
`featureplane_tier_errors` and shown in `featureplane_breaker_state`. Any other exception
is a bug and propagates.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

from featureplane.errors import StoreError
from featureplane.serving.breaker import Breaker
from featureplane.serving.metrics import Metrics

__all__ = ["GuardedTier"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class GuardedTier:
    """The calls to the tier `name`: `allow()` first, then `run(op, call, timeout_ms)`."""

    def __init__(self, name: str, breaker: Breaker, metrics: Metrics) -> None:
        self.name, self.breaker, self.metrics = name, breaker, metrics
        self._state = metrics.breaker.labels(name)

    def allow(self) -> bool:
        """May a call go to the tier now? Call once per call made: it may start a trial."""
        return self.breaker.allow()

    async def run(self, op: str, call: Awaitable[T], timeout_ms: float) -> T | None:
        """`call`'s result, or None when it failed or timed out (a failure of the tier)."""
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                result = await call
        except (StoreError, TimeoutError) as exc:
            self.failed(op, exc)
            return None
        self.breaker.success()
        self._state.set(int(self.breaker.state))
        return result

    def failed(self, op: str, exc: BaseException) -> None:
        """Count a failed call: towards the breaker, in metrics, in the debug log."""
        self.breaker.failure()
        self._state.set(int(self.breaker.state))
        self.metrics.errors.labels(self.name, op).inc()
        log.debug("%s %s failed: %r", self.name, op, exc)
