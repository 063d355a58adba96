"""Kafka I/O with confluent-kafka: a consumer-group reader with manual commits,
a producer that confirms delivery, and topic creation.

`GroupConsumer` subscribes (so several workers or processes share the
partitions), never auto-commits and never auto-stores offsets; every record
read is tracked by its partition's `OffsetTracker`, and `commit()` commits
each partition's contiguous acknowledged position. On a rebalance the
revoked partitions are committed first; on a lost assignment nothing is
committed (another member owns them now). Every commit interval the lag
gauge of every assigned partition is set, whether its offset moved or not.
`Deliverer.deliver` produces and waits for the broker's acknowledgement of
every record (acks=all); `max_message_bytes` tells how large a record the
broker takes, so the producer is sized to it and larger copies are cut
(`operators.route.fit`).

Every client is configured by `KafkaCluster.client_config`: its role's
settings, then the user's properties (FEATUREPLANE_KAFKA_CONFIG: TLS, SASL),
then the bootstrap servers. The properties featureplane's guarantees rest on
(manual commits, acks=all, ...) are never among the user's (`KafkaConfig`
refuses them), so nothing overrides them. A plain bootstrap string is a
cluster with no properties of the user's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka import Message as KafkaMessage
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from featureplane.kafka_config import KafkaConfig
from featureplane.operators.commit import OffsetTracker
from featureplane.operators.metrics import IngestMetrics
from featureplane.operators.records import Message
from featureplane.operators.route import Outgoing

__all__ = [
    "KAFKA_DEFAULT_MAX_MESSAGE_BYTES",
    "Deliverer",
    "GroupConsumer",
    "KafkaCluster",
    "ensure_topics",
    "max_message_bytes",
    "topic_partitions",
]

log = logging.getLogger(__name__)

Convert = Callable[[KafkaMessage, OffsetTracker], Message]
_UNCONFIRMED = "delivery not confirmed in time"

KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
"""Kafka's documented default of the broker's `message.max.bytes` and the topic's
`max.message.bytes` (1 MiB + 12 bytes of framing)."""


@dataclass(frozen=True)
class KafkaCluster:
    """Where the Kafka cluster is and how to connect to it: every client is built from it."""

    bootstrap: str
    """Bootstrap servers, HOST:PORT[,...]."""
    config: KafkaConfig = field(default_factory=KafkaConfig)
    """The user's librdkafka properties (FEATUREPLANE_KAFKA_CONFIG), added to every client."""

    def client_config(self, role: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One client's librdkafka configuration: `role` (what featureplane sets for this kind
        of client), the user's properties over it, and the bootstrap servers.

        The user's properties may replace the role's tuning (`linger.ms`, `client.id`) but
        never its guarantees: those are `RESERVED` names, which a `KafkaConfig` lacks.
        """
        return {
            "error_cb": _log_error,
            **(role or {}),
            **self.config.librdkafka(),
            "bootstrap.servers": self.bootstrap,
        }

    def __str__(self) -> str:
        """The bootstrap servers and the names of the user's properties (never their values)."""
        if not self.config:
            return self.bootstrap
        return f"{self.bootstrap} (FEATUREPLANE_KAFKA_CONFIG: {self.config.describe()})"


Cluster = KafkaCluster | str
"""A cluster, or its bootstrap servers alone (no properties of the user's)."""


def _cluster(where: Cluster) -> KafkaCluster:
    return where if isinstance(where, KafkaCluster) else KafkaCluster(where)


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
        conf = _cluster(cluster).client_config(
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
            tracker.track(offset)
            counts[topic] = counts.get(topic, 0) + 1
            out.append(self.convert(m, tracker))
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
            _cluster(cluster).client_config(
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


def topic_partitions(cluster: Cluster, timeout_s: float = 10.0) -> dict[str, int]:
    """Existing topics and their partition counts.

    A cluster that cannot be read raises KafkaException with librdkafka's reason for
    the failed connections (a refused SASL login, say) after its own "transport failure".
    """
    errors: list[KafkaError] = []

    def seen(err: KafkaError) -> None:
        errors.append(err)
        _log_error(err)

    kafka = _cluster(cluster)
    admin = AdminClient(kafka.client_config({"error_cb": seen}))
    try:
        md = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        admin.poll(0)  # serves the error callbacks queued meanwhile: why it failed
        raise _with_cause(exc, errors, kafka) from None
    return {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}


def _with_cause(
    exc: KafkaException, errors: Sequence[KafkaError], kafka: KafkaCluster
) -> KafkaException:
    err = exc.args[0] if exc.args else None
    if not isinstance(err, KafkaError):
        return exc
    down = KafkaError._ALL_BROKERS_DOWN  # noqa: SLF001 (public name)
    causes = [e.str() for e in errors if e.code() != down]
    if causes:
        return KafkaException(KafkaError(err.code(), f"{err.str()}: {causes[-1]}"))
    # A TLS client at a plaintext port (or the reverse) may get no answer at all.
    protocol = kafka.config.get("security.protocol", "PLAINTEXT")
    return KafkaException(
        KafkaError(
            err.code(),
            f"{err.str()}: no broker answered; does the port take {protocol}? (Amazon MSK: "
            "9092 PLAINTEXT, 9094 SSL, 9096 SASL_SSL with SCRAM, 9098 IAM)",
        )
    )


def ensure_topics(
    cluster: Cluster, wanted: Mapping[str, int], timeout_s: float = 30.0
) -> list[str]:
    """Create the topics of `wanted` (name -> partitions) that are missing; return them."""
    existing = topic_partitions(cluster, timeout_s)
    missing = sorted(t for t in wanted if t not in existing)
    if not missing:
        return []
    admin = AdminClient(_cluster(cluster).client_config())
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=wanted[t], replication_factor=-1) for t in missing],
        operation_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    for name, fut in futures.items():
        try:
            fut.result(timeout_s)
            log.info("created topic %s (%d partitions)", name, wanted[name])
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise
    return missing


def max_message_bytes(cluster: Cluster, topics: Sequence[str], timeout_s: float = 5.0) -> int:
    """The largest record every one of `topics` takes, from the Kafka admin API.

    The smallest topic `max.message.bytes` (DescribeConfigs); for a topic that does
    not report it, the broker's `message.max.bytes`; when neither answers, Kafka's
    documented default. Apache Kafka and MSK report both. The local stand-in tansu
    (as of 2026-11) answers DescribeConfigs with no entries for topics and brokers
    and enforces no limit, so there the default applies.
    """
    admin = AdminClient(_cluster(cluster).client_config())
    limits: list[int] = []
    unknown = not topics
    resources = [ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics]
    try:
        futures = admin.describe_configs(resources, request_timeout=timeout_s) if topics else {}
        for fut in futures.values():
            value = _config_int(fut.result(timeout_s), "max.message.bytes")
            if value is None:
                unknown = True
            else:
                limits.append(value)
    except (KafkaException, TimeoutError, ValueError) as exc:
        log.warning("kafka: cannot read the topics' max.message.bytes: %s", exc)
        unknown = True
    if unknown:
        broker = _broker_limit(admin, timeout_s)
        limits.append(broker if broker is not None else KAFKA_DEFAULT_MAX_MESSAGE_BYTES)
        if broker is None:
            log.info(
                "kafka: the broker reports no message size limit; assuming Kafka's "
                "default of %d bytes",
                KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
            )
    return min(limits)


def _broker_limit(admin: AdminClient, timeout_s: float) -> int | None:
    try:
        brokers = admin.list_topics(timeout=timeout_s).brokers
        if not brokers:
            return None
        res = ConfigResource(ConfigResource.Type.BROKER, str(min(brokers)))
        futures = admin.describe_configs([res], request_timeout=timeout_s)
        (fut,) = futures.values()
        return _config_int(fut.result(timeout_s), "message.max.bytes")
    except (KafkaException, TimeoutError, ValueError) as exc:
        log.warning("kafka: cannot read the broker's message.max.bytes: %s", exc)
        return None


def _config_int(config: Mapping[str, Any], name: str) -> int | None:
    entry = config.get(name)
    value = getattr(entry, "value", None)
    return int(value) if value else None


def _names(partitions: Sequence[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"


def _log_error(err: KafkaError) -> None:
    log.warning("kafka: %s", err)
