"""Where batch jobs write: the one `Writer` of the dataflows, retrying in place.

Batch jobs have no retry topic: a transient failure (throttling, a timeout,
Redis restarting or down at start-up) is retried here with capped
exponential backoff and jitter, the failed tier alone, and after
`max_attempts` retries the job stops with the reason. Items go to the same
tiers as ingestion writes them (`operators.policy.targets`). Writes are
idempotent, so running a stopped job again is safe.
"""

from __future__ import annotations

from collections.abc import Sequence

from featureplane.codec import Item
from featureplane.operators.policy import RetryInPlace
from featureplane.operators.write import CacheWriter, Writer
from featureplane.stores.base import Store

__all__ = ["Sink"]


class Sink:
    """Writes item batches to the store and the cache, retrying transient failures."""

    def __init__(
        self, store: Store, cache: CacheWriter | None = None, *, max_attempts: int = 8
    ) -> None:
        self.writer = Writer(
            store.catalog,
            store,
            cache,
            policy=RetryInPlace(max_attempts=max_attempts),
            flow="batch",
            timeout_s=None,  # a slow batch is not a failure: nothing waits behind it
        )

    async def __aenter__(self) -> Sink:
        await self.writer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.writer.aclose()

    async def write(self, items: Sequence[Item]) -> None:
        await self.writer.write_items(items)
