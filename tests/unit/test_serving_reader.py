"""TieredReader and the app over a fake store: single-flight, negative caching, stale
serving with background refresh, store outages -> 503, on-demand groups, and the HTTP
status of each error raised below the HTTP layer."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from featureplane.cache import Cached, CacheFill
from featureplane.codec import Item, Record, make_item
from featureplane.errors import (
    FeatureplaneError,
    NotStartedError,
    TransientStoreError,
    UnknownGroupError,
)
from featureplane.serving.app import METRICS, READER, create_app
from featureplane.serving.config import ServeConfig
from featureplane.serving.local import LocalCache
from featureplane.serving.metrics import Metrics
from featureplane.serving.plan import Wanted
from featureplane.serving.tiers import ReaderConfig, TieredReader
from featureplane.spec import Catalog, FeatureGroup
from featureplane.stores.base import Query, Store

T0 = 1_763_800_000_000


def _group(**kw: Any) -> FeatureGroup:
    base = {
        "entity": "u",
        "features": [{"name": "x", "type": "int"}],
        "ttl": {"soft": "10s", "hard": "60s", "jitter": 0},
    }
    return FeatureGroup.model_validate({**base, **kw})


CATALOG = Catalog(
    groups={
        "last": _group(name="last", kind="latest", tiers=["local", "store"]),
        "both": _group(name="both", kind="latest", tiers=["local", "redis", "store"]),
        "recent": _group(name="recent", kind="timeseries", max_items=5, tiers=["local", "store"]),
        "computed": _group(
            name="computed", kind="latest", on_demand="test_serving_reader:compute_x"
        ),
        "broken": _group(name="broken", kind="latest", on_demand="test_serving_reader:explode"),
    }
)


def compute_x(entity_id: str) -> dict[str, int] | None:
    return None if entity_id == "nobody" else {"x": len(entity_id)}


async def explode(entity_id: str) -> dict[str, int]:
    raise RuntimeError("boom")


class FakeStore(Store):
    """In-memory store counting reads; `down` makes it fail, `delay` slows it."""

    def __init__(self, catalog: Catalog) -> None:
        super().__init__(catalog, lambda: T0)
        self.items: dict[tuple[str, str], list[Item]] = {}
        self.reads = 0
        self.down = False
        self.delay = 0.0

    async def write(self, items: Sequence[Item]) -> None:
        for it in items:
            self.items.setdefault((it.group, it.id), []).append(it)

    async def read(self, queries: Sequence[Query]) -> list[list[Record]]:
        self.reads += 1
        await asyncio.sleep(self.delay)
        if self.down:
            raise TransientStoreError("store is down")
        out = []
        for q in queries:
            limit, since, until = self.clamp(self.catalog.group(q.group), q)
            its = sorted(self.items.get((q.group, q.id), []), key=lambda i: i.version, reverse=True)
            its = [
                i
                for i in its
                if (since is None or i.ts >= since) and (until is None or i.ts <= until)
            ][:limit]
            out.append([Record(i.ts, i.version, i.value) for i in its])
        return out


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def reader(store: FakeStore, clock: Clock, rand: float = 0.5) -> TieredReader:
    return TieredReader(
        catalog=CATALOG,
        store=store,
        redis=None,
        local=LocalCache(1 << 20),
        metrics=Metrics(),
        clock=clock,
        rand=lambda: rand,
        config=ReaderConfig(negative_ttl_ms=2_000, xfetch_beta=0.0),
    )


async def test_single_flight_100_concurrent_misses_one_store_read() -> None:
    store, clock = FakeStore(CATALOG), Clock()
    await store.write([make_item(CATALOG.group("last"), "u1", T0, "e", {"x": 1})])
    store.delay = 0.05
    r = reader(store, clock)
    got = await asyncio.gather(*(r.read([Query("last", "u1")]) for _ in range(100)))
    assert store.reads == 1
    assert all(g[0] is not None and g[0][0].ts == T0 for g in got)
    await r.read([Query("last", "u1")])
    assert store.reads == 1  # now a local hit


async def test_negative_caching_with_its_own_ttl() -> None:
    store, clock = FakeStore(CATALOG), Clock()
    r = reader(store, clock)
    assert await r.read([Query("last", "ghost")]) == [[]]
    assert await r.read([Query("last", "ghost")]) == [[]]
    assert store.reads == 1
    clock.now += 2_000  # negative TTL over
    assert await r.read([Query("last", "ghost")]) == [[]]
    assert store.reads == 2
    events = r.metrics.cache.labels("local", "last", "negative_hit").get()
    assert events == 1


async def test_stale_value_is_served_and_refreshed_in_background_never_past_hard() -> None:
    store, clock = FakeStore(CATALOG), Clock()
    last = CATALOG.group("last")
    await store.write([make_item(last, "u", T0, "a", {"x": 1})])
    r = reader(store, clock)
    assert (await r.read([Query("last", "u")]))[0][0].ts == T0  # type: ignore[index]
    await store.write([make_item(last, "u", T0 + 1, "b", {"x": 2})])
    clock.now += 10_000  # past soft: the old value, and a refresh behind it
    assert (await r.read([Query("last", "u")]))[0][0].ts == T0  # type: ignore[index]
    await r.idle()
    assert store.reads == 2
    assert (await r.read([Query("last", "u")]))[0][0].ts == T0 + 1  # type: ignore[index]
    # the refreshed entry counts from its own store read: past ITS hard, never served
    store.down = True
    clock.now += 59_999
    assert (await r.read([Query("last", "u")]))[0] is not None
    clock.now += 1
    assert (await r.read([Query("last", "u")]))[0] is None


async def test_timeseries_range_beyond_the_cache_goes_to_the_store() -> None:
    store, clock = FakeStore(CATALOG), Clock()
    recent = CATALOG.group("recent")
    await store.write([make_item(recent, "u", T0 - i, f"e{i}", {"x": i}) for i in range(8)])
    r = reader(store, clock)
    newest = await r.read([Query("recent", "u", limit=3)])
    assert [x.ts for x in newest[0] or []] == [T0, T0 - 1, T0 - 2]
    old = await r.read([Query("recent", "u", limit=2, until=T0 - 5)])
    assert [x.ts for x in old[0] or []] == [T0 - 5, T0 - 6]
    assert store.reads == 2  # the cache holds 5 newest; the range needed the store


def _app(store: FakeStore, **kw: Any) -> Any:
    return create_app(CATALOG, store=store, config=ServeConfig(**kw), clock=lambda: T0)


async def test_app_503_when_store_down_and_nothing_cached_and_on_demand() -> None:
    store = FakeStore(CATALOG)
    await store.write([make_item(CATALOG.group("last"), "u", T0, "a", {"x": 7})])
    async with TestClient(TestServer(_app(store))) as client:
        ok = await client.post(
            "/v1/features",
            json={
                "requests": [
                    {"group": "last", "ids": ["u"]},
                    {"group": "computed", "ids": ["abc", "nobody"]},
                ]
            },
        )
        assert ok.status == 200
        assert (await ok.json())["results"] == [
            {"group": "last", "id": "u", "found": True, "ts": T0, "features": {"x": 7}},
            {"group": "computed", "id": "abc", "found": True, "ts": T0, "features": {"x": 3}},
            {"group": "computed", "id": "nobody", "found": False},
        ]
        store.down = True
        cached = await client.get("/v1/features/last/u")
        assert cached.status == 200
        resp = await client.get("/v1/features/last/other")
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "unavailable"
        bad = await client.get("/v1/features/broken/x")
        assert bad.status == 503 and (await bad.json())["error"]["code"] == "on_demand_failed"
        assert client.app is not None and client.app[READER].breakers["store"] is not None
        failed = client.app[METRICS].on_demand_errors.labels("broken").get()
        assert failed == 1


async def test_unknown_group_is_refused_before_any_tier_is_read() -> None:
    store = FakeStore(CATALOG)
    r = reader(store, Clock())
    with pytest.raises(UnknownGroupError) as err:
        await r.read([Query("last", "u"), Query("nope", "u")])
    assert err.value.group == "nope" and store.reads == 0


async def test_store_errors_of_any_kind_are_503s_never_500s() -> None:
    class Unstarted(FakeStore):
        async def read(self, queries: Sequence[Query]) -> list[list[Record]]:
            raise NotStartedError("store")

    async with TestClient(TestServer(_app(Unstarted(CATALOG)))) as client:
        resp = await client.get("/v1/features/last/u")
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "unavailable"


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (UnknownGroupError("gone"), 400, "unknown_group"),
        (TransientStoreError("a tier failed outside the reader"), 503, "unavailable"),
        (NotStartedError("redis"), 503, "unavailable"),
        (FeatureplaneError("a bug"), 500, "internal"),
        (KeyError("a bug"), 500, "internal"),
    ],
)
async def test_errors_from_below_get_their_status_in_serving(
    exc: Exception, status: int, code: str
) -> None:
    app = _app(FakeStore(CATALOG))

    async def answers(queries: Sequence[Query]) -> list[Wanted]:
        raise exc

    app[READER].answers = answers  # type: ignore[method-assign]
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/v1/features/last/u")
        assert resp.status == status
        body = await resp.json()
        assert body["error"]["code"] == code
        if code == "unknown_group":
            assert body["error"]["message"] == "unknown feature group 'gone'"


class FakeCache:
    """A cache tier in memory: `held` answers reads, `fills` records writes, `down` fails."""

    def __init__(self) -> None:
        self.held: dict[tuple[str, str], Cached] = {}
        self.fills: list[CacheFill] = []
        self.reads = 0
        self.down = False

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def ping(self) -> None: ...

    async def write_through(self, items: Sequence[Item]) -> None: ...

    async def fill(self, fills: Sequence[CacheFill]) -> None:
        self.fills.extend(fills)

    async def read_cached(self, keys: Sequence[tuple[str, str]]) -> list[Cached]:
        self.reads += 1
        if self.down:
            raise TransientStoreError("cache is down")
        return [self.held.get(k, Cached([], None, None)) for k in keys]


async def test_redis_tier_fills_refreshes_the_local_tier_and_is_skipped_when_down() -> None:
    store, cache, clock = FakeStore(CATALOG), FakeCache(), Clock()
    both = CATALOG.group("both")
    await store.write([make_item(both, "u", T0, "a", {"x": 1})])
    r = TieredReader(
        catalog=CATALOG,
        store=store,
        redis=cache,
        local=LocalCache(1 << 20),
        metrics=Metrics(),
        clock=clock,
        rand=lambda: 0.5,
        config=ReaderConfig(xfetch_beta=0.0),
    )
    await r.start()
    assert (await r.read([Query("both", "u")]))[0][0].ts == T0  # type: ignore[index]
    await r.idle()  # the store's answer reached Redis by the fill queue
    assert [(f.group, f.id, [x.ts for x in f.records]) for f in cache.fills] == [
        ("both", "u", [T0])
    ]
    newer = make_item(both, "u", T0 + 1, "b", {"x": 2})
    cache.held[("both", "u")] = Cached([Record(newer.ts, newer.version, newer.value)], 60_000, None)
    clock.now += 10_000  # past soft locally: served stale, refreshed from Redis, not the store
    assert (await r.read([Query("both", "u")]))[0][0].ts == T0  # type: ignore[index]
    await r.idle()
    assert (await r.read([Query("both", "u")]))[0][0].ts == T0 + 1  # type: ignore[index]
    assert store.reads == 1 and cache.reads == 2  # the cold read, then the refresh
    cache.down = True
    clock.now += 60_000  # past hard everywhere: Redis fails, the store answers
    assert (await r.read([Query("both", "u")]))[0][0].ts == T0  # type: ignore[index]
    assert store.reads == 2
    assert r.metrics.errors.labels("redis", "read").get() == 1
    await r.aclose()


async def test_answers_rendered_from_the_local_tier_never_cross_request_shapes() -> None:
    """Each request shape (features, limit, since, until) gets its own answer, the same
    cold (rendered) and warm (copied), and a written value replaces what was rendered."""
    store = FakeStore(CATALOG)
    recent = CATALOG.group("recent")
    await store.write([make_item(recent, "u", T0 - i, f"e{i}", {"x": i}) for i in range(3)])
    shapes = [
        {},
        {"limit": 1},
        {"limit": 2, "features": ["x"]},
        {"since": T0 - 1},
        {"until": T0 - 1, "limit": 1},
        {"features": []},
    ]
    body = {"requests": [{"group": "recent", "ids": ["u"], **s} for s in shapes]}

    def items(*xs: int) -> dict[str, Any]:
        found = [{"ts": T0 - x, "features": {"x": x}} for x in xs]
        return {"group": "recent", "id": "u", "found": bool(found), "items": found}

    want = [items(0, 1, 2), items(0), items(0, 1), items(0, 1), items(1)]
    want.append({**items(0, 1, 2), "items": [{"ts": T0 - x, "features": {}} for x in range(3)]})
    app = _app(store)
    async with TestClient(TestServer(app)) as client:
        for _ in range(3):  # cold, then rendered and kept, then copied
            resp = await client.post("/v1/features", json=body)
            assert (await resp.json())["results"] == want
        local = app[READER].local
        assert local is not None and store.reads == 1
        entry = local.get(("recent", "u"))
        assert entry is not None and len(entry.rendered) == len(shapes)
        await store.write([make_item(recent, "u", T0 + 1, "new", {"x": -1})])
        local.invalidate([("recent", "u")])
        resp = await client.post("/v1/features", json={"requests": [body["requests"][1]]})
        newest = [{"ts": T0 + 1, "features": {"x": -1}}]
        assert (await resp.json())["results"] == [{**items(), "found": True, "items": newest}]
