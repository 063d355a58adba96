"""Reading a dead-letter topic: its records, the headers they carry, the batches read.

A DLQ record's headers say why it failed (`reason`), where its event was first
read (`topic`, `partition`, `offset`), how often it was retried, whether it was
cut to fit (`truncated`), and for a record a redrive sent back, `redrive_of`
and `redrive_spec`. The topic is read without joining a consumer group and
with nothing committed, each partition to the end found when the read started.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition
from confluent_kafka import Message as KafkaMessage

from featureplane.errors import FeatureplaneError
from featureplane.operators.kafka import range_reader
from featureplane.operators.kafka_cluster import KafkaCluster
from featureplane.operators.records import Message, Origin

__all__ = [
    "BATCH",
    "REDRIVE_OF",
    "REDRIVE_SPEC",
    "DeadLetter",
    "Dlq",
    "Ranges",
    "newest",
    "partitions",
]

REDRIVE_OF = "redrive_of"
"""Header of a record that failed again: `<dlq partition>:<dlq offset>` it was read at."""
REDRIVE_SPEC = "redrive_spec"
"""Header of a record that failed again: `spec_hash` of the catalog it failed under."""
BATCH = 1_000
"""Records a `scan` batch holds at most: one decode/write/deliver round of a redrive."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One DLQ record as read, and what its headers say."""

    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Mapping[str, str]

    @classmethod
    def of(cls, m: KafkaMessage) -> DeadLetter:
        raw = m.headers() or ()
        heads: dict[str, str] = {}
        for k, v in raw.items() if isinstance(raw, dict) else raw:
            if v is not None:  # the last of a name given twice wins, as `fit` appends
                heads[k] = v if isinstance(v, str) else v.decode("utf-8", "replace")
        return cls(m.partition() or 0, m.offset() or 0, m.timestamp()[1], m.key(), m.value(), heads)

    @property
    def position(self) -> str:
        """Its place in the DLQ, as `redrive_of` names it: `partition:offset`."""
        return f"{self.partition}:{self.offset}"

    def origin(self, source: str) -> Origin:
        """Where the event was first read (-1 where a hand-made record does not say)."""
        return Origin(source, _int(self.headers.get("partition")), _int(self.headers.get("offset")))

    def message(self, source: str) -> Message:
        """The record as ingestion would read it from the source topic."""
        origin = self.origin(source)
        first = self.headers.get("first_failure_ms")
        return Message(
            source,
            origin.partition,
            origin.offset,
            self.key,
            self.value,
            origin,
            attempt=max(0, _int(self.headers.get("attempt"), 0)),
            first_failure_ms=_int(first) if first is not None else None,
            produced_ms=self.timestamp,
        )


def partitions(kafka: KafkaCluster, topic: str) -> list[int]:
    """The topic's partitions; a clear error when it does not exist."""
    consumer = range_reader(kafka, "redrive")
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise FeatureplaneError(f"topic {topic!r} does not exist")
        return sorted(meta.partitions)
    finally:
        with contextlib.suppress(KafkaException, RuntimeError):
            consumer.close()


Ranges = Mapping[int, tuple[int, int]]
"""Offsets [first, end) by partition."""


@dataclass(frozen=True, slots=True)
class Dlq:
    """The DLQ: the first read goes to each partition's end, the second to the same place
    (records sent back meanwhile are not this run's)."""

    kafka: KafkaCluster
    topic: str
    partitions: Sequence[int]

    def scan(self, ranges: Ranges | None = None) -> Iterator[list[DeadLetter]]:
        """The records, in batches, the partitions read together: with `ranges` those
        offsets, else each partition from its start to its end (where the broker says
        end-of-partition). Each read has a consumer of its own: the end-of-partition
        events of one would end the next early."""
        topic = self.topic
        # The end is where the first read found it, not the high watermark of a
        # ListOffsets call: the local stand-in tansu (0.6.0, 2026-11) reports there the
        # last batch's base offset + 1 instead of the offset after its last record.
        starts = (
            {p: OFFSET_BEGINNING for p in self.partitions}
            if ranges is None
            else {p: first for p, (first, _) in ranges.items()}
        )
        open_parts = set(starts)
        consumer = range_reader(self.kafka, "redrive")
        try:
            consumer.assign([TopicPartition(topic, p, off) for p, off in starts.items()])
            while open_parts:
                batch: list[DeadLetter] = []
                # consume() waits out its timeout unless the batch fills: a short one
                # keeps a small DLQ's two reads from costing a second each.
                for m in consumer.consume(BATCH, 0.2):
                    err = m.error()
                    part = m.partition() or 0
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:  # noqa: SLF001 (public name)
                            open_parts.discard(part)
                            continue
                        raise FeatureplaneError(f"reading {topic}: {err}")
                    off = m.offset() or 0
                    end = None if ranges is None else ranges[part][1]
                    if part not in open_parts or (end is not None and off >= end):
                        continue  # past the first read's end: sent back by this run, or newer
                    if end is not None and off >= end - 1:
                        open_parts.discard(part)
                    batch.append(DeadLetter.of(m))
                if batch:
                    yield batch
        finally:
            with contextlib.suppress(KafkaException, RuntimeError):
                consumer.close()


def _int(text: str | None, default: int = -1) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def newest(
    kafka: KafkaCluster, topics: Sequence[str], per_topic: int = 5, deadline_s: float = 3.0
) -> dict[str, list[dict[str, object]]]:
    """The newest `per_topic` records of each event topic's `<topic>.dlq`, newest first, as
    the catalog shows them: {topic: [{ts, reason, source (partition/offset of the event),
    size}]}. Reads each partition's last `per_topic` offsets to its end, at most
    `deadline_s` seconds; a topic without a DLQ yet has none."""
    deadline = time.monotonic() + deadline_s
    consumer = range_reader(kafka, "catalog")
    found: dict[str, list[DeadLetter]] = {t: [] for t in topics}
    try:
        meta = consumer.list_topics(timeout=deadline_s).topics
        starts: list[TopicPartition] = []
        for topic in topics:
            dlq = meta.get(f"{topic}.dlq")
            for p in [] if dlq is None or dlq.error is not None else sorted(dlq.partitions):
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(f"{topic}.dlq", p), timeout=deadline_s, cached=False
                )
                if high > low:  # the read goes on to the end, wherever the broker puts it
                    starts.append(TopicPartition(f"{topic}.dlq", p, max(low, high - per_topic)))
        if starts:
            consumer.assign(starts)
        open_parts = {(tp.topic, tp.partition) for tp in starts}
        while open_parts and time.monotonic() < deadline:
            for m in consumer.consume(BATCH, 0.2):
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:  # noqa: SLF001 (public name)
                        open_parts.discard((str(m.topic()), m.partition() or 0))
                    continue
                found.setdefault(str(m.topic()).removesuffix(".dlq"), []).append(DeadLetter.of(m))
    finally:
        with contextlib.suppress(KafkaException, RuntimeError):
            consumer.close()
    out: dict[str, list[dict[str, object]]] = {}
    for topic, letters in found.items():
        letters.sort(key=lambda d: d.timestamp, reverse=True)
        out[topic] = [
            {
                "ts": d.timestamp,
                "reason": d.headers.get("reason", "no reason header")[:300],
                "source": f"{d.headers.get('partition', '?')}/{d.headers.get('offset', '?')}",
                "size": len(d.value or b""),
            }
            for d in letters[:per_topic]
        ]
    return out
