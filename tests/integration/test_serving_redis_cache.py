"""The Redis cache side used by serving and ingestion: write_through, fill, read_cached."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from featureplane.cache import CacheFill
from featureplane.codec import Item, Record, make_item
from featureplane.spec import load_catalog
from featureplane.stores.redis import RedisStore
from featureplane.ttl import jittered

CATALOG = load_catalog(Path(__file__).parent.parent / "contract" / "catalog.yaml")
T0 = 1_763_800_000_000


@pytest.fixture
async def cache(redis_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(
        CATALOG, redis_url, clock=lambda: T0, prefix=f"t{uuid.uuid4().hex[:8]}:", rand=lambda: 0.5
    )
    async with store:
        yield store


def _small(uid: str, ts: int) -> Item:
    return make_item(CATALOG.group("small"), uid, ts, f"e{ts}", {"x": ts - T0})


def _rec(item: Item) -> Record:
    return Record(item.ts, item.version, item.value)


async def test_write_through_never_creates_a_partial_timeseries_key(cache: RedisStore) -> None:
    await cache.write_through([_small("u1", T0 + 1)])
    [got] = await cache.read_cached([("small", "u1")])
    assert got.records == [] and got.pttl is None and got.negative_pttl is None


async def test_fill_then_write_through_appends_capped_and_sets_hard_ttl(cache: RedisStore) -> None:
    items = [_small("u2", T0 + i) for i in range(5)]
    await cache.fill([CacheFill("small", "u2", [_rec(i) for i in reversed(items)])])
    await cache.write_through([_small("u2", T0 + 10), _small("u2", T0 + 11)])
    [got] = await cache.read_cached([("small", "u2")])
    assert [r.ts for r in got.records] == [T0 + 11, T0 + 10, T0 + 4, T0 + 3, T0 + 2]
    hard = CATALOG.group("small").ttl.hard
    assert got.pttl is not None
    assert jittered(hard, 0.1, 0.5) - 1000 < got.pttl <= jittered(hard, 0.1, 0.5)


async def test_negative_marker_and_its_removal_by_write_through(cache: RedisStore) -> None:
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


async def test_fill_merges_with_what_write_through_added(cache: RedisStore) -> None:
    first = [_small("u4", T0 + i) for i in range(2)]
    await cache.fill([CacheFill("small", "u4", [_rec(i) for i in reversed(first)])])
    new = _small("u4", T0 + 9)
    await cache.write_through([new])
    await cache.fill([CacheFill("small", "u4", [_rec(i) for i in reversed(first)])])
    [got] = await cache.read_cached([("small", "u4")])
    assert [r.ts for r in got.records] == [T0 + 9, T0 + 1, T0]
