"""Logging that a flood cannot turn into a flood of log lines."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Counts events by kind and logs a WARNING for a kind at most once per `interval` s,
    saying how many happened since its previous line."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger, self._interval, self._clock = logger, interval, clock
        self._counts: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def event(self, kind: str, text: str, exc: BaseException | None = None) -> bool:
        """Count one `kind` event; True when this call logged (at ERROR with its traceback
        when `exc` is given: a bug, not a client's doing)."""
        self._counts[kind] = self._counts.get(kind, 0) + 1
        now = self._clock()
        if now - self._last.get(kind, -math.inf) < self._interval:
            return False
        self._last[kind] = now
        n = self._counts.pop(kind)
        self._logger.log(
            logging.WARNING if exc is None else logging.ERROR,
            "%s (%d such event%s since the last line of this kind)",
            text,
            n,
            "" if n == 1 else "s",
            exc_info=exc,
        )
        return True
