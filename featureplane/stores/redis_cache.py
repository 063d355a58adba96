"""The cache tier on Redis: `RedisCache` implements `featureplane.cache.CacheTier`.

It uses the layout and default prefix of `stores.redis_layout` (so
`RedisStore` reads what it wrote), with these rules:

    timeseries  a cached key holds exactly the newest min(max_items, total)
                items of the store, so it is *complete* (holds every item)
                when it has fewer than `max_items` members. `fill` merges the
                store's newest `max_items` records into the key; `write_through`
                appends only to keys that already exist, never creating a
                partial key. Both cap at `max_items` and trim past retention.
    latest      newest wins, as `keys.replaces` says.
    expiry      every cache write sets PEXPIRE to the group's hard TTL, shortened
                by up to `ttl.jitter` at random (`ttl.jittered`); Redis itself
                enforces "never past hard". `read_cached` returns PTTL in the same
                round trip, so serving knows a value's age (at least `hard - pttl`).
    negative    an empty `fill` writes the (group, id)'s negative marker, which
                lives for the fill's negative TTL; every `write_through` of that
                (group, id) deletes it.

Under Redis Cluster (`cluster=True`) a (group, id)'s keys share one hash slot
(`stores.redis_layout`), so every script call names keys of one slot: batched
reads and write-throughs are split by slot, and the calls go out in one
cluster pipeline, which redis-py sends to every node at once. While a slot is
being moved to another node (resharding), Redis answers TRYAGAIN to a command
over several of its keys (a read names a value key and its marker) until the
move ends: a call touching that slot fails as transient for that time, the
whole batch (serving reads it from the store, ingestion retries the write).

Races between write-through and a background fill (which read the store
earlier) can leave a cached value that misses a newer item; merging in `fill`
narrows this to a fill that creates a key concurrently with a write-through
of a key that did not exist. Such staleness lasts at most the key's hard TTL
(the negative TTL for markers).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from featureplane.cache import Cached, CacheFill, CacheTier
from featureplane.codec import Item
from featureplane.keys import newest
from featureplane.spec import Catalog, FeatureGroup
from featureplane.stores import _redis_lua as lua
from featureplane.stores._redis_conn import Client, RedisConnection
from featureplane.stores.base import Clock, cutoff, group_of, oldest_kept, wall_clock_ms
from featureplane.stores.redis_layout import (
    NEGATIVE_SUFFIX,
    THROUGH_KEYS,
    Call,
    ThroughEntry,
    by_slot,
    check_prefix,
    key_of,
    member_of,
    negative_key_of,
    records_of,
    stored_of,
    through_call,
    through_chunks,
    timeseries_members,
)
from featureplane.ttl import Rand, jittered

__all__ = ["RedisCache"]


class RedisCache:
    """The cache tier in Redis, with the rules of the module docstring."""

    name = "redis"

    def __init__(
        self,
        catalog: Catalog,
        url: str,
        *,
        clock: Clock = wall_clock_ms,
        prefix: str = "fp:",
        client: Client | None = None,
        rand: Rand = random.random,
        cluster: bool = False,
    ) -> None:
        """`clock` judges retention, `rand` draws the TTL jitter; `client`: use this one
        (left open by `aclose`) instead of connecting to `url`; `cluster`: `url` is a node
        of a Redis Cluster."""
        self.catalog = catalog
        self.clock = clock
        self.rand = rand
        self.url = url
        self.prefix = check_prefix(prefix)
        self.connection = RedisConnection(url, client, owner="RedisCache", cluster=cluster)

    async def __aenter__(self) -> RedisCache:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        await self.connection.start()

    async def aclose(self) -> None:
        """Close the client if this cache created it; a client passed in stays open."""
        await self.connection.aclose()

    async def ping(self) -> None:
        await self.connection.ping()

    def _ttl(self, group: FeatureGroup) -> int:
        return jittered(group.ttl.hard, group.ttl.jitter, self.rand())

    async def write_through(self, items: Sequence[Item]) -> None:
        """Apply freshly written items (ingestion's write-through).

        latest: newest wins. timeseries: appended only to keys that already exist (a
        cached key holds the store's newest items, so it is never created from a partial
        batch), capped at `max_items`; a group whose tiers lack `store` has no other copy,
        so its keys are created. Written keys expire after the group's hard TTL
        (with jitter); every (group, id) loses its negative marker. Groups that are
        on-demand, not cached in Redis, or `write: around` only lose their markers.

        One script call writes up to `THROUGH_KEYS` pairs (KEYS and ARGV flattened): the
        client's CPU per call, not Redis, bounded the per-key calls. Under Redis Cluster
        the pairs are grouped by hash slot first, as a multi-key script needs.
        """
        by_key: dict[tuple[str, str], list[Item]] = {}
        for item in items:
            pair = (item.group, item.id)
            same = by_key.get(pair)
            if same is None:
                by_key[pair] = [item]
            else:
                same.append(item)
        if not by_key:
            return
        slot_of = self.connection.slot_of()
        now, rand, prefix = self.clock(), self.rand, self.prefix
        # A group's rules, worked out once a call rather than once a key (the client's
        # CPU per key bounds ingestion, not Redis).
        plans: dict[str, _Through | None] = {}
        entries: list[ThroughEntry] = []
        for (group_name, entity_id), batch in by_key.items():
            if group_name in plans:
                plan = plans[group_name]
            else:
                plan = plans[group_name] = _through(group_of(self.catalog, group_name), now)
            key = key_of(prefix, group_name, entity_id)
            neg = key + NEGATIVE_SUFFIX
            if plan is None:
                entries.append((None, neg, []))
                continue
            if plan.kind is None:  # latest
                best = batch[0] if len(batch) == 1 else newest(batch)
                ttl = jittered(plan.hard_ms, plan.jitter, rand())
                entries.append((key, neg, [b"l", ttl, member_of(best)]))
                continue
            members = timeseries_members(batch, plan.max_items, plan.cutoff)
            if not members:
                entries.append((None, neg, []))
                continue
            ttl = jittered(plan.hard_ms, plan.jitter, rand())
            args: list[bytes | int | str] = [plan.kind, ttl, plan.max_items, plan.low]
            args += [len(members), *members]
            entries.append((key, neg, args))
        calls = [through_call(chunk) for chunk in through_chunks(entries, THROUGH_KEYS, slot_of)]
        await self.connection.run(calls, "cache write")

    async def fill(self, fills: Sequence[CacheFill]) -> None:
        """Merge what the store answered into the cache (serving's background write-back).

        A timeseries fill must carry the store's newest `max_items` records (fewer only when
        the store holds fewer), so the key keeps its completeness rule. An empty fill
        writes a negative marker instead.
        """
        calls: list[Call] = []
        markers: list[tuple[bytes, int]] = []
        now = self.clock()
        for f in fills:
            group = group_of(self.catalog, f.group)
            if not f.records:
                markers.append((negative_key_of(self.prefix, f.group, f.id), f.negative_ttl_ms))
                continue
            key = key_of(self.prefix, f.group, f.id)
            if group.kind == "latest":
                best = stored_of(newest(f.records))
                calls.append((lua.CACHE_LATEST_SHA, [key], [best, self._ttl(group)]))
                continue
            low = oldest_kept(group, now)
            members = [stored_of(r) for r in f.records[: group.max_items]]
            args: list[bytes | int | str] = [group.max_items, low, self._ttl(group), "0"]
            calls.append((lua.CACHE_TIMESERIES_SHA, [key], [*args, *members]))
        await self.connection.run(calls, "cache write", markers)

    async def read_cached(self, keys: Sequence[tuple[str, str]]) -> list[Cached]:
        """Every cached member, PTTL and negative marker of each (group, id): one round trip.

        One script call reads the whole batch: redis-py spends far more CPU per command
        than Redis does, so 1 command beats a pipeline of 3 a pair. Redis Cluster refuses
        a script over keys of several slots, so there the batch becomes one call per slot,
        all in one pipeline, and the answers are put back in request order.
        """
        if not keys:
            return []
        names: list[bytes] = []
        kinds: list[bytes | int | str] = []
        for group_name, entity_id in keys:
            group = group_of(self.catalog, group_name)
            names.append(key_of(self.prefix, group_name, entity_id))
            kinds.append("l" if group.kind == "latest" else "t")
        slot_of = self.connection.slot_of()
        runs = [list(range(len(keys)))] if slot_of is None else by_slot(names, slot_of)
        calls: list[Call] = []
        for run in runs:
            pairs = [k for i in run for k in (names[i], names[i] + NEGATIVE_SUFFIX)]
            calls.append((lua.CACHE_READ_SHA, pairs, [kinds[i] for i in run]))
        replies = await self.connection.run(calls, "cache read")
        out: dict[int, Cached] = {}
        for run, results in zip(runs, replies, strict=True):
            for i, j in zip(run, range(0, len(results), 3), strict=True):
                value, pttl, neg = results[j : j + 3]
                records = records_of(value or None)
                out[i] = Cached(
                    records,
                    int(pttl) if records and pttl >= 0 else None,
                    int(neg) if neg >= 0 else None,
                )
        return [out[i] for i in range(len(keys))]


@dataclass(frozen=True, slots=True)
class _Through:
    """How `write_through` writes the keys of one group (at one `now`)."""

    kind: bytes | None
    """None: latest; b"t": timeseries appended to existing keys; b"T": created too."""
    hard_ms: int
    jitter: float
    max_items: int
    cutoff: int | None
    low: str


def _through(group: FeatureGroup, now: int) -> _Through | None:
    """The group's write-through, or None when it only loses its negative markers."""
    if group.on_demand or group.write == "around" or "redis" not in group.tiers:
        return None
    kind = None if group.kind == "latest" else (b"t" if "store" in group.tiers else b"T")
    return _Through(
        kind,
        group.ttl.hard,
        group.ttl.jitter,
        group.max_items,
        cutoff(group, now),
        oldest_kept(group, now),
    )


def _implements_the_protocol(cache: RedisCache) -> CacheTier:
    """Never called: the type checker proves here that `RedisCache` is a `CacheTier`."""
    return cache
