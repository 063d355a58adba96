"""The fill queue: what the store answered, written to the cache tier off the request path.

A request that read the store queues one `CacheFill` per (group, id) and returns; one
background task writes the queue to the cache in batches. The queue is bounded: past
`max_pending` fills (the cache is slower than the misses) new ones are dropped and
counted as `featureplane_tier_errors{tier="redis", op="fill_dropped"}`, as are batches
skipped while the cache's breaker is open. A dropped fill costs a later miss, nothing
more.
"""

from __future__ import annotations

import asyncio

from featureplane.cache import CacheFill, CacheTier
from featureplane.serving.guarded import GuardedTier

__all__ = ["FillQueue"]


class FillQueue:
    """Fills for `cache`, sent `batch` at a time through `guard` by `start()`'s task."""

    def __init__(
        self,
        cache: CacheTier,
        guard: GuardedTier,
        timeout_ms: float,
        *,
        max_pending: int = 20_000,
        batch: int = 256,
    ) -> None:
        self.cache, self.guard, self.timeout_ms = cache, guard, timeout_ms
        self.max_pending, self.batch = max_pending, batch
        self._fills: list[CacheFill] = []
        self._ready = asyncio.Event()  # fills are queued
        self._empty = asyncio.Event()  # nothing queued nor being written
        self._empty.set()
        self._dropped = guard.metrics.errors.labels(guard.name, "fill_dropped")
        self._flusher: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._fills)

    @property
    def settled(self) -> bool:
        """Nothing queued and no batch being written."""
        return self._empty.is_set()

    def put(self, fill: CacheFill) -> None:
        if len(self._fills) >= self.max_pending:
            self._dropped.inc()
            return
        self._fills.append(fill)
        self._ready.set()
        self._empty.clear()

    async def start(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop())

    async def aclose(self) -> None:
        """Stop the task; one more batch is written, best effort."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        if self._fills:
            await self._flush_once()

    async def drained(self) -> None:
        """Return once every queued fill was written or dropped."""
        await self._empty.wait()

    async def _flush_loop(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._fills:
                await self._flush_once()
            self._empty.set()

    async def _flush_once(self) -> None:
        batch, self._fills = self._fills[: self.batch], self._fills[self.batch :]
        if not self.guard.allow():
            self._dropped.inc(len(batch))
            return
        await self.guard.run("fill", self.cache.fill(batch), self.timeout_ms)
