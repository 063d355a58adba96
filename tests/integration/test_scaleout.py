"""Scale-out: several `featureplane ingest` processes in one consumer group share a
topic's partitions; one killed with -9 and one added mid-stream lose nothing and
duplicate nothing.

Real tansu, real dynalite (DynamoDB takes writers from many processes; the
embedded store allows one writer per data dir). A timeseries item's key is
unique per event, so the table must hold exactly one item per event produced:
replays after the kill and the rebalances overwrite themselves.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from featureplane.keys import partition_key, version
from featureplane.operators.kafka_cluster import ensure_topics
from featureplane.operators.route import dlq_topic, retry_topic
from featureplane.spec import load_catalog
from featureplane.stores.dynamodb import DynamoStore

REPO = Path(__file__).resolve().parents[2]
PARTITIONS = 6
USERS = 60
RATE = 250  # events a second
PRODUCE_S = 20.0
GROUP_NAME = "scale_clicks"

SPEC = """
feature_groups:
  - name: scale_clicks
    entity: user
    kind: timeseries
    features:
      - {name: article_id, type: string}
    max_items: 10000
ingestion:
  - name: clicks
    topic: TOPIC
    event_type: click
    group: scale_clicks
    id: user_id
    features:
      article_id: article_id
"""

_ASSIGN = re.compile(r"ingest: (assigned|revoked|lost) (.*?)(?: \(|$)")


class Member:
    """One `featureplane ingest` process and what its log says it owns."""

    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "featureplane.cli", "ingest"],
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def owned(self) -> set[int]:
        """Partitions held now, replaying the assigned/revoked/lost lines of its log."""
        held: set[int] = set()
        for line in self.log.read_text(errors="replace").splitlines():
            m = _ASSIGN.search(line)
            if m:
                parts = {int(p) for p in re.findall(r"\[(\d+)\]", m.group(2))}
                held = held | parts if m.group(1) == "assigned" else held - parts
        return held

    def ever_owned(self) -> bool:
        return bool(re.search(r"ingest: assigned .*\[\d+\]", self.log.read_text(errors="replace")))


class Feed(threading.Thread):
    """Produces clicks at RATE for PRODUCE_S seconds; remembers every event and the ends."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic = bootstrap, topic
        self.sent: list[tuple[str, int, str]] = []  # (user, ts, event_id)
        self.ends: dict[int, int] = {}
        self.offsets: dict[str, tuple[int, int]] = {}  # sort key -> (partition, offset)
        self.errors: list[str] = []

    def run(self) -> None:
        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})

        def done(err: object, msg: Any) -> None:
            if err is not None:
                self.errors.append(str(err))
                return
            p, off, event = msg.partition(), msg.offset(), json.loads(msg.value())
            self.ends[p] = max(self.ends.get(p, 0), off + 1)
            self.offsets[version(event["ts"], event["event_id"])] = (p, off)

        t0, i = time.monotonic(), 0
        base_ts = time.time_ns() // 1_000_000 - 60_000
        while (elapsed := time.monotonic() - t0) < PRODUCE_S:
            for _ in range(int(elapsed * RATE) - i):
                user, ts, eid = f"u{i % USERS}", base_ts + i, f"e{i}"
                value = {
                    "event_id": eid,
                    "event_type": "click",
                    "ts": ts,
                    "user_id": user,
                    "article_id": f"a{i}",
                }
                producer.produce(
                    self.topic,
                    json.dumps(value).encode(),
                    user.encode(),
                    partition=i % PARTITIONS,
                    on_delivery=done,
                )
                self.sent.append((user, ts, eid))
                i += 1
            producer.poll(0.02)
        if producer.flush(30):
            self.errors.append("events not delivered within 30 s")


@pytest.fixture
def table(dynamodb_endpoint: str) -> Iterator[str]:
    name = f"scale{uuid.uuid4().hex[:10]}"
    yield name
    _client(dynamodb_endpoint).delete_table(TableName=name)


def _client(endpoint: str):  # type: ignore[no-untyped-def]
    return boto3.client(
        "dynamodb",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )


def _stored(endpoint: str, table: str) -> list[tuple[str, str]]:
    """Every (pk, sk) in the table."""
    keys: list[tuple[str, str]] = []
    pages = (
        _client(endpoint)
        .get_paginator("scan")
        .paginate(TableName=table, ProjectionExpression="pk, sk")
    )
    for page in pages:
        keys.extend((it["pk"]["S"], it["sk"]["S"]) for it in page["Items"])
    return keys


def _wait(proc: subprocess.Popen[bytes], timeout: float = 60) -> int | str:
    """Its exit code, or "killed" when it had to be killed after `timeout`."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "killed"


def _committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return {tp.partition: tp.offset for tp in c.committed(tps, timeout=10)}
    finally:
        c.close()


@pytest.mark.slow
def test_three_members_kill_9_and_one_added_lose_and_duplicate_nothing(
    tmp_path: Path, kafka_bootstrap: str, dynamodb_endpoint: str, table: str
) -> None:
    tok = uuid.uuid4().hex[:8]
    topic, group = f"scale-{tok}", f"scale-{tok}"
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("TOPIC", topic))
    catalog = load_catalog(spec)
    ensure_topics(
        kafka_bootstrap, {t: PARTITIONS for t in (topic, retry_topic(topic), dlq_topic(topic))}
    )

    async def create_table() -> None:  # once, before the members race to create it
        store = DynamoStore(catalog, table=table, endpoint_url=dynamodb_endpoint)
        await store.start()
        await store.aclose()

    asyncio.run(create_table())
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATUREPLANE_")} | {
        "FEATUREPLANE_SPEC": str(spec),
        "FEATUREPLANE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "FEATUREPLANE_KAFKA_GROUP": group,
        "FEATUREPLANE_STORE": "dynamodb",
        "FEATUREPLANE_DYNAMODB_TABLE": table,
        "FEATUREPLANE_DYNAMODB_ENDPOINT": dynamodb_endpoint,
        "FEATUREPLANE_DATA_DIR": str(tmp_path / "data"),
        "FEATUREPLANE_METRICS_PORT": "0",
        "FEATUREPLANE_SESSION_TIMEOUT": "6s",
        "FEATUREPLANE_COMMIT_INTERVAL": "200ms",
        "FEATUREPLANE_BATCH_SIZE": "100",
    }
    members = [Member(f"m{i}", env, tmp_path / f"m{i}.log") for i in range(3)]

    def logs() -> str:
        return "\n".join(
            f"--- {m.name}\n" + m.log.read_text(errors="replace")[-2500:] for m in members
        )

    def wait(cond: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not (callable(cond) and cond()):
            for m in members:
                assert m.proc.poll() in (None, -9), f"{m.name} exited: {what}\n{logs()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}\n{logs()}"
            time.sleep(0.2)

    feed = Feed(kafka_bootstrap, topic)
    try:
        # 1. Three members share the six partitions: each holds some, none holds one twice.
        wait(lambda: all(m.owned() for m in members), 45, "three members with partitions")
        feed.start()
        wait(
            lambda: sorted(p for m in members for p in m.owned()) == list(range(PARTITIONS)),
            30,
            "the partitions split over the three members",
        )
        # Every member writes and commits (the store is opened on the first batch).
        wait(
            lambda: min(_committed(kafka_bootstrap, group, topic).values()) > 0,
            30,
            "every partition committing",
        )
        time.sleep(1)

        # 2. kill -9 the first member mid-stream; its partitions must move on.
        victim = members[0]
        orphaned = victim.owned()
        victim.proc.kill()
        victim.proc.wait()
        killed_at = time.monotonic()
        before = _committed(kafka_bootstrap, group, topic)  # the victim commits no more
        # Items the victim wrote past its last commit: its successor replays them.
        written = _stored(dynamodb_endpoint, table)
        replayed = sum(
            1
            for _, sk in written
            if (at := feed.offsets.get(sk)) and at[0] in orphaned and at[1] >= before[at[0]]
        )

        # 3. Add a member mid-stream: it must get partitions too.
        time.sleep(1)
        members.append(Member("m3", env, tmp_path / "m3.log"))
        moved = lambda: any(  # noqa: E731
            _committed(kafka_bootstrap, group, topic)[p] > before.get(p, -1) for p in orphaned
        )
        wait(moved, 45, f"another member committing the killed member's partitions {orphaned}")
        rebalance_s = time.monotonic() - killed_at
        wait(members[3].ever_owned, 45, "the added member getting partitions")

        # 4. Everything produced is committed.
        feed.join(PRODUCE_S + 30)
        assert not feed.errors, feed.errors[:3]
        ends = dict(feed.ends)
        wait(
            lambda: all(
                _committed(kafka_bootstrap, group, topic)[p] >= end for p, end in ends.items()
            ),
            45,
            "offsets committed to the end",
        )
    finally:
        for m in members:
            if m.proc.poll() is None:
                m.proc.send_signal(signal.SIGTERM)
        codes = {m.name: _wait(m.proc) for m in members}
    assert codes == {"m0": -9, "m1": 0, "m2": 0, "m3": 0}, logs()

    # 5. Exactly one item per event produced: none lost, none duplicated.
    stored = _stored(dynamodb_endpoint, table)
    expected = {(partition_key(GROUP_NAME, u), version(ts, eid)) for u, ts, eid in feed.sent}
    assert len(feed.sent) >= RATE * PRODUCE_S * 0.8
    missing = expected - set(stored)
    extra = set(stored) - expected
    duplicates = len(stored) - len(set(stored))
    print(
        f"\nscale-out: {len(feed.sent)} events produced, {len(stored)} items stored, "
        f"{len(missing)} lost, {duplicates + len(extra)} duplicated or unexpected; "
        f"{replayed} written by the killed member past its last commit (replayed); "
        f"its partitions {sorted(orphaned)} moved on after {rebalance_s:.1f}s"
    )
    assert not missing, f"{len(missing)} events lost, e.g. {sorted(missing)[:3]}"
    assert not extra and not duplicates
    assert len(stored) == len(feed.sent)
