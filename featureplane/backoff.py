"""Exponential backoff with full jitter (AWS architecture blog), shared by every retry loop."""

from __future__ import annotations

import random

__all__ = ["backoff_ms"]


def backoff_ms(
    attempt: int, base_ms: float = 25.0, cap_ms: float = 5_000.0, rand: random.Random | None = None
) -> float:
    """Delay before retry `attempt` (0-based): uniform in [0, min(cap, base * 2**attempt)]."""
    ceiling = min(cap_ms, base_ms * (2 ** min(attempt, 32)))
    return (rand or random).uniform(0, ceiling)
