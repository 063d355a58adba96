"""Kafka I/O with confluent-kafka: a consumer-group reader with manual commits, a
reader of offset ranges, and a producer that confirms delivery.

`GroupConsumer` subscribes (so several workers or processes share the
partitions), never auto-commits and never auto-stores offsets; every record
read is tracked by its partition's `OffsetTracker`, and `commit()` commits
each partition's contiguous acknowledged position. On a rebalance the
revoked partitions are committed first; on a lost assignment nothing is
committed (another member owns them now). Every commit interval the lag
gauge of every assigned partition is set, whether its offset moved or not.
`range_reader` reads partitions from chosen offsets to their end (backfill,
redrive) in no consumer group's commits. `Deliverer.deliver` produces and
waits for the broker's acknowledgement of every record (acks=all);
`kafka_cluster.max_message_bytes` tells how large a record the broker takes,
so the producer is sized to it and larger copies are cut
(`operators.route.fit`).

Both are built from a `kafka_cluster.KafkaCluster` (or a bootstrap string).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka import Message as KafkaMessage

from featureplane.operators.commit import OffsetTracker
from featureplane.operators.kafka_cluster import (
    KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
    Cluster,
    KafkaCluster,
    cluster_of,
)
from featureplane.operators.metrics import IngestMetrics
from featureplane.operators.records import Message
from featureplane.operators.route import Outgoing

__all__ = ["Deliverer", "GroupConsumer", "range_reader"]

log = logging.getLogger(__name__)

Convert = Callable[[KafkaMessage, OffsetTracker], Message]
_UNCONFIRMED = "delivery not confirmed in time"


class GroupConsumer:
    """A subscribed consumer whose offsets are committed only once acknowledged."""

    def __init__(
        self,
        cluster: Cluster,
        group: str,
        topics: Sequence[str],
        convert: Convert,
        *,
        flow: str,
        metrics: IngestMetrics,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.flow = flow
        self.metrics = metrics
        self.convert = convert
        self.trackers: dict[tuple[str, int], OffsetTracker] = {}
        self._paused = False
        conf = cluster_of(cluster).client_config(
            {
                "group.id": group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False,
                "isolation.level": "read_committed",  # librdkafka's default, relied upon
                # A small prefetch queue (librdkafka's default is 64 MB) keeps a slow consumer
                # from filling it with a few partitions' backlog while the others wait.
                "queued.max.messages.kbytes": 8192,
                # The broker answers a fetch at once when it has data, else after this wait:
                # librdkafka's 500 ms default shows up directly in freshness at low rates.
                "fetch.wait.max.ms": 100,
                **(config or {}),
            }
        )
        self._consumer = Consumer(conf)
        self._consumer.subscribe(
            list(topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    # -- rebalance callbacks (run inside poll/consume, on the caller's thread)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.trackers[(tp.topic, tp.partition)] = OffsetTracker(tp.topic, tp.partition)
        log.info("%s: assigned %s", self.flow, _names(partitions))
        if self._paused and partitions:
            consumer.pause(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self._commit([self.trackers[k] for k in keys if k in self.trackers])
        for k in keys:
            self.trackers.pop(k, None)
            self._drop_lag(*k)
        log.info("%s: revoked %s (acknowledged offsets committed)", self.flow, _names(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.trackers.pop((tp.topic, tp.partition), None)
            self._drop_lag(tp.topic, tp.partition)
        log.warning("%s: lost %s without committing", self.flow, _names(partitions))

    # -- reading

    def poll(self, max_records: int, timeout_s: float) -> list[Message]:
        """Up to `max_records` records, each tracked before it is returned."""
        out: list[Message] = []
        counts: dict[str, int] = {}
        read: dict[OffsetTracker, list[int]] = {}
        for m in self._consumer.consume(max_records, timeout_s):
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                log.warning("%s: consumer error: %s", self.flow, err)
                continue
            topic, partition, offset = m.topic(), m.partition(), m.offset()
            assert topic is not None and partition is not None and offset is not None
            tracker = self.trackers.get((topic, partition))
            if tracker is None:  # assigned outside the callback (should not happen)
                tracker = self.trackers[(topic, partition)] = OffsetTracker(topic, partition)
            offsets = read.get(tracker)
            if offsets is None:
                offsets = read[tracker] = []
            offsets.append(offset)
            counts[topic] = counts.get(topic, 0) + 1
            out.append(self.convert(m, tracker))
        for tracker, offsets in read.items():  # one lock a partition, not one a record
            tracker.track_many(offsets)
        for topic, n in counts.items():
            self.metrics.records_in.labels(self.flow, topic).inc(n)
        return out

    def in_flight(self) -> int:
        return sum(t.in_flight for t in self.trackers.values())

    def pause(self) -> None:
        if not self._paused:
            self._paused = True
            self._consumer.pause(self._consumer.assignment())

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self._consumer.resume(self._consumer.assignment())

    # -- committing

    def commit(self) -> None:
        """Commit every partition whose acknowledged position moved; gauge every lag."""
        trackers = list(self.trackers.values())
        self._commit(trackers)
        for t in trackers:
            self._gauge_lag(t)

    def _commit(self, trackers: Sequence[OffsetTracker]) -> None:
        moved = [(t, p) for t in trackers if (p := t.to_commit()) is not None]
        if not moved:
            return
        offsets = [TopicPartition(t.topic, t.partition, p) for t, p in moved]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            log.warning("%s: commit failed, will retry: %s", self.flow, exc)
            return
        for t, p in moved:
            t.committed(p)
            self.metrics.committed_offset.labels(self.flow, t.topic, str(t.partition)).set(p)

    def _gauge_lag(self, t: OffsetTracker) -> None:
        # Set on every commit interval, not only when the offset moves: a partition
        # whose commit is held back is exactly the one whose lag must stay visible.
        base = t.last_committed if t.last_committed is not None else t.first_read
        if base is None:  # nothing read or committed since the assignment
            return
        try:
            _, high = self._consumer.get_watermark_offsets(
                TopicPartition(t.topic, t.partition), cached=True
            )
        except KafkaException:
            return
        if high is not None and high >= 0:
            self.metrics.lag.labels(self.flow, t.topic, str(t.partition)).set(max(0, high - base))

    def _drop_lag(self, topic: str, partition: int) -> None:
        # Another member owns the partition now and reports its lag and commits; a frozen
        # series left here would be summed with the new owner's.
        for gauge in (self.metrics.lag, self.metrics.committed_offset):
            try:
                gauge.remove(self.flow, topic, str(partition))
            except KeyError:
                pass

    def close(self) -> None:
        """Commit what is acknowledged and leave the group."""
        try:
            self.commit()
        finally:
            self._consumer.close()


class Deliverer:
    """Produces records and waits until the broker confirms each one."""

    def __init__(
        self,
        cluster: Cluster,
        config: Mapping[str, Any] | None = None,
        *,
        max_message_bytes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self._producer = Producer(
            cluster_of(cluster).client_config(
                {
                    "acks": "all",
                    "linger.ms": 5,
                    # librdkafka's own default (1,000,000) is below Kafka's: sized to the
                    # broker's, a record the broker takes is never refused locally.
                    "message.max.bytes": max_message_bytes,
                    **(config or {}),
                }
            )
        )

    def deliver(
        self, records: Sequence[Outgoing], timeout_s: float = 30.0, rounds: int = 3
    ) -> list[str | None]:
        """Produce all; one entry per record: None when delivered, else the error."""
        results: list[str | None] = [_UNCONFIRMED] * len(records)
        todo = list(range(len(records)))
        for _ in range(rounds):
            if not todo:
                break
            for i in todo:
                results[i] = _UNCONFIRMED
                self._produce(records[i], results, i)
            deadline = time.monotonic() + timeout_s
            while any(results[i] is _UNCONFIRMED for i in todo):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._producer.flush(min(left, 1.0))
            todo = [i for i in todo if results[i] is not None]
        return results

    def _produce(self, rec: Outgoing, results: list[str | None], i: int) -> None:
        def done(err: KafkaError | None, _msg: KafkaMessage) -> None:
            results[i] = None if err is None else str(err)

        while True:
            try:
                self._producer.produce(
                    rec.topic, rec.value, rec.key, headers=list(rec.headers), on_delivery=done
                )
                return
            except BufferError:  # local queue full: serve callbacks, then try again
                self._producer.poll(0.1)
            except KafkaException as exc:  # refused locally (too large, say): this record only
                results[i] = str(exc.args[0] if exc.args else exc)
                return

    def close(self, timeout_s: float = 10.0) -> None:
        self._producer.flush(timeout_s)


def range_reader(kafka: KafkaCluster, purpose: str) -> Consumer:
    """A consumer for partitions assigned by hand, read up to their end: it joins a group of
    its own that never commits, so a live consumer group is untouched, and it reads
    committed records only, as ingestion does. `purpose` names the group
    (featureplane-<purpose>-<random>)."""
    return Consumer(
        kafka.client_config(
            {
                "group.id": f"featureplane-{purpose}-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,  # where "the end" is
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                # A fetch at the end of a partition waits this long before the broker says
                # so (librdkafka's default 500 ms): a read to the end ends on those answers.
                "fetch.wait.max.ms": 100,
            }
        )
    )


def _names(partitions: Sequence[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
