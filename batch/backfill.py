"""`featureplane backfill`: reprocess a Kafka topic's time range into the store.

Each partition is read from the first offset at `start` (Kafka's
offsets-for-times lookup) to the end of its log, or to its first record
stamped more than `grace` after `end`; the records stamped within
[start, end] go through the same decode, dispatch and aggregate steps as
ingestion and are written through the batch `Sink`. No consumer group is
joined and nothing is committed, so the live ingest is untouched; writes are
idempotent, so a backfill can simply run again. A broker that does not
answer, or fails a call, is one line naming it (`StartupError`).

`--shard I/N` reads only the (partition, time slice) units that
`shards.backfill_units` deals to shard I, each from the first offset at its
slice's start to past its slice's end (+ grace), keeping the records stamped
within the slice: every I over one N covers each (partition, ms) once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from featureplane.batch.progress import Progress
from featureplane.batch.shards import ShardResult, backfill_units
from featureplane.batch.sink import Sink
from featureplane.errors import FeatureplaneError
from featureplane.jobs import iso_time
from featureplane.lifecycle import broker_error, check_kafka_reachable
from featureplane.operators.aggregate import Aggregator
from featureplane.operators.decode import decode_works
from featureplane.operators.dispatch import Dispatcher
from featureplane.operators.kafka import range_reader
from featureplane.operators.kafka_cluster import KafkaCluster
from featureplane.operators.records import Message, Origin, Work
from featureplane.settings import Settings
from featureplane.spec import Catalog
from featureplane.stores import open_cache, open_store

__all__ = ["BackfillJob", "backfill", "run", "survey"]

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


def _consumer(settings: Settings) -> tuple[KafkaCluster, Consumer]:
    bootstrap = settings.kafka_bootstrap
    if not bootstrap:
        raise FeatureplaneError("no Kafka broker: set FEATUREPLANE_KAFKA_BOOTSTRAP or --bootstrap")
    check_kafka_reachable(bootstrap)
    kafka = KafkaCluster(bootstrap, settings.kafka_config)
    return kafka, range_reader(kafka, "backfill")


def _partitions(consumer: Consumer, topic: str) -> list[int]:
    meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise FeatureplaneError(f"topic {topic!r} does not exist")
    return sorted(meta.partitions)


def survey(settings: Settings, topic: str, start: int, end: int) -> tuple[int, int]:
    """(partitions, about how many records are stamped in [start, end]) of a topic, from
    the offsets at both times (Kafka's offsets-for-times lookup), reading no record."""
    kafka, consumer = _consumer(settings)
    try:
        parts = _partitions(consumer, topic)
        firsts = consumer.offsets_for_times([TopicPartition(topic, p, start) for p in parts], 30)
        lasts = consumer.offsets_for_times([TopicPartition(topic, p, end + 1) for p in parts], 30)
        records = 0
        for first, last in zip(firsts, lasts, strict=True):
            if first.offset < 0:  # no record at or after start
                continue
            stop = last.offset
            if stop < 0:  # none after end: up to the end of the log
                stop = consumer.get_watermark_offsets(TopicPartition(topic, first.partition), 10)[1]
            records += max(0, stop - first.offset)
        return len(parts), records
    except KafkaException as exc:
        raise broker_error(str(kafka), f"survey topic {topic!r}", exc) from None
    finally:
        with contextlib.suppress(KafkaException, RuntimeError):
            consumer.close()


async def backfill(
    settings: Settings,
    catalog: Catalog,
    job: BackfillJob,
    report: Callable[[int, int], None] | None = None,
) -> Counter[str]:
    """Reprocess the job's records (its shard's); counts of records read, in range,
    malformed and items. `report(done, malformed)` after each written batch, else a
    progress line on stderr.

    A Kafka call that fails is a `StartupError` naming the broker and librdkafka's
    reason; a broker that does not answer is one at once, before the first call.
    """
    if job.end < job.start:
        raise FeatureplaneError("--to is before --from")
    dispatcher, aggregator = _dispatcher(catalog, job.topic, job.groups), Aggregator(catalog)
    kafka, consumer = _consumer(settings)
    counts: Counter[str] = Counter()
    redis = open_cache(settings, catalog)
    try:
        units = backfill_units(_partitions(consumer, job.topic), job.start, job.end, job.shard)
        wanted = [TopicPartition(job.topic, p, lo) for p, (lo, _) in units.items()]
        starts = consumer.offsets_for_times(wanted, timeout=30) if wanted else []
        todo = [tp for tp in starts if tp.offset >= 0]
        open_parts = {tp.partition for tp in todo}
        log.info(
            "backfill %s [%d, %d] shard %s from %s: partition -> (from, to, offset) %s",
            job.topic,
            job.start,
            job.end,
            job.shard,
            kafka,
            {tp.partition: (*units[tp.partition], tp.offset) for tp in todo},
        )
        if todo:
            consumer.assign(todo)
        label = f"backfill {job.topic}" + (
            f" shard {job.shard[0]}/{job.shard[1]}" if job.shard else ""
        )
        progress = None if report else Progress(label)
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
                    lo, hi = units[part]
                    if ts > hi + job.grace_ms:
                        open_parts.discard(part)
                        consumer.incremental_unassign([TopicPartition(job.topic, part)])
                        continue
                    counts["read"] += 1
                    if not lo <= ts <= hi:
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
                if report:
                    report(len(works) - len(bad), len(bad))
                elif progress:
                    progress.advance(done=len(works) - len(bad), rejected=len(bad))
        if progress:
            progress.finish()
    except KafkaException as exc:
        raise broker_error(str(kafka), f"read topic {job.topic!r}", exc) from None
    finally:
        with contextlib.suppress(KafkaException, RuntimeError):
            consumer.close()
    return counts


def run(settings: Settings, catalog: Catalog, job: BackfillJob) -> int:
    """Backfill and print what was done; 0 (malformed records are counted, not failures).
    A shard with a Pushgateway pushes its counts, on failure too."""
    try:
        counts = asyncio.run(backfill(settings, catalog, job))
    except FeatureplaneError as exc:
        _push(settings, job, None, str(exc))
        raise
    done = ShardResult(
        counts["in range"] - counts["malformed"], counts["malformed"], counts["in range"]
    )
    _push(settings, job, done, None)
    if not counts["in range"]:
        print(
            f"backfill {job.topic}: no record stamped in the range"
            + (" for this shard" if job.shard else "")
            + f" ({iso_time(job.start)} to {iso_time(job.end)}); nothing to do",
            file=sys.stderr,
        )
    shard = f" shard {job.shard[0]}/{job.shard[1]}" if job.shard else ""
    print(
        f"backfill {job.topic}{shard}: read {counts['read']:,} records, {counts['in range']:,} in "
        f"range, wrote {counts['items']:,} items, {counts['malformed']:,} malformed",
        file=sys.stderr,
    )
    return 0  # malformed records are reported above; the live ingest sent them to the DLQ


def _push(
    settings: Settings, job: BackfillJob, result: ShardResult | None, error: str | None
) -> None:
    """A shard's counts to the Pushgateway, so a short-lived pod's metrics outlive it;
    labelled with its batch job (FEATUREPLANE_BATCH_JOB), else with what it loads."""
    if not (settings.pushgateway_url and job.shard):
        return
    from featureplane.batch.metrics import push_shard

    # no batch job set: label the series backfill_<topic>, not one fixed job for all
    named = settings.model_copy(update={"batch_job": settings.batch_job or f"backfill_{job.topic}"})
    push_shard(named, job.shard, result, error)
