"""The rules of the one write path, as data and plain functions.

`targets` says which tiers a group's items go to (its `tiers`: the store when
they include `store`, the Redis tier when they include `redis`; on-demand
groups nowhere). `classify` turns the exception of a tier write into a
`Failure`: bad data (`ValidationError`, to the DLQ), a timeout or a transient
store error (worth retrying), or anything else (a store error or a bug). The
retry policy says what a failure becomes: `ToRetryTopic` (the dataflows hand
the record to the retry topic) or `RetryInPlace` (batch jobs retry here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from featureplane.errors import TransientStoreError, ValidationError
from featureplane.spec import FeatureGroup

__all__ = ["Failure", "RetryInPlace", "RetryPolicy", "ToRetryTopic", "classify", "targets"]


@dataclass(frozen=True, slots=True)
class ToRetryTopic:
    """The dataflows' policy: one attempt; failed records go to the retry topic or DLQ."""

    cache_pause_ms: tuple[int, int] = (1_000, 15_000)
    """First and longest pause of the cache tier after an outage-like failure."""


@dataclass(frozen=True, slots=True)
class RetryInPlace:
    """The batch jobs' policy: retry failed writes here, then raise with the reason."""

    max_attempts: int = 8
    """Retries after the first attempt."""
    base_ms: float = 200.0
    cap_ms: float = 30_000.0


RetryPolicy = ToRetryTopic | RetryInPlace


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a tier write failed: `kind` is the metric label, `reason` the header."""

    kind: str
    reason: str
    malformed: bool = False
    error: Exception | None = field(default=None, compare=False, repr=False)

    @property
    def retryable(self) -> bool:
        """Worth trying again: an outage, a timeout or a paused cache, not bad data or a bug."""
        return self.kind in ("transient", "timeout", "paused")


def classify(exc: Exception, tier: str) -> Failure:
    """Exception of a write -> Failure (malformed goes to the DLQ, the rest to retry)."""
    text = f"{tier}: {type(exc).__name__}: {exc}"[:500]
    if isinstance(exc, ValidationError):
        return Failure("malformed", text, malformed=True, error=exc)
    if isinstance(exc, TimeoutError):
        return Failure("timeout", f"{tier}: write timed out", error=exc)
    if isinstance(exc, TransientStoreError):
        return Failure("transient", text, error=exc)
    return Failure("store_error", text, error=exc)


def targets(group: FeatureGroup) -> tuple[bool, bool]:
    """(to the store, to the Redis tier) of a group's items: the rule every job follows."""
    if group.on_demand:
        return False, False
    return "store" in group.tiers, "redis" in group.tiers
