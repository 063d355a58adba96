"""The Kafka cluster: where it is, how every client connects to it, and what its admin API
tells (topics and their partitions, the largest record it takes) or creates (topics).

Every client is configured by `KafkaCluster.client_config`: its role's settings, then
the user's properties (FEATUREPLANE_KAFKA_CONFIG: TLS, SASL), then the bootstrap
servers. The properties featureplane's guarantees rest on (manual commits, acks=all,
...) are never among the user's (`KafkaConfig` refuses them), so nothing overrides them.
A plain bootstrap string is a cluster with no properties of the user's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from featureplane.kafka_config import KafkaConfig

__all__ = [
    "KAFKA_DEFAULT_MAX_MESSAGE_BYTES",
    "Cluster",
    "KafkaCluster",
    "cluster_of",
    "ensure_topics",
    "log_error",
    "max_message_bytes",
    "topic_partitions",
]

log = logging.getLogger(__name__)

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
            "error_cb": log_error,
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


def cluster_of(where: Cluster) -> KafkaCluster:
    """`where` as a `KafkaCluster` (a bootstrap string: one with no properties of the user's)."""
    return where if isinstance(where, KafkaCluster) else KafkaCluster(where)


def topic_partitions(cluster: Cluster, timeout_s: float = 10.0) -> dict[str, int]:
    """Existing topics and their partition counts.

    A cluster that cannot be read raises KafkaException with librdkafka's reason for
    the failed connections (a refused SASL login, say) after its own "transport failure".
    """
    errors: list[KafkaError] = []

    def seen(err: KafkaError) -> None:
        errors.append(err)
        log_error(err)

    kafka = cluster_of(cluster)
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
    admin = AdminClient(cluster_of(cluster).client_config())
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
    admin = AdminClient(cluster_of(cluster).client_config())
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


def log_error(err: KafkaError) -> None:
    """librdkafka's error callback: a warning line (it retries by itself)."""
    log.warning("kafka: %s", err)
