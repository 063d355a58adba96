"""The tiered read path: in-process LRU -> Redis -> store, per group's `tiers`.

One request's (group, id) pairs go through each tier in one round trip (one
Redis pipeline, one `Store.read` batch). A tier's answer is used only when
`freshness.answer` says it is exact; otherwise the pair falls through. What a
lower tier answers is written to the tiers above: the local LRU at once (a
dict insert), Redis by a background flusher in batches, never on the request
path.

Freshness: past soft a value is served and refreshed in the background; past
hard never served; XFetch refreshes hot keys early. Concurrent store reads of
one (group, id) are single-flight: one leader reads, the rest await its
future. Misses are remembered as negative entries for `negative_ttl_ms`.

Degradation: every Redis and store call has a timeout and a circuit breaker.
Redis failing: its pairs fall through to the store. Store failing: pairs that
no cache could answer within hard TTL come back as None (serving answers 503).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from featureplane.cache import Cached, CacheFill
from featureplane.codec import Record
from featureplane.errors import StoreError
from featureplane.serving.breaker import Breaker
from featureplane.serving.coalesce import Coalescer
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
from featureplane.serving.local import LocalCache
from featureplane.serving.metrics import Metrics
from featureplane.spec import Catalog, FeatureGroup
from featureplane.stores.base import Clock, Query, Store, wall_clock_ms
from featureplane.stores.redis import RedisStore

__all__ = ["Lookup", "ReaderConfig", "TieredReader"]

log = logging.getLogger(__name__)
Key = tuple[str, str]
_MAX_PENDING_FILLS = 20_000
_FILL_BATCH = 256


@dataclass(frozen=True, slots=True)
class Lookup:
    """One (group, id) of a request, with its timeseries query."""

    group: FeatureGroup
    id: str
    limit: int = 1
    since: int | None = None
    until: int | None = None


@dataclass(frozen=True, slots=True)
class ReaderConfig:
    negative_ttl_ms: int = 5_000
    redis_timeout_ms: int = 100
    store_timeout_ms: int = 1_000
    breaker_failures: int = 5
    breaker_cooldown_ms: int = 2_000
    xfetch_beta: float = 1.0


class TieredReader:
    """Answers lookups from the highest tier that can answer them exactly."""

    def __init__(
        self,
        *,
        catalog: Catalog,
        store: Store | None,
        redis: RedisStore | None,
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
        self._inflight: dict[Key, asyncio.Future[Entry | None]] = {}
        self._refreshing: set[Key] = set()
        self._fills: list[CacheFill] = []
        self._fill_ready = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._delta: dict[str, float] = {}
        # Concurrent requests' Redis reads leave in one script call (serving/coalesce.py).
        self._redis_batch: Coalescer[Key, Cached] = Coalescer(self._redis_call)

    # -- lifecycle

    async def start(self) -> None:
        if self.redis is not None and self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop())

    async def aclose(self) -> None:
        """Stop background work; queued Redis fills are flushed once, best effort."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._redis_batch.aclose()
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        if self._fills:
            await self._flush_once()

    async def idle(self) -> None:
        """Wait until background refreshes and queued fills are done (tests, benches)."""
        while self._tasks or self._fills or self._inflight:
            await asyncio.sleep(0.005)

    # -- reads

    def clamp(self, lookup: Lookup) -> tuple[int, int | None, int | None]:
        group = lookup.group
        if group.kind == "latest":
            return 1, None, None
        since = lookup.since
        if group.retention is not None:
            cutoff = self.clock() - group.retention
            since = cutoff if since is None else max(since, cutoff)
        return min(lookup.limit, group.max_items), since, lookup.until

    async def read(self, lookups: Sequence[Lookup]) -> list[list[Record] | None]:
        """Newest-first records per lookup; None where no tier could answer."""
        now = self.clock()
        out: list[list[Record] | None] = [None] * len(lookups)
        clamped = [self.clamp(lk) for lk in lookups]
        pending = list(range(len(lookups)))
        if self.local is not None:
            pending = self._read_local(lookups, clamped, pending, out, now)
        if pending and self.redis is not None:
            pending = await self._read_redis(lookups, clamped, pending, out, now)
        if pending:
            await self._read_store(lookups, clamped, pending, out)
        return out

    def _read_local(
        self,
        lookups: Sequence[Lookup],
        clamped: list[tuple[int, int | None, int | None]],
        pending: list[int],
        out: list[list[Record] | None],
        now: int,
    ) -> list[int]:
        assert self.local is not None
        rest: list[int] = []
        for i in pending:
            lk = lookups[i]
            group = lk.group
            if "local" not in group.tiers:
                rest.append(i)
                continue
            key = (group.name, lk.id)
            entry = self.local.get(key)
            res = None
            if entry is not None:
                res = self._serve(entry, "local", group, key, clamped[i], now)
            if res is None:
                if entry is None:
                    self.metrics.event("local", group.name, "miss")
                rest.append(i)
            else:
                out[i] = res
        return rest

    async def _read_redis(
        self,
        lookups: Sequence[Lookup],
        clamped: list[tuple[int, int | None, int | None]],
        pending: list[int],
        out: list[list[Record] | None],
        now: int,
    ) -> list[int]:
        sel = [i for i in pending if "redis" in lookups[i].group.tiers]
        if not sel:
            return pending
        keys = list(dict.fromkeys((lookups[i].group.name, lookups[i].id) for i in sel))
        cached = await self._redis_read(keys)
        if cached is None:
            return pending
        entries = dict(
            zip(
                keys,
                (self._entry_of(k, c, now) for k, c in zip(keys, cached, strict=True)),
                strict=True,
            )
        )
        rest = [i for i in pending if "redis" not in lookups[i].group.tiers]
        for i in sel:
            lk = lookups[i]
            key = (lk.group.name, lk.id)
            entry = entries[key]
            if entry is None:
                self.metrics.event("redis", lk.group.name, "miss")
                rest.append(i)
                continue
            res = self._serve(entry, "redis", lk.group, key, clamped[i], now)
            if self.local is not None and "local" in lk.group.tiers and now < entry.hard_at:
                self.local.put(key, rebased(entry, lk.group, self.rand(), self.rand()))
            if res is None:
                rest.append(i)
            else:
                out[i] = res
        rest.sort()
        return rest

    async def _read_store(
        self,
        lookups: Sequence[Lookup],
        clamped: list[tuple[int, int | None, int | None]],
        pending: list[int],
        out: list[list[Record] | None],
    ) -> None:
        sel: list[int] = []
        for i in pending:
            if "store" in lookups[i].group.tiers and self.store is not None:
                sel.append(i)
            else:  # the group's lowest tier missed: a cache-only group has nothing
                out[i] = []
        if not sel:
            return
        keys = {(lookups[i].group.name, lookups[i].id): lookups[i].group for i in sel}
        exact = [i for i in sel if clamped[i][1] is not None or clamped[i][2] is not None]
        exact_q = [Query(lookups[i].group.name, lookups[i].id, *clamped[i]) for i in exact]
        entries, exact_rows = await self._store_fetch(keys, exact_q)
        rows = dict(zip(exact, exact_rows, strict=True)) if exact_rows is not None else {}
        for i in sel:
            lk = lookups[i]
            if i in rows:
                out[i] = rows[i]
                continue
            entry = entries.get((lk.group.name, lk.id))
            if entry is not None:
                out[i] = answer(entry, lk.group.kind, *clamped[i])

    # -- tiers

    def _serve(
        self,
        entry: Entry,
        tier: str,
        group: FeatureGroup,
        key: Key,
        q: tuple[int, int | None, int | None],
        now: int,
    ) -> list[Record] | None:
        state = freshness(
            entry, now, self._delta.get(group.name, 1.0), self.config.xfetch_beta, 1.0 - self.rand()
        )
        if state is Freshness.EXPIRED:
            self.metrics.event(tier, group.name, "miss")
            return None
        res = answer(entry, group.kind, *q)
        if res is None:
            self.metrics.event(tier, group.name, "unanswerable")
            return None
        self.metrics.event(tier, group.name, "negative_hit" if entry.negative else "hit")
        if state is Freshness.STALE:
            self.metrics.event(tier, group.name, "stale")
            self._refresh_later(key, group, tier)
        elif state is Freshness.EARLY:
            self.metrics.event(tier, group.name, "early_refresh")
            self._refresh_later(key, group, tier)
        return res

    def _entry_of(self, key: Key, cached: Cached, now: int) -> Entry | None:
        group = self._group_of(key)
        if cached.records and cached.pttl is not None:
            return entry_from_cache(group, cached.records, cached.pttl, now, self.rand())
        if cached.negative_pttl is not None:
            return negative_entry(now, cached.negative_pttl)
        return None

    def _group_of(self, key: Key) -> FeatureGroup:
        return self.catalog.groups[key[0]]

    async def _redis_read(self, keys: list[Key]) -> list[Cached] | None:
        """What Redis holds for `keys`, sent with the other reads of this loop iteration."""
        return await self._redis_batch(keys)

    async def _redis_call(self, keys: list[Key]) -> list[Cached] | None:
        """One batch read; a failure counts once for the breaker whatever the batch size."""
        assert self.redis is not None
        breaker = self.breakers["redis"]
        if not breaker.allow():
            return None
        try:
            async with asyncio.timeout(self.config.redis_timeout_ms / 1000):
                cached = await self.redis.read_cached(keys)
        except (StoreError, TimeoutError) as exc:
            self._failed("redis", "read", exc)
            return None
        breaker.success()
        self._breaker_metric("redis")
        return cached

    async def _store_fetch(
        self, keys: dict[Key, FeatureGroup], exact: list[Query]
    ) -> tuple[dict[Key, Entry | None], list[list[Record]] | None]:
        """Newest-max_items entries of `keys` (single-flight) and the `exact` queries' rows."""
        assert self.store is not None
        loop = asyncio.get_running_loop()
        waits = {k: self._inflight[k] for k in keys if k in self._inflight}
        lead = [k for k in keys if k not in waits]
        mine: dict[Key, asyncio.Future[Entry | None]] = {k: loop.create_future() for k in lead}
        self._inflight.update(mine)
        entries: dict[Key, Entry | None] = {}
        exact_rows: list[list[Record]] | None = None
        try:
            queries = [
                Query(g, i, keys[(g, i)].max_items if keys[(g, i)].kind == "timeseries" else 1)
                for g, i in lead
            ]
            rows = await self._store_read([*queries, *exact]) if queries or exact else []
            now = self.clock()
            if rows is not None:
                exact_rows = rows[len(queries) :]
                for key, recs in zip(lead, rows, strict=False):
                    entries[key] = self._store_entry(keys[key], key, recs, now)
        finally:
            for key, fut in mine.items():
                del self._inflight[key]
                if not fut.done():
                    fut.set_result(entries.get(key))
        for key, fut in waits.items():
            entries[key] = await asyncio.shield(fut)
        return entries, exact_rows

    def _store_entry(self, group: FeatureGroup, key: Key, recs: list[Record], now: int) -> Entry:
        if recs:
            entry = entry_from_store(group, recs, now, self.rand(), self.rand())
        else:
            entry = negative_entry(now, min(self.config.negative_ttl_ms, group.ttl.hard))
        if self.local is not None and "local" in group.tiers:
            self.local.put(key, entry)
        if self.redis is not None and "redis" in group.tiers:
            if len(self._fills) < _MAX_PENDING_FILLS:
                self._fills.append(
                    CacheFill(
                        group.name, key[1], recs, entry.hard_at - now if entry.negative else 0
                    )
                )
                self._fill_ready.set()
            else:
                self.metrics.errors.labels("redis", "fill_dropped").inc()
        return entry

    async def _store_read(self, queries: list[Query]) -> list[list[Record]] | None:
        assert self.store is not None
        breaker = self.breakers["store"]
        if not breaker.allow():
            return None
        start = self.clock()
        try:
            async with asyncio.timeout(self.config.store_timeout_ms / 1000):
                rows = await self.store.read(queries)
        except (StoreError, TimeoutError) as exc:
            self._failed("store", "read", exc)
            return None
        breaker.success()
        self._breaker_metric("store")
        took = float(max(self.clock() - start, 1))
        for q in queries:
            self._delta[q.group] = 0.8 * self._delta.get(q.group, took) + 0.2 * took
        return rows

    def _failed(self, tier: str, op: str, exc: BaseException) -> None:
        self.breakers[tier].failure()
        self._breaker_metric(tier)
        self.metrics.errors.labels(tier, op).inc()
        log.debug("%s %s failed: %r", tier, op, exc)

    def _breaker_metric(self, tier: str) -> None:
        self.metrics.breaker.labels(tier).set(int(self.breakers[tier].state))

    # -- background work

    def _refresh_later(self, key: Key, group: FeatureGroup, tier: str) -> None:
        if key in self._refreshing:
            return
        self._refreshing.add(key)
        task = asyncio.create_task(self._refresh(key, group, tier))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, key: Key, group: FeatureGroup, tier: str) -> None:
        """Reload `key` from the tiers below `tier` (a fresh Redis value, else the store)."""
        try:
            if tier == "local" and self.redis is not None and "redis" in group.tiers:
                cached = await self._redis_read([key])
                now = self.clock()
                entry = None if cached is None else self._entry_of(key, cached[0], now)
                if entry is not None and now < entry.soft_at and self.local is not None:
                    self.local.put(key, rebased(entry, group, self.rand(), self.rand()))
                    return
            if self.store is not None and "store" in group.tiers:
                await self._store_fetch({key: group}, [])
        except Exception:  # a background task must never die noisily
            log.exception("background refresh of %s failed", key)
        finally:
            self._refreshing.discard(key)

    async def _flush_loop(self) -> None:
        while True:
            await self._fill_ready.wait()
            self._fill_ready.clear()
            while self._fills:
                await self._flush_once()

    async def _flush_once(self) -> None:
        assert self.redis is not None
        batch, self._fills = self._fills[:_FILL_BATCH], self._fills[_FILL_BATCH:]
        if not self.breakers["redis"].allow():
            self.metrics.errors.labels("redis", "fill_dropped").inc(len(batch))
            return
        try:
            async with asyncio.timeout(self.config.redis_timeout_ms * 5 / 1000):
                await self.redis.fill(batch)
        except (StoreError, TimeoutError) as exc:
            self._failed("redis", "fill", exc)
            return
        self.breakers["redis"].success()
