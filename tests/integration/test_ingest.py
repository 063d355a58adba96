"""Stream ingestion end to end: `featureplane ingest` / `retry` as subprocesses
against the real tansu broker, redis-server and the embedded store.

Each test gets its own topics (the example catalog's rules with a unique
suffix), consumer group and data dir, so tests share the session broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from featureplane.codec import decode_python
from featureplane.services import Service, start_redis
from featureplane.spec import Catalog, load_catalog
from featureplane.stores.base import Query
from featureplane.stores.embedded import EmbeddedStore
from featureplane.stores.redis import RedisStore

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
REPO = EXAMPLES.parent
PARTITIONS = 4

EXTRA_RULE = """
  - name: clicks_to_article_stats
    topic: user-actions
    event_type: click
    group: article_stats
    id: article.id
    features:
      price: article.price
"""


# ---------------------------------------------------------------- helpers


class Env:
    """One test's spec, topics, group and data dir."""

    def __init__(self, tmp: Path, bootstrap: str) -> None:
        self.tok = uuid.uuid4().hex[:8]
        self.bootstrap = bootstrap
        self.dir = tmp
        spec = tmp / "spec"
        spec.mkdir()
        (spec / "groups.yaml").write_text((EXAMPLES / "groups.yaml").read_text())
        rules = (EXAMPLES / "ingestion.yaml").read_text() + EXTRA_RULE
        for t in ("user-actions", "user-updates", "article-updates"):
            rules = rules.replace(f"topic: {t}\n", f"topic: {self.topic(t)}\n")
        (spec / "ingestion.yaml").write_text(rules)
        self.catalog: Catalog = load_catalog(spec)
        self.group = f"ingest-{self.tok}"
        self.data = tmp / "data"
        self.env = {
            **os.environ,
            "FEATUREPLANE_SPEC": str(spec),
            "FEATUREPLANE_KAFKA_BOOTSTRAP": bootstrap,
            "FEATUREPLANE_KAFKA_GROUP": self.group,
            "FEATUREPLANE_DATA_DIR": str(self.data),
            "FEATUREPLANE_METRICS_PORT": "0",
            "FEATUREPLANE_SESSION_TIMEOUT": "6s",
            "FEATUREPLANE_COMMIT_INTERVAL": "200ms",
            "FEATUREPLANE_TOPIC_PARTITIONS": str(PARTITIONS),
        }
        self.env.pop("FEATUREPLANE_REDIS_URL", None)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ends: dict[tuple[str, int], int] = {}

    def topic(self, base: str) -> str:
        return f"{base}-{self.tok}"

    # -- processes

    def start(self, command: str = "ingest", **env: str) -> subprocess.Popen[bytes]:
        log = (self.dir / f"{command}-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "featureplane.cli", command],
            env={**self.env, **env},
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 40) -> int:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in self.dir.glob("*.log"))

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    # -- kafka

    def produce(
        self, base: str, values: Sequence[bytes], keys: Sequence[str] | None = None
    ) -> None:
        topic = self.topic(base)
        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})

        def done(err: Any, msg: Any) -> None:
            assert err is None, err
            k = (msg.topic(), msg.partition())
            self.ends[k] = max(self.ends.get(k, 0), msg.offset() + 1)

        for i, v in enumerate(values):
            key = (keys[i] if keys else str(i)).encode()
            while True:
                try:
                    producer.produce(topic, v, key, partition=i % PARTITIONS, on_delivery=done)
                    break
                except BufferError:
                    producer.poll(0.1)
        assert producer.flush(30) == 0

    def committed(self, group: str | None = None) -> dict[tuple[str, int], int]:
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group or self.group})
        try:
            parts = [TopicPartition(t, p) for t, p in self.ends]
            return {(tp.topic, tp.partition): tp.offset for tp in c.committed(parts, timeout=10)}
        finally:
            c.close()

    def all_committed(self, group: str | None = None) -> bool:
        got = self.committed(group)
        return all(got.get(k, -1) >= v for k, v in self.ends.items())

    def read_topic(self, topic: str, n: int, timeout: float = 30) -> list[Any]:
        c = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"reader-{uuid.uuid4()}",
                "enable.auto.commit": False,
            }
        )
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            out.extend(m for m in c.consume(1000, 0.5) if m.error() is None)
        time.sleep(0.5)  # anything beyond n?
        out.extend(m for m in c.consume(1000, 0.5) if m.error() is None)
        c.close()
        return out

    # -- the store

    def rows(self, group: str) -> int:
        db_path = self.data / "features.db"
        if not db_path.exists():
            return 0
        db = sqlite3.connect(db_path, timeout=10)
        try:
            return int(
                db.execute(
                    "SELECT count(*) FROM items WHERE pk >= ? AND pk < ?",
                    (f"{group}#".encode(), f"{group}$".encode()),
                ).fetchone()[0]
            )
        except sqlite3.OperationalError:
            return 0
        finally:
            db.close()

    def snapshot(self) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(self.data / "features.db", timeout=10)
        try:
            return db.execute("SELECT pk, sk, ts, ver, v FROM items ORDER BY pk, sk").fetchall()
        finally:
            db.close()

    def read(self, queries: Sequence[Query]) -> list[list[dict[str, Any]]]:
        async def go() -> list[list[dict[str, Any]]]:
            async with EmbeddedStore(self.catalog, self.data) as store:
                recs = await store.read(queries)
            return [
                [{"ts": r.ts, **decode_python(self.catalog.groups[q.group], r.value)} for r in rs]
                for q, rs in zip(queries, recs, strict=True)
            ]

        return asyncio.run(go())


def wait_for(cond: Callable[[], bool], timeout: float, env: Env, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        for p in env.procs:
            if p.poll() not in (None, 0, -9, -15):
                pytest.fail(f"a dataflow exited with {p.returncode}:\n{env.logs()}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}\n{env.logs()}")


@pytest.fixture
def env(tmp_path: Path, kafka_bootstrap: str) -> Iterator[Env]:
    e = Env(tmp_path, kafka_bootstrap)
    yield e
    e.cleanup()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def click(
    i: int, ts: int, *, user: str | None = None, kind: str = "fleaMarket", session: str = "s1"
) -> bytes:
    return json.dumps(
        {
            "event_id": f"click-{i}",
            "event_type": "click",
            "ts": ts,
            "user_id": user or f"u{i % 500}",
            "session": session,
            "article": {"id": f"a{i}", "kind": kind, "category": "bikes", "price": 10.5 + i},
        }
    ).encode()


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


def test_redis_outage_goes_through_retry_and_lands(
    env: Env, own_redis: Service, tmp_path: Path
) -> None:
    url = f"redis://{own_redis.address}/0"
    t = now_ms() - 60_000
    ingest = env.start(FEATUREPLANE_REDIS_URL=url, FEATUREPLANE_WRITE_TIMEOUT="2s")
    retry = env.start(
        "retry",
        FEATUREPLANE_REDIS_URL=url,
        FEATUREPLANE_BACKOFF_BASE="300ms",
        FEATUREPLANE_BACKOFF_CAP="1500ms",
        FEATUREPLANE_MAX_ATTEMPTS="40",
    )
    n = 3_000
    batches = [[click(i, t + i, user=f"o{i}") for i in range(k, k + 300)] for k in range(0, n, 300)]
    env.produce("user-actions", batches[0])
    wait_for(lambda: env.rows("user_last_click") >= 300, 60, env, "the first writes")
    own_redis.kill()  # the Redis tier goes away under load
    for batch in batches[1:6]:
        env.produce("user-actions", batch)
        time.sleep(0.5)
    redis = start_redis(port=own_redis.port, workdir=tmp_path / "redis2")
    for batch in batches[6:]:
        env.produce("user-actions", batch)
    try:
        wait_for(env.all_committed, 90, env, "ingest offsets committed to the end")
        assert env.rows("recent_user_clicked_fleaMarketArticles") == n
        assert env.rows("user_last_click") == n
        retried = env.read_topic(env.topic("user-actions") + ".retry", 1, timeout=10)
        assert retried, "the outage sent nothing to the retry topic"
        first = {k: v.decode() for k, v in retried[0].headers()}
        assert {"attempt", "first_failure_ms", "reason", "topic", "partition", "offset"} <= set(
            first
        )
        users = sorted({json.loads(m.value())["user_id"] for m in retried})

        async def missing() -> int:
            async with RedisStore(env.catalog, url) as r:
                got = await r.read([Query("user_last_click", u) for u in users])
            return sum(1 for g in got if not g)

        wait_for(
            lambda: asyncio.run(missing()) == 0, 60, env, "every retried record written to Redis"
        )
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
