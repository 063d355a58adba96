"""RedisStore and RedisCache against a real redis-server: the layout, caps, expiry, error
mapping, and a write-through too large for one script call. The cache's rules are pinned
by tests/contract/test_cache_contract.py."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from featureplane.cache import CacheFill
from featureplane.codec import Item, Record, make_item
from featureplane.errors import StoreError, TransientStoreError
from featureplane.spec import load_catalog
from featureplane.stores.base import Query
from featureplane.stores.redis import RedisStore
from featureplane.stores.redis_cache import RedisCache
from featureplane.stores.redis_layout import (
    THROUGH_KEYS,
    VERSION_LEN,
    key_of,
    member_of,
    negative_key_of,
)
from tests.services import free_port, start_redis

CATALOG = load_catalog(Path(__file__).parent.parent / "contract" / "catalog.yaml")
T0 = 1_763_800_000_000
HOUR = 3_600_000


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def store(redis_url: str, clock: Clock) -> AsyncIterator[RedisStore]:
    async with RedisStore(CATALOG, redis_url, clock=clock, prefix=f"t{uuid.uuid4().hex[:8]}:") as s:
        assert isinstance(s, RedisStore)
        yield s


def small(uid: str, ts: int, x: int, event: str | None = None) -> Item:
    return make_item(CATALOG.group("small"), uid, ts, event or f"e{ts}-{x}", {"x": x})


def aged(uid: str, ts: int, x: int) -> Item:
    return make_item(CATALOG.group("aged"), uid, ts, f"e{ts}", {"x": x})


async def test_key_never_holds_more_than_max_items(store: RedisStore, raw: aioredis.Redis) -> None:
    key = key_of(store.prefix, "small", "u1")
    for batch in range(6):
        await store.write([small("u1", T0 + batch * 100 + i, batch * 100 + i) for i in range(7)])
        assert await raw.zcard(key) == 5
    members = await raw.zrange(key, 0, -1, withscores=True)
    assert {score for _, score in members} == {0.0}
    assert [int(m[:13]) for m, _ in members] == [T0 + 500 + i for i in range(2, 7)]


async def test_old_items_written_late_do_not_displace_newer(store: RedisStore) -> None:
    await store.write([small("u1", T0 + i, i) for i in range(5, 10)])
    await store.write([small("u1", T0 + i, i) for i in range(5)])
    got = await store.read([Query("small", "u1", limit=50)])
    assert [r.ts for r in got[0]] == [T0 + i for i in range(9, 4, -1)]


async def test_member_is_version_then_value(store: RedisStore, raw: aioredis.Redis) -> None:
    item = small("u1", T0, 7, "evt")
    await store.write([item])
    [member] = await raw.zrange(key_of(store.prefix, "small", "u1"), 0, -1)
    assert member == item.version.encode() + item.value
    assert len(item.version) == VERSION_LEN


async def test_replay_with_another_value_overwrites(store: RedisStore, raw: aioredis.Redis) -> None:
    await store.write([small("u1", T0, 1, "same")])
    await store.write([small("u1", T0, 2, "same")])
    assert await raw.zcard(key_of(store.prefix, "small", "u1")) == 1
    [[record]] = await store.read([Query("small", "u1", limit=5)])
    assert record.value == b"[2]"


async def test_retention_sets_expiry_from_the_injected_clock(
    store: RedisStore, raw: aioredis.Redis, clock: Clock
) -> None:
    key = key_of(store.prefix, "aged", "u1")
    await store.write([aged("u1", T0 - HOUR // 2, 1)])
    assert HOUR // 2 - 5_000 < await raw.pttl(key) <= HOUR // 2
    await store.write([aged("u1", T0 - 2 * HOUR, 0)])  # already expired: never stored
    await store.write([aged("u1", T0 - HOUR // 4, 2)])  # a newer item pushes expiry out
    assert 3 * HOUR // 4 - 5_000 < await raw.pttl(key) <= 3 * HOUR // 4
    assert await raw.zcard(key) == 2
    clock.now = T0 + 6 * HOUR // 10  # the first item is past retention: this write removes it
    await store.write([aged("u1", T0, 3)])
    assert [int(m[:13]) for m in await raw.zrange(key, 0, -1)] == [T0 - HOUR // 4, T0]
    assert 4 * HOUR // 10 - 5_000 < await raw.pttl(key) <= 4 * HOUR // 10


async def test_no_retention_means_no_expiry(store: RedisStore, raw: aioredis.Redis) -> None:
    await store.write([small("u1", T0, 1), make_item(CATALOG.group("profile"), "u1", T0, "e", {})])
    assert await raw.pttl(key_of(store.prefix, "small", "u1")) == -1
    assert await raw.pttl(key_of(store.prefix, "profile", "u1")) == -1


async def test_scripts_are_reloaded_after_a_flush(store: RedisStore, raw: aioredis.Redis) -> None:
    await raw.script_flush()
    await store.write([small("u1", T0, 1), make_item(CATALOG.group("profile"), "u1", T0, "e", {})])
    got = await store.read([Query("small", "u1", limit=5), Query("profile", "u1")])
    assert [len(r) for r in got] == [1, 1]


async def test_zero_limit_and_empty_range_read_nothing(store: RedisStore) -> None:
    await store.write([small("u1", T0, 1)])
    got = await store.read(
        [
            Query("small", "u1", limit=0),
            Query("small", "u1", limit=5, since=T0 + 1, until=T0),
            Query("small", "u1", limit=5),
        ]
    )
    assert [len(r) for r in got] == [0, 0, 1]
    assert await store.read([]) == []


async def test_a_wrong_type_is_a_store_error_not_transient(
    store: RedisStore, raw: aioredis.Redis
) -> None:
    await raw.set(key_of(store.prefix, "small", "u1"), b"not a set")
    with pytest.raises(StoreError, match="WRONGTYPE") as info:
        await store.write([small("u1", T0, 1)])
    assert not isinstance(info.value, TransientStoreError)
    with pytest.raises(StoreError, match="WRONGTYPE"):
        await store.read([Query("small", "u1", limit=5)])


async def test_unreachable_redis_is_transient() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0?socket_connect_timeout=0.5"
    with pytest.raises(TransientStoreError, match="retried"):
        await RedisStore(CATALOG, url).start()


async def test_a_lost_server_is_transient_everywhere() -> None:
    svc = start_redis()
    url = f"redis://{svc.address}/0?socket_timeout=0.5"
    try:
        async with RedisStore(CATALOG, url) as store, RedisCache(CATALOG, url) as cache:
            await store.ping()
            await cache.ping()
            svc.kill()
            with pytest.raises(TransientStoreError, match="does not answer"):
                await store.ping()
            with pytest.raises(TransientStoreError):
                await store.write([small("u1", T0, 1)])
            with pytest.raises(TransientStoreError):
                await store.read([Query("small", "u1", limit=5)])
            with pytest.raises(TransientStoreError, match="does not answer"):
                await cache.ping()
            with pytest.raises(TransientStoreError):
                await cache.write_through([small("u1", T0, 1)])
            with pytest.raises(TransientStoreError):
                await cache.fill([CacheFill("small", "u1", [])])
            with pytest.raises(TransientStoreError):
                await cache.read_cached([("small", "u1")])
    finally:
        svc.cleanup()


async def test_not_started_is_a_clear_error() -> None:
    store = RedisStore(CATALOG, "redis://127.0.0.1:1/0")
    with pytest.raises(StoreError, match="not started"):
        await store.read([Query("small", "u1")])


async def test_a_client_passed_in_stays_open(redis_url: str, raw: aioredis.Redis) -> None:
    async with RedisStore(CATALOG, redis_url, client=raw, prefix="keep:") as store:
        await store.ping()
    assert await raw.ping()


async def test_a_decoding_client_is_refused(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(StoreError, match="decode_responses=False"):
            await RedisStore(CATALOG, redis_url, client=client).start()
    finally:
        await client.aclose()


THROUGH_CATALOG = """
feature_groups:
  - {name: ts, entity: user, kind: timeseries, features: [{name: x, type: int}], max_items: 3,
     ttl: {soft: 1m, hard: 10m, jitter: 0.5}}
  - {name: last, entity: user, kind: latest, features: [{name: x, type: int}],
     ttl: {soft: 1m, hard: 20m, jitter: 0.5}}
  - {name: around, entity: user, kind: latest, features: [{name: x, type: int}], write: around}
  - {name: nocache, entity: user, kind: latest, features: [{name: x, type: int}],
     tiers: [local, store]}
"""


async def test_write_through_of_a_batch_over_several_script_calls(
    redis_url: str, raw: aioredis.Redis, tmp_path: Path
) -> None:
    """More pairs than one call takes: every marker goes, values follow the cache rules."""
    (tmp_path / "groups.yaml").write_text(THROUGH_CATALOG)
    cat = load_catalog(tmp_path)
    n = THROUGH_KEYS + 100
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    async with RedisCache(cat, redis_url, clock=Clock(), prefix=prefix, rand=lambda: 0.0) as s:
        groups = ("ts", "last", "around", "nocache")
        await raw.mset({negative_key_of(prefix, g, f"u{i}"): b"" for g in groups for i in range(n)})
        # even timeseries keys exist (from a fill), odd ones do not
        ts_group, last_group = cat.group("ts"), cat.group("last")
        old = [make_item(ts_group, f"u{i}", T0 - 5, "old", {"x": -1}) for i in range(0, n, 2)]
        await s.fill([CacheFill("ts", it.id, [Record(it.ts, it.version, it.value)]) for it in old])
        newer = make_item(last_group, "u1", T0 + 100, "newer", {"x": 99})
        await s.write_through([newer])
        items = []
        for i in range(n):
            items += [make_item(ts_group, f"u{i}", T0 + k, f"e{i}-{k}", {"x": k}) for k in range(4)]
            items += [make_item(cat.group(g), f"u{i}", T0, f"e{i}", {"x": i}) for g in groups[1:]]
        await raw.pexpire(key_of(prefix, "last", "u1"), 1000)
        await s.write_through(items)
        # PTTLs read at once, in one round trip: the checks below take a while on a busy machine
        pipe = raw.pipeline(transaction=False)
        for i in range(0, n, 2):
            pipe.pttl(key_of(prefix, "ts", f"u{i}"))
        pipe.pttl(key_of(prefix, "last", "u0"))
        *ts_pttls, last_pttl = await pipe.execute()

        assert (
            await raw.exists(
                *(negative_key_of(prefix, g, f"u{i}") for g in groups for i in range(n))
            )
            == 0
        )
        for i in range(n):
            ts_key = key_of(prefix, "ts", f"u{i}")
            members = await raw.zrange(ts_key, 0, -1)
            if i % 2:
                assert members == []
            else:
                assert [m[:13] for m in members] == [str(T0 + k).encode() for k in (1, 2, 3)]
                assert 599_000 < ts_pttls[i // 2] <= 600_000  # hard 10m, rand 0
            got = await raw.get(key_of(prefix, "last", f"u{i}"))
            assert got == member_of(newer if i == 1 else items[7 * i + 4])
            assert not await raw.exists(
                key_of(prefix, "around", f"u{i}"), key_of(prefix, "nocache", f"u{i}")
            )
        # an older latest neither lands nor resets the expiry
        assert await raw.pttl(key_of(prefix, "last", "u1")) <= 1000
        assert 1_199_000 < last_pttl <= 1_200_000
