"""Where batch jobs write: the store and, for `write: through` groups, the Redis tier.

Batch jobs have no retry topic: a transient failure (throttling, a timeout,
Redis restarting) is retried here with exponential backoff and jitter, and
after `max_attempts` the job stops with the reason. Writes are idempotent, so
running a stopped job again is safe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from featureplane.backoff import backoff_ms
from featureplane.codec import Item
from featureplane.errors import TransientStoreError
from featureplane.stores.base import Store
from featureplane.stores.redis import RedisStore

__all__ = ["Sink"]

log = logging.getLogger(__name__)


class Sink:
    """Writes item batches to the store and the cache, retrying transient failures."""

    def __init__(
        self, store: Store, cache: RedisStore | None = None, *, max_attempts: int = 8
    ) -> None:
        self.store, self.cache, self.max_attempts = store, cache, max_attempts

    async def __aenter__(self) -> Sink:
        await self.store.start()
        if self.cache is not None:
            await self.cache.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.cache is not None:
            await self.cache.aclose()
        await self.store.aclose()

    async def write(self, items: Sequence[Item]) -> None:
        if not items:
            return
        await self._retrying("store", self.store.write, items)
        if self.cache is not None:
            await self._retrying("redis", self.cache.write_through, items)

    async def _retrying(
        self, tier: str, write: Callable[[Sequence[Item]], Awaitable[None]], items: Sequence[Item]
    ) -> None:
        for attempt in range(self.max_attempts + 1):
            try:
                await write(items)
                return
            except TransientStoreError as exc:
                if attempt == self.max_attempts:
                    raise
                delay = backoff_ms(attempt, base_ms=200, cap_ms=30_000) / 1000
                log.warning(
                    "%s write failed (%s); retry %d/%d in %.1fs",
                    tier,
                    exc,
                    attempt + 1,
                    self.max_attempts,
                    delay,
                )
                await asyncio.sleep(delay)
