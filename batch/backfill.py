"""Reprocess a Kafka topic's time range into the store.

Reads every partition of --topic from the first offset at --from (Kafka's
offsets-for-times lookup) to the end of the log, keeps the records whose
Kafka timestamp is within [--from, --to], and passes them through the same
decode, dispatch and aggregate steps as `featureplane ingest`, optionally only
for --groups. A partition stops at the end of its log, or at its first record
stamped more than --grace after --to (records are in timestamp order within a
partition, up to producers' clock skew). It joins no consumer group and
commits nothing: the live ingest is untouched. Writes are idempotent, so a
backfill over data already ingested changes nothing, and one stopped midway
can simply run again.

Malformed records are counted and listed, not sent to the DLQ again (the live
ingest did that). Transient store failures are retried with backoff; after
--max-attempts the job stops with the reason and exit status 1.

TIME is epoch milliseconds or ISO 8601 with a timezone (2026-11-01T00:00:00Z).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import uuid
from collections import Counter
from datetime import datetime

from confluent_kafka import Consumer, KafkaError, TopicPartition

from featureplane.batch.progress import Progress
from featureplane.batch.sink import Sink
from featureplane.cli import (
    add_kafka_options,
    add_spec_option,
    add_store_options,
    load_spec,
    settings_from,
)
from featureplane.errors import FeatureplaneError
from featureplane.operators.aggregate import Aggregator
from featureplane.operators.decode import decode_works
from featureplane.operators.dispatch import Dispatcher
from featureplane.operators.records import Message, Origin, Work
from featureplane.spec import Catalog, parse_duration
from featureplane.stores import open_redis, open_store
from featureplane.stores.redis import RedisStore

__all__ = ["add_arguments", "parse_time", "run"]

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topic", required=True, help="the event topic to reprocess")
    p.add_argument(
        "--from",
        dest="start",
        required=True,
        type=parse_time,
        help="first event time, epoch ms or ISO 8601 with timezone",
    )
    p.add_argument(
        "--to",
        dest="end",
        required=True,
        type=parse_time,
        help="last event time (inclusive), epoch ms or ISO 8601 with timezone",
    )
    p.add_argument(
        "--groups", help="only these feature groups, comma separated [all fed by the topic]"
    )
    p.add_argument("--batch-size", type=int, default=2000, help="records per batch [2000]")
    p.add_argument(
        "--grace", default="1h", help="stop a partition at a record this far past --to [1h]"
    )
    p.add_argument(
        "--max-attempts", type=int, default=8, help="retries of a transient write failure [8]"
    )
    add_spec_option(p)
    add_kafka_options(p, group=False)
    add_store_options(p)


def parse_time(text: str) -> int:
    """Epoch milliseconds, or ISO 8601 with a timezone -> epoch milliseconds."""
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad time {text!r}: use epoch milliseconds or ISO 8601, e.g. 2026-11-01T00:00:00Z"
        ) from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"time {text!r} has no timezone: add Z or +09:00")
    return int(when.timestamp() * 1000)


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


async def backfill(args: argparse.Namespace) -> Counter[str]:
    settings = settings_from(args)
    if not settings.kafka_bootstrap:
        raise FeatureplaneError("no Kafka broker: set FEATUREPLANE_KAFKA_BOOTSTRAP or --bootstrap")
    if args.end < args.start:
        raise FeatureplaneError("--to is before --from")
    catalog = load_spec(settings)
    dispatcher, aggregator = _dispatcher(catalog, args.topic, args.groups), Aggregator(catalog)
    grace = parse_duration(args.grace)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"featureplane-backfill-{uuid.uuid4().hex[:8]}",  # never committed
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )
    counts: Counter[str] = Counter()
    redis = open_redis(settings, catalog)
    assert redis is None or isinstance(redis, RedisStore)
    try:
        meta = consumer.list_topics(args.topic, timeout=10).topics.get(args.topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise FeatureplaneError(f"topic {args.topic!r} does not exist")
        wanted = [TopicPartition(args.topic, p, args.start) for p in meta.partitions]
        starts = consumer.offsets_for_times(wanted, timeout=30)
        todo = [tp for tp in starts if tp.offset >= 0]
        open_parts = {tp.partition for tp in todo}
        log.info(
            "backfill %s [%d, %d] from offsets %s",
            args.topic,
            args.start,
            args.end,
            {tp.partition: tp.offset for tp in todo},
        )
        consumer.assign(todo)
        progress = Progress(f"backfill {args.topic}")
        async with Sink(
            open_store(settings, catalog), redis, max_attempts=args.max_attempts
        ) as sink:
            while open_parts:
                works: list[Work] = []
                for m in consumer.consume(args.batch_size, 1.0):
                    err = m.error()
                    part = m.partition() or 0
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:  # noqa: SLF001 (public name)
                            open_parts.discard(part)
                            continue
                        raise FeatureplaneError(f"reading {args.topic}: {err}")
                    if part not in open_parts:
                        continue
                    ts = m.timestamp()[1]
                    if ts > args.end + grace:
                        open_parts.discard(part)
                        consumer.incremental_unassign([TopicPartition(args.topic, part)])
                        continue
                    counts["read"] += 1
                    if not args.start <= ts <= args.end:
                        continue
                    off = m.offset() or 0
                    works.append(
                        Work(
                            Message(
                                args.topic,
                                part,
                                off,
                                m.key(),
                                m.value(),
                                Origin(args.topic, part, off),
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
    finally:
        consumer.close()
    return counts


def run(args: argparse.Namespace) -> int:
    counts = asyncio.run(backfill(args))
    print(
        f"backfill {args.topic}: read {counts['read']:,} records, {counts['in range']:,} in "
        f"range, wrote {counts['items']:,} items, {counts['malformed']:,} malformed",
        file=sys.stderr,
    )
    return 0  # malformed records are reported above; the live ingest sent them to the DLQ
