"""Writers: a batch's items to the durable store and, write-through, the Redis tier.

The Redis tier gets every item through `RedisStore.write_through`, which
decides: it writes `write: through` groups cached in Redis (latest newest-wins,
timeseries appended only to keys already cached) and clears serving's
negative markers of every written (group, id).

A batch is cut into chunks of whole records; every chunk's store write and
cache write run concurrently on the worker's event loop and the batch
waits for all of them. A record is `done` when both tiers of its chunk
succeeded. When the store write failed it is marked for the retry topic
(transient failures, timeouts, other store errors) or the DLQ
(`ValidationError`), with the reason. When only the cache write failed, the
store has its items: it is marked transient and `cache_only`, so the retry
flow rewrites the Redis tier alone (a record read back that way,
`Message.cache_only`, skips the store here). Writes are idempotent, so
rewriting the items of a partly failed chunk on retry duplicates nothing.

After a cache failure that looks like an outage (a timeout or a transient
error), the cache is not tried for a pause that doubles while the failures
go on (1 s up to 15 s) and ends with the first success: the records of that
pause go to retry for their Redis write at once. A hung Redis would
otherwise cost every batch the write timeout and slow ingestion to a crawl;
the cap bounds how long the cache lags once Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Histogram

from featureplane.codec import Item
from featureplane.errors import TransientStoreError, ValidationError
from featureplane.operators import metrics
from featureplane.operators.records import Status, Work
from featureplane.spec import Catalog
from featureplane.stores.base import Store

__all__ = ["CacheWriter", "Failure", "Writer", "classify"]

log = logging.getLogger(__name__)


class CacheWriter(Protocol):
    """The Redis tier as ingestion sees it: cache semantics (`RedisStore.write_through`)."""

    async def write_through(self, items: Sequence[Item]) -> None: ...


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a chunk failed: `kind` is the metric label, `reason` the header."""

    kind: str
    reason: str
    malformed: bool = False


def classify(exc: BaseException, tier: str) -> Failure:
    """Exception of a write -> Failure (malformed goes to the DLQ, the rest to retry)."""
    text = f"{tier}: {type(exc).__name__}: {exc}"[:500]
    if isinstance(exc, ValidationError):
        return Failure("malformed", text, malformed=True)
    if isinstance(exc, TimeoutError):
        return Failure("timeout", f"{tier}: write timed out")
    if isinstance(exc, TransientStoreError):
        return Failure("transient", text)
    return Failure("store_error", text)


class Writer:
    """Writes works' items; one per worker thread (it runs on that thread's loop)."""

    def __init__(
        self,
        catalog: Catalog,
        store: Store | None,
        cache: CacheWriter | None,
        *,
        flow: str = "ingest",
        chunk_items: int = 10_000,
        timeout_s: float = 10.0,
        clock: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        cache_pause_ms: tuple[int, int] = (1_000, 15_000),
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.cache = cache
        self.flow = flow
        self.chunk_items = chunk_items
        self.timeout_s = timeout_s
        self.clock = clock
        self.cache_pause_ms = cache_pause_ms
        self._pause_ms = 0
        self._paused_until = 0
        self._freshness: dict[str, Histogram] = {}
        self._to_store = {n for n, g in catalog.groups.items() if "store" in g.tiers}
        # Every item goes to `write_through`: it writes `write: through` groups with a redis
        # tier and clears serving's negative-cache markers of all the others.
        self._to_cache = set(catalog.groups)

    async def write(self, works: Sequence[Work]) -> list[Work]:
        """Write every pending work's items; return the works with their outcome."""
        pending = [i for i, w in enumerate(works) if w.status == "pending"]
        chunks: list[list[int]] = []
        size = 0
        for i in pending:
            if not chunks or size + len(works[i].items) > self.chunk_items:
                chunks.append([])
                size = 0
            chunks[-1].append(i)
            size += len(works[i].items)
        started = time.perf_counter()
        skip_cache = self.clock() < self._paused_until
        failures = await asyncio.gather(
            *(self._chunk([works[i] for i in c], skip_cache) for c in chunks)
        )
        metrics.BATCH_WRITE_SECONDS.labels(self.flow).observe(time.perf_counter() - started)
        out = list(works)
        now = self.clock()
        if not skip_cache:
            self._pace_cache([cache for _, cache in failures], now)
        fresh = self._freshness
        for chunk, (store_failed, cache_failed) in zip(chunks, failures, strict=True):
            for i in chunk:
                work = works[i]
                if store_failed is not None and not work.message.cache_only:
                    status: Status = "malformed" if store_failed.malformed else "transient"
                    out[i] = work.with_status(status, store_failed.reason)
                    if not store_failed.malformed:  # malformed ones are counted when routed
                        metrics.FAILURES.labels(self.flow, store_failed.kind).inc()
                elif cache_failed is not None:
                    # The store has the items: never the DLQ, only the Redis write again.
                    out[i] = work.with_status("transient", cache_failed.reason, cache_only=True)
                    metrics.FAILURES.labels(self.flow, "cache").inc()
                else:
                    out[i] = work.with_status("done")
                    for item in work.items:
                        hist = fresh.get(item.group)
                        if hist is None:
                            hist = fresh[item.group] = metrics.FRESHNESS_SECONDS.labels(
                                self.flow, item.group
                            )
                        hist.observe(max(0, now - item.ts) / 1000)
        return out

    def _pace_cache(self, failures: Sequence[Failure | None], now: int) -> None:
        """Pause the cache tier after an outage-like failure; resume on a success."""
        if any(f is not None and f.kind in ("timeout", "transient") for f in failures):
            low, high = self.cache_pause_ms
            self._pause_ms = min(high, max(low, self._pause_ms * 2))
            self._paused_until = now + self._pause_ms
            log.warning(
                "%s: the Redis tier failed; not trying it for %.0fs (records go to retry for "
                "their Redis write)",
                self.flow,
                self._pause_ms / 1000,
            )
        elif self._pause_ms and any(f is None for f in failures):
            log.info("%s: the Redis tier answers again", self.flow)
            self._pause_ms = 0

    async def _chunk(
        self, works: Sequence[Work], skip_cache: bool = False
    ) -> tuple[Failure | None, Failure | None]:
        """(store failure, cache failure) of one chunk; None where the tier succeeded."""
        store = self._to_store
        store_items = [
            it for w in works if not w.message.cache_only for it in w.items if it.group in store
        ]
        cache_items = [it for w in works for it in w.items if it.group in self._to_cache]
        calls: list[tuple[str, list[Item]]] = []
        if store_items and self.store is not None:
            calls.append(("store", store_items))
        if cache_items and self.cache is not None and not skip_cache:
            calls.append(("redis", cache_items))
        results = await asyncio.gather(
            *(self._call(tier, its) for tier, its in calls), return_exceptions=True
        )
        failed: dict[str, Failure] = {}
        if skip_cache and cache_items and self.cache is not None:
            failed["redis"] = Failure("paused", "redis: paused after failures, not tried")
        for (tier, its), res in zip(calls, results, strict=True):
            if isinstance(res, BaseException):
                if not isinstance(res, Exception):
                    raise res
                failed[tier] = classify(res, tier)
                continue
            for group, n in _count(its).items():
                metrics.ITEMS_WRITTEN.labels(self.flow, group, tier).inc(n)
        return failed.get("store"), failed.get("redis")

    async def _call(self, tier: str, items: list[Item]) -> None:
        async with asyncio.timeout(self.timeout_s):
            if tier == "store":
                assert self.store is not None
                await self.store.write(items)
            else:
                assert self.cache is not None
                await self.cache.write_through(items)


def _count(items: Sequence[Item]) -> dict[str, int]:
    out: dict[str, int] = {}
    for it in items:
        out[it.group] = out.get(it.group, 0) + 1
    return out
