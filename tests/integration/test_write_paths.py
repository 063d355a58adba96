"""Every write path puts the same items in the same tiers.

The same events go through `featureplane ingest`, through `featureplane retry`
(as records that failed once), through `featureplane backfill` and, as rows,
through `featureplane load`, each into its own embedded store and its own
Redis database. Afterwards the four stores hold the same rows and the four
Redis databases the same keys and values, and both follow the groups'
`tiers`: the store holds the groups with `store` in their tiers and only
those; Redis holds the `write: through` groups with `redis` in their tiers.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition

from featureplane.cache import CacheFill
from featureplane.cli import main
from featureplane.codec import Record, make_item
from featureplane.keys import partition_key
from featureplane.operators.kafka_cluster import ensure_topics
from featureplane.settings import Settings
from featureplane.spec import Catalog, load_catalog
from featureplane.stores import open_cache
from featureplane.stores.redis_layout import key_of
from tests.integration.ingest_env import PARTITIONS, Env, now_ms, wait_for
from tests.services import Service, start_redis

GROUPS = """
feature_groups:
  - {name: cache_latest, entity: user, kind: latest, tiers: [local, redis], write: through,
     features: [{name: v, type: string}, {name: n, type: int}]}
  - {name: cache_series, entity: user, kind: timeseries, tiers: [local, redis],
     write: through, features: [{name: v, type: string}, {name: n, type: int}]}
  - {name: all_latest, entity: user, kind: latest, tiers: [local, redis, store],
     write: through, features: [{name: v, type: string}, {name: n, type: int}]}
  - {name: all_series, entity: user, kind: timeseries, tiers: [local, redis, store],
     write: through, features: [{name: v, type: string}, {name: n, type: int}]}
  - {name: store_series, entity: user, kind: timeseries, tiers: [store],
     features: [{name: v, type: string}, {name: n, type: int}]}
  - {name: around_latest, entity: user, kind: latest, tiers: [redis, store], write: around,
     features: [{name: v, type: string}, {name: n, type: int}]}
"""
NAMES = (
    "cache_latest",
    "cache_series",
    "all_latest",
    "all_series",
    "store_series",
    "around_latest",
)
RULES = "ingestion:\n" + "".join(
    f"  - {{name: to_{g}, topic: TOPIC, event_type: e, group: {g}, id: user_id,\n"
    "     features: {v: v, n: n}}\n"
    for g in NAMES
)
USERS = ("u1", "u2", "u3")
SEEDED = ("all_series", "u1")
"""A timeseries key already cached (write-through appends only to cached keys)."""


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Service]:
    svc = start_redis(workdir=tmp_path / "redis")
    yield svc
    svc.cleanup()


@pytest.fixture
def env(tmp_path: Path, kafka_bootstrap: str) -> Iterator[Env]:
    e = Env(tmp_path, kafka_bootstrap)
    spec = tmp_path / "spec"
    (spec / "groups.yaml").write_text(GROUPS)
    (spec / "ingestion.yaml").write_text(RULES.replace("TOPIC", e.topic("wp")))
    e.catalog = load_catalog(spec)
    yield e
    e.cleanup()


def events(t0: int) -> list[dict[str, Any]]:
    # out of order, a replayed event and an older value arriving last: the tiers' own
    # rules (newest wins, no duplicates) apply the same on every path
    out = [
        {"event_id": f"e{i}", "event_type": "e", "ts": t0 + (i * 7919) % 23, "user_id": u}
        | {"v": f"v{i}", "n": i}
        for i, u in enumerate(USERS * 3)
    ]
    return [*out, out[0], out[3] | {"event_id": "old", "ts": t0 - 1_000}]


def seed(catalog: Catalog, url: str, t0: int) -> None:
    """A serving fill of one timeseries key before anything is written."""
    group, entity = SEEDED
    item = make_item(catalog.groups[group], entity, t0 - 5_000, "seed", {"v": "seed", "n": 0})
    record = Record(item.ts, item.version, item.value)

    async def go() -> None:
        cache = open_cache(Settings(redis_url=url), catalog)
        assert cache is not None
        await cache.start()
        try:
            await cache.fill([CacheFill(group, entity, [record])])
        finally:
            await cache.aclose()

    asyncio.run(go())


def store_rows(data: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(data / "features.db", timeout=10)
    try:
        return db.execute("SELECT pk, sk, ts, ver, v FROM items ORDER BY pk, sk").fetchall()
    finally:
        db.close()


def redis_dump(url: str) -> dict[bytes, Any]:
    """Every key and its value (members of a sorted set, in order); TTLs left out."""
    client = redis.Redis.from_url(url)
    try:
        out: dict[bytes, Any] = {}
        for key in client.scan_iter(count=1000):
            kind = client.type(key)
            if kind == b"string":
                out[key] = client.get(key)
            elif kind == b"zset":
                out[key] = client.zrange(key, 0, -1)
            else:
                out[key] = kind
        return out
    finally:
        client.close()


def retry_copies(env: Env, values: list[bytes]) -> dict[int, int]:
    """Each event handed to the retry topic once, as ingest does after a store timeout;
    returns the retry topic's end offset of every partition."""
    topic = env.topic("wp")
    producer = Producer({"bootstrap.servers": env.bootstrap, "linger.ms": 5})
    ends: dict[int, int] = {}

    def done(err: Any, msg: Any) -> None:
        assert err is None, err
        ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)

    failed_at = now_ms() - 5_000
    for i, value in enumerate(values):
        headers = {
            "reason": "store: write timed out",
            "topic": topic,
            "partition": str(i % PARTITIONS),
            "offset": str(i),
            "attempt": "1",
            "first_failure_ms": str(failed_at),
        }
        producer.produce(
            topic + ".retry",
            value,
            b"k",
            partition=i % PARTITIONS,
            headers=[(k, v.encode()) for k, v in headers.items()],
            on_delivery=done,
        )
    assert producer.flush(30) == 0
    return ends


def committed(env: Env, group: str, topic: str, ends: dict[int, int]) -> bool:
    c = Consumer({"bootstrap.servers": env.bootstrap, "group.id": group})
    try:
        got = c.committed([TopicPartition(topic, p) for p in ends], timeout=10)
        return all(tp.offset >= ends[tp.partition] for tp in got)
    finally:
        c.close()


def load_rows(path: Path, group: str, evs: list[dict[str, Any]]) -> Path:
    rows = [
        {"id": e["user_id"], "ts": e["ts"], "event_id": e["event_id"], "v": e["v"], "n": e["n"]}
        for e in evs
    ]
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def test_ingest_retry_backfill_and_load_write_the_same_items_to_the_same_tiers(
    env: Env, own_redis: Service, tmp_path: Path
) -> None:
    t0 = now_ms() - 60_000
    evs = events(t0)
    values = [json.dumps(e).encode() for e in evs]
    topic = env.topic("wp")
    ensure_topics(env.bootstrap, {topic: PARTITIONS, topic + ".retry": PARTITIONS})
    paths = ("ingest", "retry", "backfill", "load")
    url = {p: f"redis://{own_redis.address}/{i + 1}" for i, p in enumerate(paths)}
    data = {p: tmp_path / f"data-{p}" for p in paths}
    for p in paths:
        seed(env.catalog, url[p], t0)

    # the same events, in the same partitions, on the event topic and the retry topic
    env.produce("wp", values, keys=["k"] * len(values))
    retry_ends = retry_copies(env, values)
    started = now_ms()
    ingest = env.start(
        "ingest", FEATUREPLANE_DATA_DIR=str(data["ingest"]), FEATUREPLANE_REDIS_URL=url["ingest"]
    )
    retry = env.start(
        "retry",
        FEATUREPLANE_DATA_DIR=str(data["retry"]),
        FEATUREPLANE_REDIS_URL=url["retry"],
        FEATUREPLANE_BACKOFF_BASE="100ms",
    )
    wait_for(env.all_committed, 90, env, "ingest to commit every event")
    retry_group = f"{env.group}-retry"
    wait_for(
        lambda: committed(env, retry_group, topic + ".retry", retry_ends),
        90,
        env,
        "retry to commit every retried record",
    )
    assert env.stop(ingest) == 0 and env.stop(retry) == 0
    assert env.read_topic(topic + ".dlq", 0, timeout=2) == []

    spec = str(tmp_path / "spec")
    window = ["--from", str(started - 600_000), "--to", str(now_ms() + 60_000)]
    argv = ["backfill", "--topic", topic, *window, "--spec", spec]
    argv += ["--bootstrap", env.bootstrap, "--data-dir", str(data["backfill"])]
    assert main([*argv, "--redis-url", url["backfill"]]) == 0
    for g in NAMES:
        rows = load_rows(tmp_path / f"{g}.jsonl", g, evs)
        argv = ["load", "--group", g, str(rows), "--spec", spec, "--data-dir", str(data["load"])]
        assert main([*argv, "--redis-url", url["load"]]) == 0

    stores = {p: store_rows(data[p]) for p in paths}
    caches = {p: redis_dump(url[p]) for p in paths}

    # what the tiers say: the store holds the groups with `store` in their tiers...
    in_store = {row[0].decode().split("#")[0] for row in stores["ingest"]}
    assert in_store == {"all_latest", "all_series", "store_series", "around_latest"}
    series = [r for r in stores["ingest"] if r[0] == partition_key("store_series", "u1").encode()]
    assert len(series) == 4  # three events (one replayed: overwritten) and an older one
    # ... Redis the write-through groups cached in Redis (a timeseries with a store: only
    # keys cached; one without: every key, Redis is its only copy)
    cached = {k.decode().removeprefix("fp:").split("{")[0] for k in caches["ingest"]}
    assert cached == {"cache_latest", "cache_series", "all_latest", "all_series"}
    assert len(caches["ingest"]) == 3 * len(USERS) + 1
    seeded = caches["ingest"][key_of("fp:", *SEEDED)]
    assert len(seeded) == 1 + 4  # the seed and u1's items
    latest = caches["ingest"][key_of("fp:", "cache_latest", "u1")]
    newest = max((e for e in evs if e["user_id"] == "u1"), key=lambda e: e["ts"])
    assert newest["v"].encode() in latest  # newest wins, whatever the order

    # ... and every path wrote exactly that
    for p in ("retry", "backfill", "load"):
        assert stores[p] == stores["ingest"], f"{p} wrote other store rows than ingest"
        assert caches[p] == caches["ingest"], f"{p} wrote other Redis keys than ingest"
    assert "Traceback" not in env.logs()
