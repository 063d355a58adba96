"""The tiered read path: in-process LRU -> Redis -> store, per group's `tiers`.

One request's (group, id) pairs go through each tier in one round trip (one Redis
batch, one `Store.read`). A tier's answer is used only when `freshness.answer` says it
is exact; otherwise the pair falls through. What a lower tier answers is written to the
tiers above: the local LRU at once (a dict insert), Redis by the fill queue in batches,
never on the request path.

Freshness: past soft a value is served and refreshed in the background; past hard never
served; XFetch refreshes hot keys early. Concurrent store reads of one (group, id) are
single-flight: one leader reads, the rest await its result. Misses are remembered as
negative entries for `negative_ttl_ms`.

Degradation: every Redis and store call has a timeout and a circuit breaker. Redis
failing: its pairs fall through to the store. Store failing: pairs that no cache could
answer within hard TTL come back as None (serving answers 503).

The pieces, each with one job: `plan` (one request's pairs), `coalesce` (concurrent
Redis reads sent together), `flight` (single-flight reads, background refreshes),
`fills` (the fill queue), `guarded` (timeouts and breakers), `freshness` (TTL math,
XFetch, what an entry may answer). This module puts them in order.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from featureplane.cache import Cached, CacheFill, CacheTier
from featureplane.codec import Record
from featureplane.serving.breaker import Breaker
from featureplane.serving.coalesce import Coalescer
from featureplane.serving.fills import FillQueue
from featureplane.serving.flight import Background, SingleFlight
from featureplane.serving.freshness import (
    Entry,
    Freshness,
    answer,
    entry_from_cache,
    entry_from_store,
    freshness,
    negative_entry,
    rebased,
)
from featureplane.serving.guarded import GuardedTier
from featureplane.serving.local import LocalCache
from featureplane.serving.metrics import Metrics
from featureplane.serving.plan import Key, Wanted, plan
from featureplane.spec import Catalog, FeatureGroup
from featureplane.stores.base import Clock, Query, Store, wall_clock_ms

__all__ = ["ReaderConfig", "TieredReader"]


@dataclass(frozen=True, slots=True)
class ReaderConfig:
    """Timeouts, breaker and XFetch settings of the read path (ms where a time)."""

    negative_ttl_ms: int = 5_000
    redis_timeout_ms: int = 100
    store_timeout_ms: int = 1_000
    breaker_failures: int = 5
    breaker_cooldown_ms: int = 2_000
    xfetch_beta: float = 1.0


class TieredReader:
    """Answers queries from the highest tier that can answer them exactly."""

    def __init__(
        self,
        *,
        catalog: Catalog,
        store: Store,
        redis: CacheTier | None,
        local: LocalCache | None,
        metrics: Metrics,
        config: ReaderConfig = ReaderConfig(),
        clock: Clock = wall_clock_ms,
        rand: Callable[[], float] = random.random,
        breaker_clock: Callable[[], int] | None = None,
    ) -> None:
        self.catalog, self.store, self.redis, self.local = catalog, store, redis, local
        self.metrics, self.config, self.clock, self.rand = metrics, config, clock, rand
        kw = {} if breaker_clock is None else {"clock": breaker_clock}
        self.breakers = {
            t: Breaker(config.breaker_failures, config.breaker_cooldown_ms, **kw)
            for t in ("redis", "store")
        }
        self._store_guard = GuardedTier("store", self.breakers["store"], metrics)
        self._flights: SingleFlight[Key, Entry] = SingleFlight()
        self._refreshes: Background[Key] = Background("background refresh")
        self._delta: dict[str, float] = {}  # XFetch's delta: a store read's time, per group
        self._fills: FillQueue | None = None
        # Concurrent requests' Redis reads leave in one call (serving/coalesce.py).
        self._redis_batch: Coalescer[Key, Cached] | None = None
        if redis is not None:
            guard = GuardedTier("redis", self.breakers["redis"], metrics)
            self._fills = FillQueue(redis, guard, config.redis_timeout_ms * 5)
            self._redis_batch = Coalescer(partial(self._redis_call, redis, guard))

    # -- lifecycle

    async def start(self) -> None:
        if self._fills is not None:
            await self._fills.start()

    async def aclose(self) -> None:
        """Stop background work; queued Redis fills are flushed once, best effort."""
        await self._refreshes.aclose()
        if self._redis_batch is not None:
            await self._redis_batch.aclose()
        if self._fills is not None:
            await self._fills.aclose()

    async def idle(self) -> None:
        """Return once background refreshes, store reads and queued fills are done
        (tests, benches)."""
        fills = self._fills
        while self._refreshes or self._flights or (fills is not None and not fills.settled):
            await self._refreshes.wait()
            if flights := self._flights.futures():
                await asyncio.wait(flights)
            if fills is not None:
                await fills.drained()

    # -- reads

    async def read(self, queries: Sequence[Query]) -> list[list[Record] | None]:
        """Newest-first records per query; None where no tier could answer."""
        return [w.records for w in await self.answers(queries)]

    async def answers(self, queries: Sequence[Query]) -> list[Wanted]:
        """One answered `Wanted` per query (`records` None where no tier could answer)."""
        now = self.clock()
        wanted = plan(self.catalog, queries, now)
        pending = wanted
        token = 0
        if self.local is not None:
            token = self.local.token()
            pending = self._from_local(self.local, pending, now)
        if pending and self._redis_batch is not None:
            pending = await self._from_redis(self._redis_batch, pending, now, token)
        if pending:
            await self._from_store(pending, token)
        return wanted

    def _from_local(self, local: LocalCache, pending: list[Wanted], now: int) -> list[Wanted]:
        rest: list[Wanted] = []
        for w in pending:
            if "local" not in w.group.tiers:
                rest.append(w)
                continue
            entry = local.get(w.key)
            if entry is None:
                self.metrics.event("local", w.group.name, "miss")
                rest.append(w)
                continue
            records = self._serve(entry, "local", w, now)
            if records is None:
                rest.append(w)
            else:
                w.records, w.entry = records, entry
        return rest

    async def _from_redis(
        self, batch: Coalescer[Key, Cached], pending: list[Wanted], now: int, token: int
    ) -> list[Wanted]:
        groups = {w.key: w.group for w in pending if "redis" in w.group.tiers}
        if not groups:
            return pending
        keys = list(groups)
        cached = await batch(keys)
        if cached is None:
            return pending
        entries = {k: self._entry_of(groups[k], c, now) for k, c in zip(keys, cached, strict=True)}
        rest: list[Wanted] = []
        for w in pending:
            group = w.group
            if "redis" not in group.tiers:
                rest.append(w)
                continue
            entry = entries[w.key]
            if entry is None:
                self.metrics.event("redis", group.name, "miss")
                rest.append(w)
                continue
            records = self._serve(entry, "redis", w, now)
            if self.local is not None and "local" in group.tiers and now < entry.hard_at:
                self.local.put(w.key, rebased(entry, group, self.rand(), self.rand()), token)
            if records is None:
                rest.append(w)
            else:
                w.records = records
        return rest

    async def _from_store(self, pending: list[Wanted], token: int) -> None:
        sel: list[Wanted] = []
        for w in pending:
            if "store" in w.group.tiers:
                sel.append(w)
            else:  # the group's lowest tier missed: a cache-only group has nothing
                w.records = []
        if not sel:
            return
        # A bounded range may reach past what an entry holds: asked of the store as is.
        ranged = [w for w in sel if w.ranged]
        entries, rows = await self._store_fetch(
            {w.key: w.group for w in sel}, [w.query() for w in ranged], token
        )
        if rows is not None:
            for w, records in zip(ranged, rows, strict=True):
                w.records = records
        for w in sel:
            if w.records is None and (entry := entries.get(w.key)) is not None:
                w.records = answer(entry, w.group.kind, w.limit, w.since, w.until)

    # -- entries

    def _serve(self, entry: Entry, tier: str, w: Wanted, now: int) -> list[Record] | None:
        group = w.group
        state = freshness(
            entry, now, self._delta.get(group.name, 1.0), self.config.xfetch_beta, 1.0 - self.rand()
        )
        if state is Freshness.EXPIRED:
            self.metrics.event(tier, group.name, "miss")
            return None
        records = answer(entry, group.kind, w.limit, w.since, w.until)
        if records is None:
            self.metrics.event(tier, group.name, "unanswerable")
            return None
        self.metrics.event(tier, group.name, "negative_hit" if entry.negative else "hit")
        if state is Freshness.STALE:
            self.metrics.event(tier, group.name, "stale")
            self._refresh_later(w.key, group, tier)
        elif state is Freshness.EARLY:
            self.metrics.event(tier, group.name, "early_refresh")
            self._refresh_later(w.key, group, tier)
        return records

    def _entry_of(self, group: FeatureGroup, cached: Cached, now: int) -> Entry | None:
        if cached.records and cached.pttl is not None:
            return entry_from_cache(group, cached.records, cached.pttl, now, self.rand())
        if cached.negative_pttl is not None:
            return negative_entry(now, cached.negative_pttl)
        return None

    def _store_entry(
        self, group: FeatureGroup, key: Key, recs: list[Record], now: int, token: int
    ) -> Entry:
        """The entry of a store answer, put in the local tier and queued for Redis."""
        if recs:
            entry = entry_from_store(group, recs, now, self.rand(), self.rand())
        else:
            entry = negative_entry(now, min(self.config.negative_ttl_ms, group.ttl.hard))
        self.metrics.event("store", group.name, "hit" if recs else "negative_hit")
        if self.local is not None and "local" in group.tiers:
            self.local.put(key, entry, token)
        if self._fills is not None and "redis" in group.tiers:
            negative_ttl = entry.hard_at - now if entry.negative else 0
            self._fills.put(CacheFill(group.name, key[1], recs, negative_ttl))
        return entry

    # -- tier calls

    async def _redis_call(
        self, redis: CacheTier, guard: GuardedTier, keys: list[Key]
    ) -> list[Cached] | None:
        """One batch read; a failure counts once for the breaker whatever the batch size."""
        if not guard.allow():
            return None
        return await guard.run("read", redis.read_cached(keys), self.config.redis_timeout_ms)

    async def _store_fetch(
        self, groups: dict[Key, FeatureGroup], ranged: list[Query], token: int
    ) -> tuple[dict[Key, Entry | None], list[list[Record]] | None]:
        """Entries of the newest `max_items` of `groups` (single-flight) and the rows of
        the `ranged` queries (None when the store failed), in one store read; `token` is
        the local tier's, taken before the read began."""
        flight = self._flights.begin(groups)
        led: dict[Key, Entry] = {}
        ranged_rows: list[list[Record]] | None = None
        try:
            newest = [
                Query(g, i, groups[(g, i)].max_items if groups[(g, i)].kind == "timeseries" else 1)
                for g, i in flight.lead
            ]
            rows = await self._store_read([*newest, *ranged]) if newest or ranged else []
            now = self.clock()
            if rows is not None:
                ranged_rows = rows[len(newest) :]
                for key, recs in zip(flight.lead, rows, strict=False):
                    led[key] = self._store_entry(groups[key], key, recs, now, token)
        finally:
            self._flights.end(flight, led)
        entries: dict[Key, Entry | None] = dict(led)
        entries.update(await flight.followed())
        return entries, ranged_rows

    async def _store_read(self, queries: list[Query]) -> list[list[Record]] | None:
        if not self._store_guard.allow():
            return None
        start = self.clock()
        rows = await self._store_guard.run(
            "read", self.store.read(queries), self.config.store_timeout_ms
        )
        if rows is None:
            return None
        took = float(max(self.clock() - start, 1))
        for q in queries:
            self._delta[q.group] = 0.8 * self._delta.get(q.group, took) + 0.2 * took
        return rows

    # -- background work

    def _refresh_later(self, key: Key, group: FeatureGroup, tier: str) -> None:
        self._refreshes.start(key, partial(self._refresh, key, group, tier))

    async def _refresh(self, key: Key, group: FeatureGroup, tier: str) -> None:
        """Reload `key` from the tiers below `tier` (a fresh Redis value, else the store)."""
        token = 0 if self.local is None else self.local.token()
        if tier == "local" and self._redis_batch is not None and "redis" in group.tiers:
            cached = await self._redis_batch([key])
            now = self.clock()
            entry = None if cached is None else self._entry_of(group, cached[0], now)
            if entry is not None and now < entry.soft_at and self.local is not None:
                self.local.put(key, rebased(entry, group, self.rand(), self.rand()), token)
                return
        if "store" in group.tiers:
            await self._store_fetch({key: group}, [], token)
