"""The HTTP API against real Redis and the embedded store:
every status code and shape, tier equivalence (hypothesis), Redis killed under load."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featureplane.cache import CacheFill
from featureplane.codec import make_item
from featureplane.serving.api import ApiError, limit_maximum, parse_body, parse_query
from featureplane.serving.app import READER, create_app
from featureplane.serving.config import ServeConfig
from featureplane.serving.freshness import answer, entry_from_cache, entry_from_store
from featureplane.spec import Catalog, Feature, FeatureGroup, load_catalog
from featureplane.stores.base import Query, wall_clock_ms
from featureplane.stores.embedded import EmbeddedStore
from featureplane.stores.redis_cache import RedisCache
from tests.services import start_redis

CATALOG = load_catalog(Path(__file__).parent.parent.parent / "examples")
T0 = 1_763_800_000_000
NOW = wall_clock_ms() // 1000 * 1000  # retention is judged by the wall clock in the app
RECENT = "recent_user_clicked_fleaMarketArticles"


def _redis(url: str) -> RedisCache:
    return RedisCache(CATALOG, url, prefix=f"t{uuid.uuid4().hex[:8]}:")


async def _seed(data_dir: Path) -> None:
    async with EmbeddedStore(CATALOG, data_dir) as store:
        recent = CATALOG.group(RECENT)
        now = NOW
        await store.write(
            [
                make_item(
                    recent,
                    "u1",
                    now - i * 1000,
                    f"c{i}",
                    {"article_id": f"a{i}", "session_id": "s", "category": "bike"},
                )
                for i in range(40)
            ]
            + [
                make_item(
                    CATALOG.group("user_notification_keywords"),
                    "u1",
                    now,
                    "k",
                    {"keywords": {"bike", "desk"}, "updated_by": "app"},
                )
            ]
        )


@pytest.fixture
async def client(tmp_path: Path, redis_url: str) -> AsyncIterator[TestClient[Any, Any]]:
    await _seed(tmp_path)
    app = create_app(
        CATALOG,
        store=EmbeddedStore(CATALOG, tmp_path),
        redis=_redis(redis_url),
        token="s3cret",
        clock=lambda: NOW,
    )
    async with TestClient(TestServer(app)) as c:
        yield c


AUTH = {"Authorization": "Bearer s3cret"}


async def test_post_features_shapes_and_order(client: TestClient[Any, Any]) -> None:
    now = NOW
    body = {
        "requests": [
            {"group": RECENT, "ids": ["u1", "nobody"], "limit": 2, "features": ["article_id"]},
            {"group": "user_notification_keywords", "ids": ["u1", "nobody"]},
            {"group": RECENT, "ids": ["u1"], "limit": 3, "since": now - 5000, "until": now - 3000},
        ]
    }
    for _ in range(2):  # cold (store), then warm (local / redis)
        resp = await client.post("/v1/features", json=body, headers=AUTH)
        assert resp.status == 200 and resp.content_type == "application/json"
        assert (await resp.json())["results"] == [
            {
                "group": RECENT,
                "id": "u1",
                "found": True,
                "items": [
                    {"ts": now, "features": {"article_id": "a0"}},
                    {"ts": now - 1000, "features": {"article_id": "a1"}},
                ],
            },
            {"group": RECENT, "id": "nobody", "found": False, "items": []},
            {
                "group": "user_notification_keywords",
                "id": "u1",
                "found": True,
                "ts": now,
                "features": {"keywords": ["bike", "desk"], "updated_by": "app"},
            },
            {"group": "user_notification_keywords", "id": "nobody", "found": False},
            {
                "group": RECENT,
                "id": "u1",
                "found": True,
                "items": [
                    {
                        "ts": now - 3000 - 1000 * i,
                        "features": {
                            "article_id": f"a{3 + i}",
                            "session_id": "s",
                            "category": "bike",
                        },
                    }
                    for i in range(3)
                ],
            },
        ]
        await client.app[READER].idle()  # type: ignore[index]


async def test_get_one_result(client: TestClient[Any, Any]) -> None:
    resp = await client.get(f"/v1/features/{RECENT}/u1?limit=1&features=category", headers=AUTH)
    assert resp.status == 200
    got = await resp.json()
    assert got["found"] and got["items"][0]["features"] == {"category": "bike"}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "bad_request"),
        (b"[]", "bad_request"),
        (b'{"requests": {}}', "bad_request"),
        (b'{"requests": [{"group": "nope", "ids": ["1"]}]}', "unknown_group"),
        (
            b'{"requests": [{"group": "user_last_click", "ids": ["1"], "features": ["zz"]}]}',
            "unknown_feature",
        ),
        (
            f'{{"requests": [{{"group": "{RECENT}", "ids": ["1"], "limit": 51}}]}}'.encode(),
            "bad_limit",
        ),
        (
            f'{{"requests": [{{"group": "{RECENT}", "ids": ["1"], "limit": 0}}]}}'.encode(),
            "bad_limit",
        ),
        (
            f'{{"requests": [{{"group": "{RECENT}", "ids": ["1"], "since": 5, "until": 4}}]}}'.encode(),
            "bad_range",
        ),
        (b'{"requests": [{"group": "user_last_click", "ids": [1]}]}', "bad_request"),
        (b'{"requests": [{"group": "user_last_click", "ids": [""]}]}', "bad_request"),
    ],
)
async def test_400s(client: TestClient[Any, Any], body: bytes, code: str) -> None:
    resp = await client.post("/v1/features", data=body, headers=AUTH)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == code


async def test_too_many_ids_and_body_too_large(client: TestClient[Any, Any]) -> None:
    ids = [str(i) for i in range(1001)]
    resp = await client.post(
        "/v1/features", headers=AUTH, json={"requests": [{"group": "user_last_click", "ids": ids}]}
    )
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "too_many_ids"
    resp = await client.post("/v1/features", headers=AUTH, data=b" " * (1024 * 1024 + 1))
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "body_too_large"


async def test_401_404_405(client: TestClient[Any, Any]) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        resp = await client.get("/v1/groups", headers=headers)
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"
    resp = await client.get("/nope", headers=AUTH)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    resp = await client.delete("/v1/features", headers=AUTH)
    assert resp.status == 405 and "error" in await resp.json()
    assert resp.headers["Allow"] == "POST"


async def test_groups_health_ready_metrics_openapi(client: TestClient[Any, Any]) -> None:
    groups = await (await client.get("/v1/groups", headers=AUTH)).json()
    assert {g["name"] for g in groups["groups"]} == set(CATALOG.groups)
    searches = next(g for g in groups["groups"] if g["name"] == "recent_user_searches")
    assert (searches["owner"], searches["tags"]) == ("team-search", ["search", "realtime", "pii"])
    assert searches["features"][0]["description"] == "The query as typed."
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert await ready.json() == {
        "ready": True,
        "status": "ok",
        "tiers": {"store": "up", "redis": "up"},
    }
    await client.get(f"/v1/features/{RECENT}/u1", headers=AUTH)
    text = await (await client.get("/metrics")).text()
    assert "featureplane_http_request_seconds_bucket" in text
    assert 'featureplane_cache_events_total{event="miss",group="' + RECENT in text
    spec = await (await client.get("/openapi.json")).json()
    assert set(spec["paths"]) >= {
        "/v1/features",
        "/v1/features/{group}/{id}",
        "/v1/groups",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    }


KEYWORDS = "user_notification_keywords"  # a latest group


async def test_limit_since_until_on_a_latest_group_are_ignored_by_get_and_post_alike(
    client: TestClient[Any, Any],
) -> None:
    doc = await (await client.get("/openapi.json")).json()
    posted = doc["components"]["schemas"]["FeatureRequest"]["properties"]
    params = {p["name"]: p for p in doc["paths"]["/v1/features/{group}/{id}"]["get"]["parameters"]}
    top = limit_maximum(CATALOG)
    assert top == max(g.max_items for g in CATALOG.groups.values() if g.kind == "timeseries")
    for limit, since in (
        (posted["limit"], posted["since"]),
        (params["limit"]["schema"], params["since"]["schema"]),
    ):
        assert (limit["minimum"], limit["maximum"]) == (1, top)
        assert "at most the group's max_items" in limit["description"]
        assert "Ignored for latest groups" in limit["description"]
        assert "Ignored for latest groups" in since["description"]
    plain = {"group": KEYWORDS, "id": "u1", "found": True, "ts": NOW}
    plain["features"] = {"keywords": ["bike", "desk"], "updated_by": "app"}
    # Within the document's bounds, whatever they mean for a timeseries group: ignored.
    for query in ({"limit": top}, {"limit": 1, "since": 5, "until": 4}, {"since": 0}):
        got = await client.get(f"/v1/features/{KEYWORDS}/u1", params=query, headers=AUTH)
        assert got.status == 200 and await got.json() == plain, query
        body = {"requests": [{"group": KEYWORDS, "ids": ["u1"], **query}]}
        got = await client.post("/v1/features", json=body, headers=AUTH)
        assert got.status == 200 and (await got.json())["results"] == [plain], query
    # Outside them: the same 400 from both.
    for query, code in (
        ({"limit": top + 1}, "bad_limit"),
        ({"limit": 0}, "bad_limit"),
        ({"since": -1}, "bad_range"),
    ):
        got = await client.get(f"/v1/features/{KEYWORDS}/u1", params=query, headers=AUTH)
        body = {"requests": [{"group": KEYWORDS, "ids": ["u1"], **query}]}
        posted_got = await client.post("/v1/features", json=body, headers=AUTH)
        for resp in (got, posted_got):
            assert resp.status == 400 and (await resp.json())["error"]["code"] == code, query
    # A timeseries group still holds since and until to make sense.
    got = await client.get(f"/v1/features/{RECENT}/u1?since=5&until=4", headers=AUTH)
    assert got.status == 400 and (await got.json())["error"]["code"] == "bad_range"


def test_a_latest_groups_own_max_items_does_not_bound_limit() -> None:
    features = (Feature(name="a", type="int"),)  # type: ignore[arg-type]
    catalog = Catalog(
        groups={
            "ts": FeatureGroup(
                name="ts", entity="u", kind="timeseries", features=features, max_items=20
            ),
            "one": FeatureGroup(
                name="one", entity="u", kind="latest", features=features, max_items=1
            ),
        }
    )
    assert limit_maximum(catalog) == 20
    req = parse_query(catalog, "one", "x", {"limit": "20", "since": "9", "until": "1"})
    assert (req.limit, req.since, req.until) == (1, None, None)
    with pytest.raises(ApiError, match="limit must be an integer from 1 to 20"):
        parse_query(catalog, "one", "x", {"limit": "21"})
    with pytest.raises(ApiError, match=r"max_items \(20\), got 21"):
        parse_body(catalog, b'{"requests": [{"group": "ts", "ids": ["x"], "limit": 21}]}')
    assert parse_body(catalog, b'{"requests": [{"group": "ts", "ids": ["x"]}]}')[0].limit == 20


# ---------------------------------------------------------------- tier equivalence

GROUPS = ["small", "aged"]
CONTRACT = load_catalog(Path(__file__).parent.parent / "contract" / "catalog.yaml")
HOUR = 3_600_000


@st.composite
def scenarios(draw: Any) -> tuple[str, list[int], list[int], tuple[int, int | None, int | None]]:
    group = draw(st.sampled_from(GROUPS))
    tss = draw(st.lists(st.integers(0, 40), max_size=12))
    later = draw(st.lists(st.integers(0, 45), max_size=4))
    limit = draw(st.integers(1, 5))
    since = draw(st.none() | st.integers(0, 45))
    until = draw(st.none() | st.integers(0, 45))
    return group, tss, later, (limit, since, until)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=scenarios())
def test_every_tier_gives_the_same_answer(
    case: tuple[str, list[int], list[int], tuple[int, int | None, int | None]],
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    asyncio.run(_equivalence(case, redis_url, tmp_path_factory.getbasetemp() / "equiv"))


async def _equivalence(case: Any, redis_url: str, data_dir: Path) -> None:
    name, tss, later, (limit, since, until) = case
    group = CONTRACT.group(name)
    base = T0 - HOUR + 30 * 60_000 if name == "aged" else T0  # some items past retention
    clock = lambda: T0 + 40 * 60_000 if name == "aged" else T0  # noqa: E731
    uid = uuid.uuid4().hex
    data_dir.mkdir(exist_ok=True)
    items = [make_item(group, uid, base + t * 60_000, f"e{n}", {"x": n}) for n, t in enumerate(tss)]
    news = [
        make_item(group, uid, base + t * 60_000, f"n{n}", {"x": -n}) for n, t in enumerate(later)
    ]
    s = None if since is None else base + since * 60_000
    u = None if until is None else base + until * 60_000
    async with (
        EmbeddedStore(CONTRACT, data_dir, clock=clock) as store,
        RedisCache(CONTRACT, redis_url, clock=clock, prefix=f"q{uid[:8]}:") as redis,
    ):
        await store.write(items)
        newest = (await store.read([Query(name, uid, group.max_items)]))[0]
        await redis.fill([CacheFill(name, uid, newest)])
        await store.write(news)  # ingestion: store, then write-through
        await redis.write_through(news)
        truth = (await store.read([Query(name, uid, limit, s, u)]))[0]
        q = store.clamp(group, Query(name, uid, limit, s, u))
        fresh = (await store.read([Query(name, uid, group.max_items)]))[0]
        local = answer(entry_from_store(group, fresh, T0, 0, 0), "timeseries", *q)
        assert local is None or local == truth
        [cached] = await redis.read_cached([(name, uid)])
        if cached.records:
            assert cached.pttl is not None
            via_redis = answer(
                entry_from_cache(group, cached.records, cached.pttl, T0, 0), "timeseries", *q
            )
            assert via_redis is None or via_redis == truth
        if s is None and u is None:  # no range: the newest-max_items entry always answers
            assert local == truth


# ---------------------------------------------------------------- Redis killed under load


async def test_redis_killed_during_load_no_errors(tmp_path: Path) -> None:
    svc = start_redis(workdir=tmp_path / "redis")
    try:
        await _seed(tmp_path)
        groups = {
            n: g.model_copy(update={"tiers": ("redis", "store")}) for n, g in CATALOG.groups.items()
        }
        catalog = Catalog(groups=groups)
        app = create_app(
            catalog,
            store=EmbeddedStore(catalog, tmp_path),
            redis=RedisCache(catalog, f"redis://{svc.address}/0"),
            config=ServeConfig(local_cache_mb=0),
            clock=lambda: NOW,
        )
        body = {
            "requests": [
                {"group": RECENT, "ids": ["u1"], "limit": 5},
                {"group": "user_notification_keywords", "ids": ["u1", "x"]},
            ]
        }
        statuses: list[int] = []
        answers: list[Any] = []
        async with TestClient(TestServer(app)) as client:

            async def worker() -> None:
                for _ in range(60):
                    resp = await client.post("/v1/features", json=body)
                    statuses.append(resp.status)
                    answers.append(await resp.json())
                    await asyncio.sleep(0.005)

            load = [asyncio.create_task(worker()) for _ in range(8)]
            await asyncio.sleep(0.3)
            served_before = len(statuses)
            svc.kill()
            await asyncio.gather(*load)
        assert served_before > 0 and len(statuses) == 480
        assert set(statuses) == {200}
        assert all(a == answers[0] for a in answers)
    finally:
        svc.cleanup()
