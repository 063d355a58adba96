"""Helpers of the ingestion integration tests: one test's spec, topics, consumer
group and data dir (`Env`), and the events they produce.

Each test gets its own topics (the example catalog's rules with a unique
suffix), consumer group and data dir, so tests share the session broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from featureplane.codec import decode_python
from featureplane.spec import Catalog, load_catalog
from featureplane.stores.base import Query
from featureplane.stores.embedded import EmbeddedStore

__all__ = ["PARTITIONS", "Env", "click", "now_ms", "wait_for"]

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
        # Large enough for the oversized records of the hostile tests (tansu takes them).
        producer = Producer(
            {"bootstrap.servers": self.bootstrap, "linger.ms": 5, "message.max.bytes": 4 << 20}
        )

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
