"""`featureplane backfill`: reprocess a Kafka topic's time range into the store.

Each partition is read from the first offset at `start` (Kafka's
offsets-for-times lookup) to the end of its log, or to its first record
stamped more than `grace` after `end`; the records stamped within
[start, end] go through the same decode, dispatch and aggregate steps as
ingestion and are written through the batch `Sink`. No consumer group is
joined and nothing is committed, so the live ingest is untouched; writes are
idempotent, so a backfill can simply run again. A broker that does not
answer, or fails a call, is one line naming it (`StartupError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import uuid
from collections import Counter
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from featureplane.batch.progress import Progress
from featureplane.batch.sink import Sink
from featureplane.errors import FeatureplaneError
from featureplane.lifecycle import broker_error, check_kafka_reachable
from featureplane.operators.aggregate import Aggregator
from featureplane.operators.decode import decode_works
from featureplane.operators.dispatch import Dispatcher
from featureplane.operators.kafka_cluster import KafkaCluster
from featureplane.operators.records import Message, Origin, Work
from featureplane.settings import Settings
from featureplane.spec import Catalog
from featureplane.stores import open_cache, open_store

__all__ = ["BackfillJob", "backfill", "run"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BackfillJob:
    """Which records to reprocess, as the command line gives them."""

    topic: str
    """The event topic to reprocess."""
    start: int
    """First event time, epoch ms."""
    end: int
    """Last event time (inclusive), epoch ms."""
    groups: str | None
    """Only these feature groups, comma separated; None: all the topic feeds."""
    batch_size: int
    """Records per batch."""
    grace_ms: int
    """A partition stops at its first record stamped this long after `end`."""
    max_attempts: int
    """Retries of a transient write failure before the job stops."""
    shard: tuple[int, int] | None = None
    """(I, N): only shard I of N; None: all of it."""


def _dispatcher(catalog: Catalog, topic: str, groups: str | None) -> Dispatcher:
    rules = [r for r in catalog.rules if r.topic == topic]
    if groups:
        wanted = {g.strip() for g in groups.split(",") if g.strip()}
        unknown = wanted - set(catalog.groups)
        if unknown:
            raise FeatureplaneError(f"unknown groups: {', '.join(sorted(unknown))}")
        rules = [r for r in rules if r.group in wanted]
    if not rules:
        raise FeatureplaneError(
            f"no ingestion rule reads topic {topic!r}" + (f" for groups {groups}" if groups else "")
        )
    return Dispatcher(rules)


async def backfill(settings: Settings, catalog: Catalog, job: BackfillJob) -> Counter[str]:
    """Reprocess the job's records; counts of records read, in range, malformed and items.

    A Kafka call that fails is a `StartupError` naming the broker and librdkafka's
    reason; a broker that does not answer is one at once, before the first call.
    """
    bootstrap = settings.kafka_bootstrap
    if not bootstrap:
        raise FeatureplaneError("no Kafka broker: set FEATUREPLANE_KAFKA_BOOTSTRAP or --bootstrap")
    if job.end < job.start:
        raise FeatureplaneError("--to is before --from")
    dispatcher, aggregator = _dispatcher(catalog, job.topic, job.groups), Aggregator(catalog)
    check_kafka_reachable(bootstrap)
    kafka = KafkaCluster(bootstrap, settings.kafka_config)
    consumer = Consumer(
        kafka.client_config(
            {
                "group.id": f"featureplane-backfill-{uuid.uuid4().hex[:8]}",  # never committed
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",  # as ingestion reads
            }
        )
    )
    counts: Counter[str] = Counter()
    redis = open_cache(settings, catalog)
    try:
        meta = consumer.list_topics(job.topic, timeout=10).topics.get(job.topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise FeatureplaneError(f"topic {job.topic!r} does not exist")
        wanted = [TopicPartition(job.topic, p, job.start) for p in meta.partitions]
        starts = consumer.offsets_for_times(wanted, timeout=30)
        todo = [tp for tp in starts if tp.offset >= 0]
        open_parts = {tp.partition for tp in todo}
        log.info(
            "backfill %s [%d, %d] from %s at offsets %s",
            job.topic,
            job.start,
            job.end,
            kafka,
            {tp.partition: tp.offset for tp in todo},
        )
        consumer.assign(todo)
        progress = Progress(f"backfill {job.topic}")
        async with Sink(
            open_store(settings, catalog), redis, max_attempts=job.max_attempts
        ) as sink:
            while open_parts:
                works: list[Work] = []
                for m in consumer.consume(job.batch_size, 1.0):
                    err = m.error()
                    part = m.partition() or 0
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:  # noqa: SLF001 (public name)
                            open_parts.discard(part)
                            continue
                        raise FeatureplaneError(f"reading {job.topic}: {err}")
                    if part not in open_parts:
                        continue
                    ts = m.timestamp()[1]
                    if ts > job.end + job.grace_ms:
                        open_parts.discard(part)
                        consumer.incremental_unassign([TopicPartition(job.topic, part)])
                        continue
                    counts["read"] += 1
                    if not job.start <= ts <= job.end:
                        continue
                    off = m.offset() or 0
                    works.append(
                        Work(
                            Message(
                                job.topic,
                                part,
                                off,
                                m.key(),
                                m.value(),
                                Origin(job.topic, part, off),
                            )
                        )
                    )
                done = aggregator.aggregate(dispatcher.dispatch(decode_works(works)))
                bad = [w for w in done if w.status == "malformed"]
                for w in bad[:5]:
                    log.warning(
                        "malformed %s[%d]@%d: %s",
                        w.message.topic,
                        w.message.partition,
                        w.message.offset,
                        w.reason,
                    )
                await sink.write([i for w in done if w.status == "pending" for i in w.items])
                counts["in range"] += len(works)
                counts["malformed"] += len(bad)
                counts["items"] += sum(len(w.items) for w in done if w.status == "pending")
                progress.advance(done=len(works) - len(bad), rejected=len(bad))
        progress.finish()
    except KafkaException as exc:
        raise broker_error(str(kafka), f"read topic {job.topic!r}", exc) from None
    finally:
        with contextlib.suppress(KafkaException, RuntimeError):
            consumer.close()
    return counts


def run(settings: Settings, catalog: Catalog, job: BackfillJob) -> int:
    """Backfill and print what was done; 0 (malformed records are counted, not failures)."""
    counts = asyncio.run(backfill(settings, catalog, job))
    print(
        f"backfill {job.topic}: read {counts['read']:,} records, {counts['in range']:,} in "
        f"range, wrote {counts['items']:,} items, {counts['malformed']:,} malformed",
        file=sys.stderr,
    )
    return 0  # malformed records are reported above; the live ingest sent them to the DLQ
