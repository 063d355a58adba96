"""Hostile events against `featureplane ingest` and a real tansu broker, one record at a time.

Whatever a record holds (any size the broker takes, any nesting depth, any
bytes), it is decided within seconds and affects only itself: the good
records around it are stored at once, the commit reaches the end, and a
record too large to copy whole reaches the DLQ cut, with headers saying so.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Message as KafkaMessage
from confluent_kafka import Producer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from featureplane.operators.commit import OffsetTracker
from featureplane.operators.kafka import GroupConsumer
from featureplane.operators.kafka_cluster import ensure_topics
from featureplane.operators.metrics import IngestMetrics
from featureplane.operators.records import Message, Origin
from featureplane.stores.base import Query
from tests.integration.ingest_env import Env, click, now_ms, wait_for

MIB = 1024 * 1024


@pytest.fixture
def env(tmp_path: Path, kafka_bootstrap: str) -> Iterator[Env]:
    e = Env(tmp_path, kafka_bootstrap)
    yield e
    e.cleanup()


def headers_of(m: KafkaMessage) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in list(m.headers() or ()):
        out[str(k)] = v.decode() if isinstance(v, bytes) else str(v or "")
    return out


def nested(depth: int) -> bytes:
    return b"[" * depth + b"1" + b"]" * depth


# ---------------------------------------------------------------- oversized


def test_oversized_malformed_events_reach_the_dlq_and_the_commit_reaches_the_end(
    env: Env,
) -> None:
    t = now_ms() - 60_000
    n = 2_000
    values = [click(i, t + i) for i in range(n)]
    head = b'{"event_id": "huge", "event_type": "click", "ts": '
    huge = head + b"x" * (MIB - len(head))  # 1 MiB, not valid JSON
    pad = 900 * 1024 - len(json.dumps({"event_type": "click", "ts": t, "pad": ""}))
    big = json.dumps({"event_type": "click", "ts": t, "pad": "y" * pad}).encode()  # no event_id
    assert (len(huge), len(big)) == (MIB, 900 * 1024)
    values[500], values[1501] = huge, big
    env.produce("user-actions", values)
    proc = env.start()
    wait_for(env.all_committed, 90, env, "offsets committed to the end")
    started = time.monotonic()
    assert env.stop(proc) == 0
    assert time.monotonic() - started < 15, "nothing is stuck, so the drain is quick"

    assert env.rows("recent_user_clicked_fleaMarketArticles") == n - 2
    dlq = {
        headers_of(m)["offset"]: m for m in env.read_topic(env.topic("user-actions") + ".dlq", 2)
    }
    assert sorted(dlq) == ["125", "375"]  # 500 and 1501 on 4 partitions, i % 4
    cut, whole = dlq["125"], dlq["375"]
    h = headers_of(cut)
    assert h["truncated"] == "true" and h["original_size"] == str(MIB)
    assert h["topic"] == env.topic("user-actions") and h["partition"] == "0"
    assert "not valid JSON" in h["reason"]
    assert 1_000_000 < len(cut.value()) < MIB and huge.startswith(cut.value())
    h = headers_of(whole)
    assert "truncated" not in h and whole.value() == big and h["partition"] == "1"
    assert "missing field event_id" in h["reason"]


# ---------------------------------------------------------------- anything at all


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=25,
)
# Any depth, often near Python's recursion limit (1,000) and orjson's (1,024).
DEPTH = st.integers(1, 5_000) | st.integers(900, 1_030)
FIELDS = st.sampled_from(["event_id", "event_type", "ts", "user_id", "session", "article"])


def _with(field: str, raw: bytes) -> bytes:
    """A click whose `field` is `raw`, written by hand (json.dumps recurses on depth)."""
    event = json.loads(click(0, now_ms(), user="hostile")) | {field: "@@"}
    return json.dumps(event).encode().replace(b'"@@"', raw)


HOSTILE = st.one_of(
    st.binary(max_size=300),  # any bytes
    st.text(max_size=200).map(str.encode),  # text that is rarely JSON
    JSON.map(lambda v: json.dumps(v).encode()),  # JSON that is rarely an event
    st.builds(lambda f, v: _with(f, json.dumps(v).encode()), FIELDS, JSON),
    st.builds(lambda f, d: _with(f, nested(d)), FIELDS, DEPTH),  # deep
    DEPTH.map(nested),
    st.builds(lambda f, n: _with(f, json.dumps("x" * n).encode()), FIELDS, st.integers(0, 300_000)),
    st.builds(lambda f, b: _with(f, b'"' + b + b'"'), FIELDS, st.binary(max_size=40)),  # bad UTF-8
)


def test_any_event_is_decided_within_seconds_and_good_ones_beside_it_are_stored(
    env: Env,
) -> None:
    proc = env.start()
    t = now_ms() - 60_000
    examples = itertools.count()

    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(hostile=st.lists(HOSTILE, min_size=1, max_size=6))
    @example(hostile=[_with("user_id", nested(1_000)), _with("ts", nested(1_000))])
    def check(hostile: list[bytes]) -> None:
        k = next(examples)
        users = [f"h{k}-{j}" for j in range(8)]
        good = [click(k * 100 + j, t + j, user=u) for j, u in enumerate(users)]
        values = [v for pair in itertools.zip_longest(good, hostile) for v in pair if v is not None]
        env.produce("user-actions", values)
        # decided (stored, DLQ or retry) within seconds: every offset committed
        wait_for(env.all_committed, 20, env, "every event decided")
        # and the good ones in the same batches stored at once, not after a retry
        assert all(env.read([Query("user_last_click", u) for u in users]))

    check()
    assert env.read_topic(env.topic("user-actions") + ".retry", 0, timeout=2) == []
    assert env.stop(proc) == 0
    assert "Traceback" not in env.logs()


# ---------------------------------------------------------------- lag


def test_the_lag_gauge_stays_for_a_partition_whose_commit_is_held(kafka_bootstrap: str) -> None:
    topic = f"lag-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, {topic: 1})
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(10):
        producer.produce(topic, b"%d" % i, partition=0)
    assert producer.flush(30) == 0

    def convert(m: KafkaMessage, tracker: OffsetTracker) -> Message:
        off = m.offset() or 0
        return Message(topic, 0, off, None, m.value(), Origin(topic, 0, off), tracker=tracker)

    metrics = IngestMetrics()
    consumer = GroupConsumer(
        kafka_bootstrap,
        f"lag-{topic}",
        [topic],
        convert,
        flow="ingest",
        metrics=metrics,
        config={"session.timeout.ms": 6000},  # tansu's first join waits on it
    )
    labels = {"flow": "ingest", "topic": topic, "partition": "0"}
    try:
        got: list[Message] = []
        deadline = time.monotonic() + 30
        while len(got) < 10 and time.monotonic() < deadline:
            got += consumer.poll(100, 0.5)
        assert len(got) == 10
        for m in got[1:]:  # offset 0 is held back (a slow or stuck record)
            m.ack()
        consumer.commit()
        assert metrics.value("featureplane_ingest_lag", labels) == 10
        got[0].ack()
        consumer.commit()
        assert metrics.value("featureplane_ingest_lag", labels) == 0
        assert metrics.value("featureplane_ingest_committed_offset", labels) == 10
    finally:
        consumer.close()
