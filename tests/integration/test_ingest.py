"""Stream ingestion end to end: `featureplane ingest` / `retry` as subprocesses
against the real tansu broker, redis-server and the embedded store.

Each test gets its own topics (the example catalog's rules with a unique
suffix), consumer group and data dir, so tests share the session broker.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from featureplane.stores.base import Query
from featureplane.stores.redis import RedisStore
from tests.integration.ingest_env import Env, click, now_ms, wait_for
from tests.services import Service, start_redis


@pytest.fixture
def env(tmp_path: Path, kafka_bootstrap: str) -> Iterator[Env]:
    e = Env(tmp_path, kafka_bootstrap)
    yield e
    e.cleanup()


# ---------------------------------------------------------------- 1. M:N


def test_m_to_n_dispatch_where_and_unmatched(env: Env, redis_url: str) -> None:
    t = now_ms() - 60_000
    user = f"mn-{env.tok}"
    values = [
        click(1, t, user=user),  # 3 groups: recent, last_click, stats
        click(2, t + 1, user=user, kind="business"),  # `where` fails: last_click, stats only
        json.dumps({"event_id": "v1", "event_type": "view", "ts": t, "user_id": user}).encode(),
        json.dumps(
            {
                "event_id": "s1",
                "event_type": "search",
                "ts": t,
                "user_id": user,
                "query": "bike",
                "result_count": 3,
            }
        ).encode(),
    ]
    env.produce("user-actions", values)
    env.produce(
        "article-updates",
        [
            json.dumps(
                {
                    "event_id": "au1",
                    "event_type": "article_updated",
                    "ts": t + 5,
                    "article": {
                        "id": "a1",
                        "embedding": [0.5] * 64,
                        "embedding_model": "m1",
                        "counts": {"view": 4},
                        "price": 12.0,
                        "is_sold": False,
                    },
                }
            ).encode(),
            json.dumps(
                {
                    "event_id": "sr1",
                    "event_type": "article_stats_recomputed",
                    "ts": t + 9,
                    "article_id": "a2",
                    "counts": {"view": 7},
                    "price": 3.0,
                    "is_sold": True,
                }
            ).encode(),
        ],
    )
    proc = env.start(FEATUREPLANE_REDIS_URL=redis_url)
    wait_for(env.all_committed, 60, env, "offsets committed to the end")
    assert env.stop(proc) == 0

    recent, last, searches, stats1, stats2, emb = env.read(
        [
            Query("recent_user_clicked_fleaMarketArticles", user, limit=10),
            Query("user_last_click", user),
            Query("recent_user_searches", user, limit=10),
            Query("article_stats", "a1"),
            Query("article_stats", "a2"),
            Query("article_embeddings", "a1"),
        ]
    )
    assert [r["article_id"] for r in recent] == ["a1"]  # where filtered a2 out
    assert last[0]["article_id"] == "a2" and last[0]["ts"] == t + 1
    assert [(r["query"], r["result_count"]) for r in searches] == [("bike", 3)]
    # article_stats is fed by three rules: click a1 (t), article_updated a1 (t+5), recomputed a2
    assert stats1[0]["ts"] == t + 5 and stats1[0]["counts"] == {"view": 4}
    assert stats2[0]["ts"] == t + 9 and stats2[0]["is_sold"] is True
    assert emb[0]["model"] == "m1" and len(emb[0]["embedding"]) == 64
    assert env.rows("article_stats") == 2  # a1 (newest of two) and a2; the view stored nothing

    async def cached() -> list[Any]:
        async with RedisStore(env.catalog, redis_url) as r:
            return await r.read([Query("user_last_click", user)])

    assert asyncio.run(cached())[0], "user_last_click written through"


# ---------------------------------------------------------------- 2. crash


@pytest.mark.slow
def test_kill_9_mid_stream_loses_and_duplicates_nothing(env: Env) -> None:
    n = 20_000
    t = now_ms() - 3_600_000
    env.produce("user-actions", [click(i, t + i) for i in range(n)])
    group = "recent_user_clicked_fleaMarketArticles"
    proc = env.start(FEATUREPLANE_BATCH_SIZE="500")
    wait_for(lambda: env.rows(group) >= 2_000, 60, env, "the first writes")
    proc.kill()  # kill -9
    proc.wait()
    assert env.rows(group) < n, "killed too late to test anything"
    proc = env.start()
    wait_for(env.all_committed, 120, env, "offsets committed to the end")
    assert env.stop(proc) == 0
    assert env.rows(group) == n  # one row per event: none lost, none duplicated
    assert env.rows("user_last_click") == 500
    last = env.read([Query("user_last_click", f"u{u}") for u in range(0, 500, 97)])
    for u, rs in zip(range(0, 500, 97), last, strict=True):
        newest = max(i for i in range(n) if i % 500 == u)
        assert rs[0]["article_id"] == f"a{newest}"


# ---------------------------------------------------------------- 3. poison


def test_poison_records_go_to_dlq_with_reasons_without_stalling(env: Env) -> None:
    n = 5_000
    t = now_ms() - 60_000
    rng = random.Random(3)
    bad_at = set(rng.sample(range(n), n // 100))
    kinds = ["json", "missing", "type", "big", "ts"]
    values: list[bytes] = []
    for i in range(n):
        if i not in bad_at:
            values.append(click(i, t))
            continue
        kind = kinds[i % len(kinds)]
        values.append(
            {
                "json": b'{"event_id": "x", oops',
                "missing": json.dumps({"event_type": "click", "ts": t}).encode(),
                "type": json.dumps(
                    {
                        "event_id": f"b{i}",
                        "event_type": "search",
                        "ts": t,
                        "user_id": "u",
                        "query": "q",
                        "result_count": "many",
                    }
                ).encode(),
                "big": click(i, t, session="x" * 9000),
                "ts": json.dumps(
                    {"event_id": f"b{i}", "event_type": "click", "ts": "yesterday"}
                ).encode(),
            }[kind]
        )
    env.produce("user-actions", values)
    proc = env.start()
    wait_for(env.all_committed, 90, env, "offsets committed to the end")
    assert env.stop(proc) == 0

    good_clicks = n - len(bad_at)
    assert env.rows("recent_user_clicked_fleaMarketArticles") == good_clicks
    dlq = env.read_topic(env.topic("user-actions") + ".dlq", len(bad_at))
    assert len(dlq) == len(bad_at)
    assert {m.value() for m in dlq} == {values[i] for i in bad_at}
    reasons = [dict(m.headers())["reason"].decode() for m in dlq]
    assert all(reasons)
    text = "\n".join(reasons)
    for expected in (
        "not valid JSON",
        "missing field event_id",
        "result_count",
        "over the 8192-byte limit",
        "ts must be",
    ):
        assert expected in text, expected
    for m in dlq:
        h = {k: v.decode() for k, v in m.headers()}
        assert h["topic"] == env.topic("user-actions") and int(h["offset"]) >= 0


# ---------------------------------------------------------------- 4. store outage


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Service]:
    svc = start_redis(workdir=tmp_path / "redis")
    yield svc
    svc.cleanup()


OUTAGE_S = 180.0
"""Redis down for 3 minutes under ingest."""


@pytest.mark.slow
def test_a_3_minute_redis_outage_sends_nothing_to_the_dlq_and_redis_catches_up(
    env: Env, own_redis: Service, tmp_path: Path
) -> None:
    url = f"redis://{own_redis.address}/0"
    t = now_ms() - 60_000
    ingest = env.start(FEATUREPLANE_REDIS_URL=url, FEATUREPLANE_WRITE_TIMEOUT="2s")
    # The default budget (1h) outlasts the outage; a small backoff cap makes catch-up quick.
    retry = env.start(
        "retry",
        FEATUREPLANE_REDIS_URL=url,
        FEATUREPLANE_BACKOFF_BASE="1s",
        FEATUREPLANE_BACKOFF_CAP="8s",
    )
    n = 0

    def produce(count: int) -> None:
        nonlocal n
        env.produce("user-actions", [click(i, t + i, user=f"o{i}") for i in range(n, n + count)])
        n += count

    produce(300)
    wait_for(lambda: env.rows("user_last_click") >= 300, 60, env, "the first writes")
    before = n
    own_redis.kill()  # the Redis tier goes away under load
    down_until = time.monotonic() + OUTAGE_S
    while time.monotonic() < down_until:
        produce(10)
        time.sleep(2)
    redis = start_redis(port=own_redis.port, workdir=tmp_path / "redis2")
    try:
        produce(300)
        wait_for(env.all_committed, 90, env, "ingest offsets committed to the end")
        assert env.rows("recent_user_clicked_fleaMarketArticles") == n
        assert env.rows("user_last_click") == n  # every item in the store
        retried = env.read_topic(env.topic("user-actions") + ".retry", 1, timeout=10)
        assert retried, "the outage sent nothing to the retry topic"
        first = {k: v.decode() for k, v in retried[0].headers()}
        assert {"attempt", "first_failure_ms", "reason", "topic", "partition", "offset"} <= set(
            first
        )
        assert first["tiers"] == "redis"  # the store write had succeeded
        # Redis (restarted empty) catches up: every record since the kill is cached
        users = [f"o{i}" for i in range(before, n)]

        async def missing() -> int:
            async with RedisStore(env.catalog, url) as r:
                got = await r.read([Query("user_last_click", u) for u in users])
            return sum(1 for g in got if not g)

        wait_for(lambda: asyncio.run(missing()) == 0, 90, env, "Redis caught up")
        assert env.read_topic(env.topic("user-actions") + ".dlq", 0, timeout=2) == []
    finally:
        redis.cleanup()
    assert env.stop(ingest) == 0
    assert env.stop(retry) == 0


# ---------------------------------------------------------------- 5. order and replay


def test_latest_newest_wins_out_of_order_and_replay_changes_nothing(env: Env) -> None:
    t = now_ms() - 600_000
    rng = random.Random(5)
    order = list(range(200))
    rng.shuffle(order)
    user = f"kw-{env.tok}"
    events = [
        json.dumps(
            {
                "event_id": f"k{i}",
                "event_type": "keywords_changed",
                "ts": t + i,
                "user_id": user,
                "keywords": [f"w{i}"],
                "source": f"s{i}",
            }
        ).encode()
        for i in order
    ]
    # one key, so one partition: arrival order is the shuffled order
    env.produce("user-updates", events, keys=[user] * len(events))
    env.produce("user-actions", [click(i, t + rng.randrange(10_000)) for i in range(1_000)])
    proc = env.start()
    wait_for(env.all_committed, 60, env, "offsets committed to the end")
    assert env.stop(proc) == 0
    (kw,) = env.read([Query("user_notification_keywords", user)])
    assert (
        kw[0]["ts"] == t + 199 and kw[0]["keywords"] == {"w199"} and kw[0]["updated_by"] == "s199"
    )
    before = env.snapshot()

    replay = f"replay-{env.tok}"
    proc = env.start(FEATUREPLANE_KAFKA_GROUP=replay)
    wait_for(lambda: env.all_committed(replay), 60, env, "the replay committed to the end")
    assert env.stop(proc) == 0
    assert env.snapshot() == before
