"""The one write path: items to the durable store and the Redis tier, for every job.

Ingest, retry, backfill and load all write through a `Writer`, so the same
items land in the same tiers whichever job wrote them. A group's `tiers`
decide (`targets`):

    store   items of groups whose tiers include `store`. A group without it is
            cache-only: serving never reads the store for it, so no job writes
            it there.
    redis   items of groups whose tiers include `redis`, handed to the cache's
            `write_through`: it writes `write: through` groups (latest newest
            wins, timeseries appended to keys already cached) and clears
            serving's negative marker of every written (group, id), so a
            `write: around` group only loses its markers.

A tier that is not configured (no Redis URL) is skipped; on-demand groups are
never written.

Items are cut into chunks of whole records; every chunk's store write and
cache write run concurrently and the call waits for all of them. A record is
written when every tier it goes to succeeded. What a failure becomes is the
retry policy's business:

    ToRetryTopic   (the dataflows) one attempt; a record whose store write
                   failed is marked for the retry topic (transient failures,
                   timeouts, other store errors) or the DLQ (`ValidationError`),
                   with the reason. When only the cache write failed, the store
                   has its items: it is marked transient and `cache_only`, so
                   the retry flow rewrites the Redis tier alone (a record read
                   back that way, `Message.cache_only`, skips the store).
    RetryInPlace   (batch jobs, which have no retry topic) the failed tier
                   writes are tried again here with capped exponential backoff
                   and full jitter, the cache alone when the store succeeded;
                   after `max_attempts` retries the write raises with the
                   reason. A `ValidationError` or an unexpected error raises at
                   once: retrying cannot fix it.

Writes are idempotent, so rewriting the items of a partly failed chunk
duplicates nothing.

Once a batch's records are in every tier they go to, their keys are
published to serving's local tiers, one message a batch or a few
(`featureplane.invalidation`); a failed publish never fails the write.

The Redis tier is started on first use, under a lock so that concurrent
chunks never race a failing start: Redis down at start-up is a transient
write failure like any other, not a crash. Under `ToRetryTopic`, after a
cache failure that looks like an outage (a timeout or a transient error) the
cache is not tried for a pause that doubles while the failures go on (1 s up
to 15 s) and ends with the first success: the records of that pause go to
retry for their Redis write at once. A hung Redis would otherwise cost every
batch the write timeout and slow ingestion to a crawl; the cap bounds how
long the cache lags once Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from featureplane.backoff import backoff_ms
from featureplane.codec import Item
from featureplane.errors import TransientStoreError
from featureplane.invalidation import publisher_of
from featureplane.operators.metrics import IngestMetrics
from featureplane.operators.policy import (
    Failure,
    RetryPolicy,
    ToRetryTopic,
    classify,
    targets,
)
from featureplane.operators.records import Status, Work
from featureplane.spec import Catalog
from featureplane.stores.base import Store, wall_clock_ms

__all__ = ["CacheWriter", "Writer"]

log = logging.getLogger(__name__)


class CacheWriter(Protocol):
    """The Redis tier as the writers use it (a part of `featureplane.cache.CacheTier`)."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def write_through(self, items: Sequence[Item]) -> None: ...


@dataclass(slots=True)
class _Unit:
    """One record's items (or one loaded item); `stored`: the store already has them.
    Never changed once built (not frozen: one is built per record, 6x cheaper so)."""

    items: Sequence[Item]
    stored: bool = False


Outcome = tuple[Failure | None, Failure | None]
"""(store failure, cache failure) of one unit; None where the tier succeeded or was not used."""
_OK: Outcome = (None, None)


class Writer:
    """Writes items to their tiers; one per event loop (a worker thread, a batch job)."""

    def __init__(
        self,
        catalog: Catalog,
        store: Store | None,
        cache: CacheWriter | None,
        *,
        policy: RetryPolicy | None = None,
        metrics: IngestMetrics | None = None,
        flow: str = "ingest",
        chunk_items: int = 10_000,
        timeout_s: float | None = 10.0,
        clock: Callable[[], int] = wall_clock_ms,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: random.Random | None = None,
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.cache = cache
        self.policy: RetryPolicy = ToRetryTopic() if policy is None else policy
        """What a failed write becomes; the dataflows' `ToRetryTopic` by default."""
        self.metrics = metrics
        self.flow = flow
        self.chunk_items = chunk_items
        self.timeout_s = timeout_s
        self.clock = clock
        self.sleep = sleep
        self.rand = rand
        self._to_store = {n for n, g in catalog.groups.items() if targets(g)[0]}
        self._to_cache = {n for n, g in catalog.groups.items() if targets(g)[1]}
        self._cache_started = False
        self._cache_starting = asyncio.Lock()
        self._pause_ms = 0
        self._paused_until = 0
        # Serving's local tiers hear of written keys through Redis (featureplane.invalidation).
        self._publisher = publisher_of(catalog, cache)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the store now (a bad store fails fast); the cache starts on first use."""
        if self.store is not None:
            await self.store.start()

    async def aclose(self) -> None:
        try:
            if self.cache is not None and self._cache_started:
                self._cache_started = False
                await self.cache.aclose()
        finally:
            if self.store is not None:
                await self.store.aclose()

    async def __aenter__(self) -> Writer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---------------------------------------------------------------- writing

    async def write(self, works: Sequence[Work]) -> list[Work]:
        """Write every pending work's items; return the works with their outcome.

        Under `RetryInPlace` every returned work is done, or this raises.
        """
        pending = [i for i, w in enumerate(works) if w.status == "pending"]
        units = [_Unit(works[i].items, works[i].message.cache_only) for i in pending]
        outcomes = await self._settle(units)
        out = list(works)
        m = self.metrics
        written: list[Item] = []
        for i, unit, (store_failed, cache_failed) in zip(pending, units, outcomes, strict=True):
            work = works[i]
            if store_failed is not None:
                status: Status = "malformed" if store_failed.malformed else "transient"
                out[i] = work.with_status(status, store_failed.reason)
                if m is not None and not store_failed.malformed:  # malformed: counted when routed
                    m.failures.labels(self.flow, store_failed.kind).inc()
            elif cache_failed is not None:
                # The store has the items: never the DLQ, only the Redis write again.
                out[i] = work.with_status("transient", cache_failed.reason, cache_only=True)
                if m is not None:
                    m.failures.labels(self.flow, "cache").inc()
            else:
                out[i] = work.with_status("done")
                written.extend(unit.items)
        if m is not None and written:
            self._observe_freshness(m, written, self.clock())
        return out

    async def write_items(self, items: Sequence[Item]) -> None:
        """Write items that come from no stream (a file load); raise when any failed."""
        outcomes = await self._settle([_Unit((it,)) for it in items])
        for store_failed, cache_failed in outcomes:
            failed = store_failed or cache_failed
            if failed is not None:
                raise _error_of(failed)

    def _observe_freshness(self, m: IngestMetrics, items: Sequence[Item], now: int) -> None:
        """Write time minus event ts of every written item: one observation call a group."""
        ages: dict[str, list[float]] = {}
        for item in items:
            age = ages.get(item.group)
            if age is None:
                age = ages[item.group] = []
            age.append((now - item.ts) / 1000 if item.ts < now else 0.0)
        for group, values in ages.items():
            m.freshness_seconds.observe_many((self.flow, group), values)

    async def _settle(self, units: list[_Unit]) -> list[Outcome]:
        """The outcome of every unit under the policy."""
        policy = self.policy
        if isinstance(policy, ToRetryTopic):
            return await self._attempt(units, policy)
        outcomes: list[Outcome] = [(None, None)] * len(units)
        todo = list(range(len(units)))
        for attempt in range(policy.max_attempts + 1):
            got = await self._attempt([units[i] for i in todo], None)
            again: list[int] = []
            last: Failure | None = None
            for i, (store_failed, cache_failed) in zip(todo, got, strict=True):
                failed = store_failed or cache_failed
                if failed is None:
                    continue
                if not failed.retryable:
                    raise _error_of(failed)
                if store_failed is None:  # the store has them: the cache alone again
                    units[i] = _Unit(units[i].items, stored=True)
                again.append(i)
                last = failed
            if last is None:
                return outcomes
            if attempt == policy.max_attempts:
                raise TransientStoreError(
                    f"gave up after {policy.max_attempts} retries: {last.reason}"
                ) from last.error
            delay = backoff_ms(attempt, policy.base_ms, policy.cap_ms, self.rand) / 1000
            log.warning(
                "%s: %d write(s) failed (%s); retry %d/%d in %.1fs",
                self.flow,
                len(again),
                last.reason,
                attempt + 1,
                policy.max_attempts,
                delay,
            )
            await self.sleep(delay)
            todo = again
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _attempt(self, units: Sequence[_Unit], pacing: ToRetryTopic | None) -> list[Outcome]:
        """One try of every unit, chunks concurrently; with `pacing`, the cache may pause."""
        chunks: list[list[int]] = []
        size = 0
        for i, unit in enumerate(units):
            if not chunks or size + len(unit.items) > self.chunk_items:
                chunks.append([])
                size = 0
            chunks[-1].append(i)
            size += len(unit.items)
        started = time.perf_counter()
        skip_cache = pacing is not None and self.clock() < self._paused_until
        results = await asyncio.gather(
            *(self._chunk([units[i] for i in c], skip_cache) for c in chunks)
        )
        if self.metrics is not None:
            elapsed = time.perf_counter() - started
            self.metrics.batch_write_seconds.labels(self.flow).observe(elapsed)
        if pacing is not None and not skip_cache:
            self._pace_cache([cache for _, cache, _ in results], pacing)
        outcomes: list[Outcome] = [(None, None)] * len(units)
        for chunk, (store_failed, cache_failed, uses) in zip(chunks, results, strict=True):
            for i, (to_store, to_cache) in zip(chunk, uses, strict=True):
                outcomes[i] = (
                    store_failed if to_store else None,
                    cache_failed if to_cache else None,
                )
        if self._publisher is not None and not skip_cache:  # skipped: Redis is failing
            await self._invalidate([u for u, o in zip(units, outcomes, strict=True) if o == _OK])
        return outcomes

    async def _invalidate(self, units: Sequence[_Unit]) -> None:
        """Publish the keys of fully written units to serving's local tiers, once a batch.
        A hint: a failure is counted and logged, never the write's (TTLs bound staleness)."""
        publisher = self._publisher
        assert publisher is not None
        try:
            await self._start_cache()
            async with asyncio.timeout(self.timeout_s):
                sent = await publisher.publish(it for u in units for it in u.items)
        except Exception as exc:
            publisher.failed(exc)
            if self.metrics is not None:
                self.metrics.invalidations.labels(self.flow, "failed").inc()
            return
        if self.metrics is not None and sent:
            self.metrics.invalidations.labels(self.flow, "ok").inc(sent)

    def _pace_cache(self, failures: Sequence[Failure | None], pacing: ToRetryTopic) -> None:
        """Pause the cache tier after an outage-like failure; resume on a success."""
        if any(f is not None and f.kind in ("timeout", "transient") for f in failures):
            low, high = pacing.cache_pause_ms
            self._pause_ms = min(high, max(low, self._pause_ms * 2))
            self._paused_until = self.clock() + self._pause_ms
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
        self, units: Sequence[_Unit], skip_cache: bool
    ) -> tuple[Failure | None, Failure | None, list[tuple[bool, bool]]]:
        """(store failure, cache failure) of one chunk, and which tiers each unit used."""
        to_store, to_cache = self._to_store, self._to_cache
        has_store, has_cache = self.store is not None, self.cache is not None
        store_items: list[Item] = []
        cache_items: list[Item] = []
        uses: list[tuple[bool, bool]] = []
        for unit in units:
            n_store, n_cache = len(store_items), len(cache_items)
            for it in unit.items:
                if has_store and not unit.stored and it.group in to_store:
                    store_items.append(it)
                if has_cache and it.group in to_cache:
                    cache_items.append(it)
            uses.append((len(store_items) > n_store, len(cache_items) > n_cache))
        calls: list[tuple[str, list[Item]]] = []
        if store_items:
            calls.append(("store", store_items))
        if cache_items and not skip_cache:
            calls.append(("redis", cache_items))
        results = await asyncio.gather(
            *(self._call(tier, its) for tier, its in calls), return_exceptions=True
        )
        failed: dict[str, Failure] = {}
        if skip_cache and cache_items:
            failed["redis"] = Failure("paused", "redis: paused after failures, not tried")
        for (tier, its), res in zip(calls, results, strict=True):
            if isinstance(res, BaseException):
                if not isinstance(res, Exception):
                    raise res
                failed[tier] = classify(res, tier)
            elif self.metrics is not None:
                for group, n in _count(its).items():
                    self.metrics.items_written.labels(self.flow, group, tier).inc(n)
        return failed.get("store"), failed.get("redis"), uses

    async def _call(self, tier: str, items: list[Item]) -> None:
        async with asyncio.timeout(self.timeout_s):
            if tier == "store":
                assert self.store is not None
                await self.store.write(items)
                return
            assert self.cache is not None
            await self._start_cache()
            await self.cache.write_through(items)

    async def _start_cache(self) -> None:
        assert self.cache is not None
        if not self._cache_started:
            async with self._cache_starting:  # concurrent chunks must not race a failing start
                if not self._cache_started:
                    await self.cache.start()
                    self._cache_started = True


def _error_of(failure: Failure) -> Exception:
    """The exception a failed write raises: the original one (a bug keeps its traceback),
    or a `TransientStoreError` naming the tier for a timeout or a paused cache."""
    if failure.error is None or isinstance(failure.error, TimeoutError):
        return TransientStoreError(failure.reason)
    return failure.error


def _count(items: Sequence[Item]) -> dict[str, int]:
    out: dict[str, int] = {}
    for it in items:
        out[it.group] = out.get(it.group, 0) + 1
    return out
