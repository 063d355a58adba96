"""Time-to-live arithmetic shared by the cache writers and serving.

Pure functions of their arguments; the random draw is passed in, so tests
are exact.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Rand", "jittered"]

Rand = Callable[[], float]
"""Returns a float uniform in [0, 1); injected so jitter is testable."""


def jittered(ms: int, jitter: float, r: float) -> int:
    """`ms` shortened by up to `jitter` of itself: r in [0, 1) picks how much; at least 1."""
    return max(1, int(ms * (1.0 - jitter * r)))
