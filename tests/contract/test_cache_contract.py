"""The cache contract: the rules of the cache tier (`featureplane.cache.CacheTier`), pinned
against `RedisCache` on a real redis-server and on a real 3-master Redis Cluster, with an
injected clock and jitter draw.

Rules: `fill` then `read_cached` gives back what the store answered; `write_through`
appends only to timeseries keys that exist and never creates a partial one (but creates
the keys of a group without a store, which Redis alone holds); latest values
follow `keys.replaces` whatever the order of write-throughs and fills; an empty fill
writes a negative marker that a write-through of that (group, id) clears; every written
key lives at most its group's jittered hard TTL; a key holds at most `max_items` and
nothing past retention; groups not cached in Redis are never written.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from featureplane.cache import Cached, CacheFill
from featureplane.codec import Item, Record, make_item
from featureplane.errors import NotStartedError, UnknownGroupError
from featureplane.keys import version
from featureplane.spec import Catalog
from featureplane.stores._redis_conn import Client
from featureplane.stores.redis_cache import RedisCache
from featureplane.stores.redis_layout import key_of
from featureplane.ttl import jittered
from tests.contract.conftest import CACHE_CATALOG as CATALOG
from tests.contract.conftest import FakeClock, FixedRand

T0 = 1_763_800_000_000
HOUR = 3_600_000
MakeCache = Callable[[Catalog, FakeClock, FixedRand], RedisCache]


def _small(uid: str, ts: int) -> Item:
    return make_item(CATALOG.group("small"), uid, ts, f"e{ts}", {"x": ts - T0})


def _item(group: str, uid: str, ts: int, x: int, event: str | None = None) -> Item:
    return make_item(CATALOG.group(group), uid, ts, event or f"e{ts}-{x}", {"x": x})


def _rec(item: Item) -> Record:
    return Record(item.ts, item.version, item.value)


async def _one(cache: RedisCache, group: str, uid: str) -> Cached:
    [got] = await cache.read_cached([(group, uid)])
    return got


# ---------------------------------------------------------------- fill and read


async def test_fill_then_read_cached_gives_back_what_the_store_answered(cache: RedisCache) -> None:
    series = [_item("series", "u1", T0 + i, i) for i in range(3)]
    last = _item("last", "u1", T0, 7)
    await cache.fill(
        [
            CacheFill("series", "u1", [_rec(i) for i in reversed(series)]),
            CacheFill("last", "u1", [_rec(last)]),
        ]
    )
    got = await cache.read_cached([("last", "u1"), ("series", "u1"), ("last", "absent")])
    assert got[0].records == [_rec(last)] and got[0].negative_pttl is None
    assert got[1].records == [_rec(i) for i in reversed(series)]
    assert got[2] == Cached([], None, None)
    assert await cache.read_cached([]) == []


async def test_write_through_never_creates_a_partial_timeseries_key(cache: RedisCache) -> None:
    await cache.write_through([_small("u1", T0 + 1)])
    [got] = await cache.read_cached([("small", "u1")])
    assert got.records == [] and got.pttl is None and got.negative_pttl is None


async def test_write_through_creates_the_key_of_a_group_without_a_store(
    cache: RedisCache,
) -> None:
    # Redis is the only copy of a `tiers: [local, redis]` group: nothing else would ever
    # create its key, so the write-through does (capped at max_items, newest first).
    await cache.write_through([_item("cacheonly", "u1", T0 + i, i) for i in range(3)])
    await cache.write_through([_item("cacheonly", "u1", T0 + 5, 5)])
    got = await _one(cache, "cacheonly", "u1")
    assert [r.ts for r in got.records] == [T0 + 5, T0 + 2]
    assert got.pttl is not None


async def test_fill_then_write_through_appends_capped_and_sets_hard_ttl(cache: RedisCache) -> None:
    items = [_small("u2", T0 + i) for i in range(5)]
    await cache.fill([CacheFill("small", "u2", [_rec(i) for i in reversed(items)])])
    await cache.write_through([_small("u2", T0 + 10), _small("u2", T0 + 11)])
    [got] = await cache.read_cached([("small", "u2")])
    assert [r.ts for r in got.records] == [T0 + 11, T0 + 10, T0 + 4, T0 + 3, T0 + 2]
    hard = CATALOG.group("small").ttl.hard
    assert got.pttl is not None
    assert jittered(hard, 0.1, 0.5) - 1000 < got.pttl <= jittered(hard, 0.1, 0.5)


async def test_fill_merges_with_what_write_through_added(cache: RedisCache) -> None:
    first = [_small("u4", T0 + i) for i in range(2)]
    await cache.fill([CacheFill("small", "u4", [_rec(i) for i in reversed(first)])])
    new = _small("u4", T0 + 9)
    await cache.write_through([new])
    await cache.fill([CacheFill("small", "u4", [_rec(i) for i in reversed(first)])])
    [got] = await cache.read_cached([("small", "u4")])
    assert [r.ts for r in got.records] == [T0 + 9, T0 + 1, T0]


async def test_a_replayed_timeseries_item_is_kept_once(cache: RedisCache) -> None:
    items = [_item("series", "u1", T0 + i, i) for i in range(2)]
    await cache.fill([CacheFill("series", "u1", [_rec(i) for i in reversed(items)])])
    await cache.write_through([items[1], items[1]])
    await cache.fill([CacheFill("series", "u1", [_rec(i) for i in reversed(items)])])
    assert (await _one(cache, "series", "u1")).records == [_rec(i) for i in reversed(items)]


# ---------------------------------------------------------------- newest wins


def _versions(uid: str) -> tuple[Item, Item, Item]:
    """An older, a newer, and the newer again (the same event replayed) for `uid`."""
    old = _item("last", uid, T0, 1, "old")
    new, again = (_item("last", uid, T0 + 5, 2, "new") for _ in range(2))
    return old, new, again


async def test_latest_newest_wins_whatever_the_order_of_writes_and_fills(
    cache: RedisCache,
) -> None:
    """Older, equal (the same event again) and newer versions, through write-through and
    fill in every order, leave the newest value; a replay never fails."""
    for n, order in enumerate(itertools.permutations(range(3))):
        for via in ("through", "fill", "mixed"):
            uid = f"u{n}-{via}"
            versions = _versions(uid)
            for k, i in enumerate(order):
                if via == "through" or (via == "mixed" and k % 2 == 0):
                    await cache.write_through([versions[i]])
                else:
                    await cache.fill([CacheFill("last", uid, [_rec(versions[i])])])
            got = await _one(cache, "last", uid)
            assert got.records == [_rec(versions[1])], (order, via)
    # in one write-through batch and in one fill, too
    old, new, again = _versions("v")
    await cache.write_through([new, old, again])
    await cache.fill([CacheFill("last", "w", [_rec(i) for i in _versions("w")])])
    got = await cache.read_cached([("last", "v"), ("last", "w")])
    assert [c.records for c in got] == [[_rec(new)], [_rec(_versions("w")[1])]]


async def test_negative_marker_and_its_removal_by_write_through(cache: RedisCache) -> None:
    await cache.fill([CacheFill("profile", "u3", [], negative_ttl_ms=4000)])
    [got] = await cache.read_cached([("profile", "u3")])
    assert got.records == [] and got.negative_pttl is not None and 3000 < got.negative_pttl <= 4000
    item = make_item(CATALOG.group("profile"), "u3", T0, "e", {"keywords": {"a"}})
    await cache.write_through([item])
    [got] = await cache.read_cached([("profile", "u3")])
    assert got.records == [_rec(item)] and got.negative_pttl is None
    older = make_item(CATALOG.group("profile"), "u3", T0 - 5, "e0", {"keywords": {"b"}})
    await cache.write_through([older])
    await cache.fill([CacheFill("profile", "u3", [_rec(older)])])
    [got] = await cache.read_cached([("profile", "u3")])
    assert got.records == [_rec(item)]


async def test_a_write_through_that_caches_nothing_still_clears_the_marker(
    cache: RedisCache,
) -> None:
    groups = ("small", "around", "nocache", "computed")
    await cache.fill([CacheFill(g, "u1", [], negative_ttl_ms=60_000) for g in groups])
    assert all(c.negative_pttl for c in await cache.read_cached([(g, "u1") for g in groups]))
    await cache.write_through([_item(g, "u1", T0, 1) for g in groups[1:]] + [_small("u1", T0)])
    got = await cache.read_cached([(g, "u1") for g in groups])
    assert got == [Cached([], None, None)] * len(groups)


# ---------------------------------------------------------------- expiry, caps, retention


@pytest.mark.parametrize("r", [0.0, 0.5, 0.999])
async def test_every_write_lives_at_most_the_jittered_hard_ttl(
    make_cache: MakeCache, clock: FakeClock, r: float
) -> None:
    async with make_cache(CATALOG, clock, FixedRand(r)) as cache:
        series = [_item("series", "u1", T0 + i, i) for i in range(2)]
        await cache.fill([CacheFill("series", "u1", [_rec(series[0])])])
        await cache.write_through([series[1], _item("last", "u1", T0, 1)])
        await cache.fill([CacheFill("last", "u2", [_rec(_item("last", "u2", T0, 2))])])
        got = await cache.read_cached([("series", "u1"), ("last", "u1"), ("last", "u2")])
    for (name, _), cached in zip([("series", 0), ("last", 1), ("last", 2)], got, strict=True):
        ttl = CATALOG.group(name).ttl
        top = jittered(ttl.hard, ttl.jitter, r)
        assert cached.pttl is not None and top - 1000 < cached.pttl <= top, (name, r)
        assert cached.pttl <= ttl.hard


async def test_an_older_latest_neither_lands_nor_extends_the_ttl(
    cache: RedisCache, raw: Client
) -> None:
    new, old = _item("last", "u1", T0 + 1, 1), _item("last", "u1", T0, 0)
    await cache.write_through([new])
    await raw.pexpire(key_of(cache.prefix, "last", "u1"), 1000)
    await cache.write_through([old])
    await cache.fill([CacheFill("last", "u1", [_rec(old)])])
    got = await _one(cache, "last", "u1")
    assert got.records == [_rec(new)] and got.pttl is not None and got.pttl <= 1000


async def test_a_key_holds_at_most_max_items_the_newest(cache: RedisCache) -> None:
    items = [_item("series", "u1", T0 + i, i) for i in range(6)]
    await cache.fill([CacheFill("series", "u1", [_rec(i) for i in reversed(items[:5])])])
    assert [r.ts for r in (await _one(cache, "series", "u1")).records] == [T0 + 4, T0 + 3, T0 + 2]
    await cache.write_through(items[:2] + items[5:])
    assert [r.ts for r in (await _one(cache, "series", "u1")).records] == [T0 + 5, T0 + 4, T0 + 3]


async def test_nothing_past_retention_is_kept(cache: RedisCache, clock: FakeClock) -> None:
    aged = CATALOG.group("aged")
    old = make_item(aged, "u1", T0 - 2 * HOUR, "old", {"x": 1})
    mid = make_item(aged, "u1", T0 - HOUR // 2, "mid", {"x": 2})
    await cache.fill([CacheFill("aged", "u1", [_rec(mid), _rec(old)])])
    assert (await _one(cache, "aged", "u1")).records == [_rec(mid)]
    clock.now = T0 + HOUR // 2 + 1  # `mid` is now past retention: the next write trims it
    new = make_item(aged, "u1", T0 + HOUR // 2, "new", {"x": 3})
    await cache.write_through([new, old])
    assert (await _one(cache, "aged", "u1")).records == [_rec(new)]


# ---------------------------------------------------------------- errors


async def test_unknown_group_is_an_error_naming_it(cache: RedisCache) -> None:
    item = Item("nope", "u1", T0, version(T0, "e"), b"[1]")
    with pytest.raises(UnknownGroupError) as info:
        await cache.write_through([item])
    assert info.value.group == "nope"
    with pytest.raises(UnknownGroupError):
        await cache.fill([CacheFill("nope", "u1", [_rec(item)])])
    with pytest.raises(UnknownGroupError):
        await cache.read_cached([("small", "u1"), ("nope", "u1")])


async def test_use_before_start_or_after_close_is_not_started(
    make_cache: MakeCache, clock: FakeClock, rand: FixedRand
) -> None:
    cache = make_cache(CATALOG, clock, rand)
    item = _item("last", "u1", T0, 1)
    for _ in ("before start", "after aclose"):
        with pytest.raises(NotStartedError):
            await cache.write_through([item])
        with pytest.raises(NotStartedError):
            await cache.fill([CacheFill("last", "u1", [_rec(item)])])
        with pytest.raises(NotStartedError):
            await cache.read_cached([("last", "u1")])
        with pytest.raises(NotStartedError):
            await cache.ping()
        await cache.start()
        await cache.ping()
        await cache.aclose()


async def test_scripts_are_reloaded_after_a_flush(cache: RedisCache, raw: Client) -> None:
    # under a cluster, SCRIPT FLUSH goes to every primary
    item = _item("last", "u1", T0, 1)
    await raw.script_flush()
    await cache.write_through([item])
    await raw.script_flush()
    await cache.fill([CacheFill("last", "u2", [_rec(item)]), CacheFill("last", "u3", [])])
    await raw.script_flush()
    got = await cache.read_cached([("last", "u1"), ("last", "u2"), ("last", "u3")])
    assert [len(c.records) for c in got] == [1, 1, 0] and got[2].negative_pttl is not None
