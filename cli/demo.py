"""Feed realistic sample events for the example catalog (examples/) into Kafka.

Clicks and searches on `user-actions`, keyword changes on `user-updates`,
article updates with 64-float embeddings and stats on `article-updates`.
User `user-1` is the busiest, so its features visibly grow within seconds:

    curl -s localhost:8000/v1/features/recent_user_clicked_fleaMarketArticles/user-1
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Producer

from featureplane.errors import FeatureplaneError
from featureplane.jobs import resolve_source
from featureplane.lifecycle import check_kafka_reachable
from featureplane.operators.kafka_cluster import KafkaCluster
from featureplane.settings import Settings

__all__ = ["events", "run", "write_samples"]

log = logging.getLogger("featureplane.cli.demo")

CATEGORIES = ("bike", "furniture", "books", "baby", "phones", "games", "plants", "kitchen")
KEYWORDS = ("bike", "sofa", "stroller", "iphone", "lego", "monstera", "desk", "camera", "tent")
QUERIES = ("road bike", "ikea desk", "lego technic", "baby stroller", "iphone 15", "camping tent")


def events(
    rnd: random.Random, now_ms: Callable[[], int], users: int = 100, articles: int = 500
) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """Endless (topic, key, event) triples; user-1 gets about a tenth of the traffic."""
    while True:
        user = "user-1" if rnd.random() < 0.1 else f"user-{rnd.randint(1, users)}"
        article = f"article-{rnd.randint(1, articles)}"
        base = {"event_id": str(uuid.UUID(int=rnd.getrandbits(128))), "ts": now_ms()}
        roll = rnd.random()
        if roll < 0.6:
            yield "user-actions", user.encode(), base | _click(rnd, user, article)
        elif roll < 0.75:
            yield "user-actions", user.encode(), base | _search(rnd, user)
        elif roll < 0.82:
            yield "user-updates", user.encode(), base | _keywords(rnd, user)
        elif roll < 0.92:
            yield "article-updates", article.encode(), base | _article_updated(rnd, article)
        else:
            stats = _stats(rnd) | {"article_id": article}
            yield "article-updates", article.encode(), base | stats


def _click(rnd: random.Random, user: str, article: str) -> dict[str, Any]:
    kind = "fleaMarket" if rnd.random() < 0.8 else "community"
    return {
        "event_type": "click",
        "user_id": user,
        "session": f"s-{user}-{rnd.randint(1, 3)}",
        "article": {"id": article, "kind": kind, "category": rnd.choice(CATEGORIES)},
    }


def _search(rnd: random.Random, user: str) -> dict[str, Any]:
    return {
        "event_type": "search",
        "user_id": user,
        "query": rnd.choice(QUERIES),
        "result_count": rnd.randint(0, 400),
    }


def _keywords(rnd: random.Random, user: str) -> dict[str, Any]:
    return {
        "event_type": "keywords_changed",
        "user_id": user,
        "keywords": rnd.sample(KEYWORDS, rnd.randint(1, 4)),
        "source": rnd.choice(["app", "web"]),
    }


def _stats(rnd: random.Random) -> dict[str, Any]:
    return {
        "event_type": "article_stats_recomputed",
        "counts": {"views": rnd.randint(0, 5000), "likes": rnd.randint(0, 300)},
        "price": round(rnd.uniform(1, 900), 2),
        "is_sold": rnd.random() < 0.2,
    }


def _article_updated(rnd: random.Random, article: str) -> dict[str, Any]:
    stats = _stats(rnd)
    del stats["event_type"]
    return {
        "event_type": "article_updated",
        "article": stats
        | {
            "id": article,
            "embedding_model": "minilm-64",
            "embedding": [round(rnd.gauss(0, 0.3), 5) for _ in range(64)],
        },
    }


def write_samples(folder: Path, at_ms: int, articles: int = 500, seed: int = 7) -> list[Path]:
    """Nightly-dump-like files for the example catalog's batch jobs (examples/batch.yaml),
    under `folder`/samples for the UTC day of `at_ms`: article stats in three JSONL files,
    embeddings in one. Returns the files written."""
    rnd = random.Random(seed)
    day = resolve_source("{date}", at_ms)
    stats_dir = folder / "samples" / "article_stats" / day
    stats_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for part in range(3):
        path = stats_dir / f"part-{part:05d}.jsonl"
        with path.open("wb") as f:
            for n in range(part + 1, articles + 1, 3):
                row = {"id": f"article-{n}", "ts": at_ms} | _stats(rnd)
                del row["event_type"]
                f.write(orjson.dumps(row) + b"\n")
        written.append(path)
    path = folder / "samples" / "article_embeddings" / f"{day}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for n in range(1, articles + 1):
            embedding = [round(rnd.gauss(0, 0.3), 5) for _ in range(64)]
            row = {"id": f"article-{n}", "ts": at_ms, "embedding": embedding, "model": "minilm-64"}
            f.write(orjson.dumps(row) + b"\n")
    written.append(path)
    return written


def run(
    settings: Settings, *, rate: float, count: int = 0, users: int = 100, seed: int | None = None
) -> int:
    """Send `rate` events a second (`count` in all, 0 = until Ctrl-C); 1 if any was lost."""
    if not settings.kafka_bootstrap:
        raise FeatureplaneError("no broker: pass --bootstrap or set FEATUREPLANE_KAFKA_BOOTSTRAP")
    check_kafka_reachable(settings.kafka_bootstrap)
    kafka = KafkaCluster(settings.kafka_bootstrap, settings.kafka_config)
    producer = Producer(kafka.client_config({"linger.ms": 20, "enable.idempotence": True}))
    failures: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    rnd = random.Random(seed)
    interval = 1.0 / rate if rate > 0 else 0.0
    next_at, sent = time.monotonic(), 0
    log.info("feeding demo events to %s at %.0f/s", kafka, rate)
    try:
        for topic, key, event in events(rnd, lambda: time.time_ns() // 1_000_000, users):
            producer.produce(topic, orjson.dumps(event), key, on_delivery=delivered)
            sent += 1
            if count and sent >= count:
                break
            next_at += interval
            producer.poll(max(0.0, next_at - time.monotonic()))
            if sent % 1000 == 0:
                log.info("%d demo events sent", sent)
    except KeyboardInterrupt:
        pass
    finally:
        left = producer.flush(10)
    if failures or left:
        log.error("%d events failed, %d undelivered: %s", len(failures), left, failures[:3])
        return 1
    log.info("%d demo events delivered", sent)
    return 0
