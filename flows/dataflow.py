"""Builds and runs the ingest and retry dataflows (the thin Bytewax layer).

    kafka (GroupSource) -> batch -> decode -> dispatch -> aggregate -> write -> route -> ack

Both flows share every step; they differ in what they read (event topics,
or `<topic>.retry` with a backoff hold) and in their consumer group.
"""

from __future__ import annotations

import atexit
import gc
import logging
import time
from dataclasses import dataclass
from typing import Literal

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from confluent_kafka import KafkaException
from confluent_kafka import Message as KafkaMessage

from featureplane import lifecycle
from featureplane.errors import FeatureplaneError
from featureplane.flows.options import METRICS_PORTS, FlowOptions
from featureplane.flows.source import GroupPartition, GroupSource
from featureplane.operators import metrics
from featureplane.operators.commit import OffsetTracker
from featureplane.operators.kafka import GroupConsumer, ensure_topics, topic_partitions
from featureplane.operators.pipeline import Pipeline, PipelineConfig
from featureplane.operators.records import Message, Origin
from featureplane.operators.retry import Backoff, RetryHold
from featureplane.operators.route import dlq_topic, parse_retry_headers, retry_topic
from featureplane.settings import Settings
from featureplane.spec import Catalog
from featureplane.stores.base import wall_clock_ms

__all__ = ["STOP", "Built", "build", "install_signal_handlers", "prepare_topics", "run"]

log = logging.getLogger(__name__)

Kind = Literal["ingest", "retry"]

STOP = lifecycle.STOP
"""Set by SIGTERM/SIGINT: the sources stop reading, drain, commit and end."""


def install_signal_handlers() -> None:
    """First SIGTERM or SIGINT: graceful stop; a second SIGINT: KeyboardInterrupt.

    `featureplane ingest`/`retry` already did this before their imports; this is for
    `python -m bytewax.run flows.<kind>:flow`.
    """
    lifecycle.install_stop_handlers()


def _bootstrap(settings: Settings) -> str:
    if not settings.kafka_bootstrap:
        raise FeatureplaneError(
            "no Kafka broker: set FEATUREPLANE_KAFKA_BOOTSTRAP or pass --bootstrap HOST:PORT"
        )
    return settings.kafka_bootstrap


def prepare_topics(kind: Kind, settings: Settings, catalog: Catalog, options: FlowOptions) -> None:
    """Create the topics the flow needs if missing: event, retry and DLQ topics."""
    bootstrap = _bootstrap(settings)
    if not catalog.topics:
        raise FeatureplaneError(
            f"the spec at {settings.spec} has no ingestion rules: nothing to read"
        )
    try:
        existing = topic_partitions(bootstrap)
    except KafkaException as exc:
        raise FeatureplaneError(f"cannot reach Kafka at {bootstrap}: {exc}") from None
    wanted: dict[str, int] = {}
    for topic in catalog.topics:
        n = existing.get(topic, options.topic_partitions)
        if topic not in existing and kind == "ingest":
            log.warning("event topic %s does not exist; creating it with %d partitions", topic, n)
            wanted[topic] = n
        wanted[retry_topic(topic)] = n
        wanted[dlq_topic(topic)] = n
    try:
        ensure_topics(bootstrap, wanted)
    except KafkaException as exc:
        raise FeatureplaneError(f"cannot create topics on {bootstrap}: {exc}") from None


def _ingest_message(m: KafkaMessage, tracker: OffsetTracker) -> Message:
    topic, part, off = tracker.topic, tracker.partition, m.offset() or 0
    return Message(
        topic,
        part,
        off,
        m.key(),
        m.value(),
        Origin(topic, part, off),
        produced_ms=m.timestamp()[1],
        tracker=tracker,
    )


def _retry_message(m: KafkaMessage, tracker: OffsetTracker) -> Message:
    off = m.offset() or 0
    h = parse_retry_headers(_header_pairs(m.headers()), tracker.topic, tracker.partition, off)
    ts = m.timestamp()[1]
    return Message(
        h.topic,
        tracker.partition,
        off,
        m.key(),
        m.value(),
        h.origin,
        h.attempt,
        h.first_failure_ms,
        produced_ms=ts if ts > 0 else wall_clock_ms(),
        cache_only=h.cache_only,
        tracker=tracker,
    )


def _header_pairs(
    raw: dict[str, str | bytes | None] | list[tuple[str, str | bytes | None]] | None,
) -> list[tuple[str, bytes | None]]:
    pairs = list(raw.items()) if isinstance(raw, dict) else list(raw or ())
    return [(k, v.encode() if isinstance(v, str) else v) for k, v in pairs]


@dataclass(frozen=True)
class Built:
    """A dataflow ready to run, and the pipeline whose clients `close()` releases."""

    flow: Dataflow
    pipeline: Pipeline


def build(kind: Kind, settings: Settings, catalog: Catalog, options: FlowOptions) -> Built:
    """The dataflow of `kind` (topics must exist: see `prepare_topics`)."""
    bootstrap = _bootstrap(settings)
    config = PipelineConfig(
        flow=kind,
        retry_budget_ms=options.retry_budget,
        chunk_items=options.chunk_items,
        write_timeout_s=options.write_timeout / 1000,
    )
    pipeline = Pipeline(settings, catalog, config)
    if kind == "ingest":
        group, topics, convert = settings.kafka_group, list(catalog.topics), _ingest_message
    else:
        group = options.retry_group or f"{settings.kafka_group}-retry"
        topics, convert = [retry_topic(t) for t in catalog.topics], _retry_message
    backoff = Backoff(options.backoff_base, options.backoff_cap)

    def partition(worker: int, workers: int) -> GroupPartition:
        consumer = GroupConsumer(
            bootstrap,
            group,
            topics,
            convert,
            flow=kind,
            config={
                "client.id": f"featureplane-{kind}-{worker}",
                "session.timeout.ms": options.session_timeout,
            },
        )
        log.info(
            "%s worker %d/%d: reading %s as group %s",
            kind,
            worker + 1,
            workers,
            ", ".join(topics),
            group,
        )
        hold = RetryHold(backoff, wall_clock_ms) if kind == "retry" else None
        return GroupPartition(
            consumer,
            STOP,
            batch_size=options.batch_size,
            commit_interval_s=options.commit_interval / 1000,
            drain_timeout_s=options.drain_timeout / 1000,
            hold=hold,
        )

    flow = Dataflow(f"featureplane_{kind}")
    s = op.input("kafka", flow, GroupSource(partition))
    b = op.flat_map_batch("batch", s, pipeline.to_batch)
    b = op.map("decode", b, pipeline.decode)
    b = op.map("dispatch", b, pipeline.dispatch)
    b = op.map("aggregate", b, pipeline.aggregate)
    b = op.map("write", b, pipeline.write)
    b = op.map("route", b, pipeline.route)
    op.inspect("ack", b, lambda _step, batch: pipeline.ack(batch))
    return Built(flow, pipeline)


def run(kind: Kind, settings: Settings, catalog: Catalog, options: FlowOptions) -> int:
    """Run a dataflow in this process until SIGTERM; 0 after a graceful stop.

    A SIGTERM during start-up (STOP set) ends it at the next step, also 0:
    nothing was read yet, so nothing needs committing.
    """
    bootstrap = _bootstrap(settings)
    install_signal_handlers()
    lifecycle.check_kafka_reachable(bootstrap)
    metrics.serve_metrics(_metrics_port(kind, settings), settings.metrics_host, kind)
    if STOP.is_set():
        return _stopped_early(kind)
    prepare_topics(kind, settings, catalog, options)
    if STOP.is_set():
        return _stopped_early(kind)
    from bytewax.run import cli_main

    built = build(kind, settings, catalog, options)
    _quiet_gc()
    started = time.monotonic()
    try:
        cli_main(built.flow, workers_per_process=options.workers)  # type: ignore[no-untyped-call]
    finally:
        built.pipeline.close()
    log.info("%s: stopped after %.1fs", kind, time.monotonic() - started)
    return 0


def _metrics_port(kind: Kind, settings: Settings) -> int:
    """The port set by flag or variable, else this flow's own default (ingest and retry differ)."""
    if "metrics_port" in settings.model_fields_set:
        return settings.metrics_port
    return METRICS_PORTS[kind]


def _stopped_early(kind: Kind) -> int:
    log.info("%s: stopped during start-up, before reading anything", kind)
    return 0


def _quiet_gc() -> None:
    """Freeze start-up objects and make collections rare (process-wide: entry points only).

    A batch allocates ~10 objects a record (works, events, items, payload dicts), so the
    default thresholds ran young collections every few hundred records and full ones
    over every module, client and catalog object. Those live for good: frozen, no full
    collection walks them again. Cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 50)


_BUILT: dict[Kind, Built] = {}


def module_flow(kind: Kind) -> Dataflow:
    """The flow for `python -m bytewax.run flows.<kind>:flow`, built once from the environment."""
    if kind not in _BUILT:
        from featureplane.spec import load_catalog

        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)-5s %(name)s: %(message)s"
        )
        settings, options = Settings(), FlowOptions()
        catalog = load_catalog(settings.spec)
        install_signal_handlers()
        lifecycle.check_kafka_reachable(_bootstrap(settings))
        metrics.serve_metrics(_metrics_port(kind, settings), settings.metrics_host, kind)
        prepare_topics(kind, settings, catalog, options)
        built = _BUILT[kind] = build(kind, settings, catalog, options)
        atexit.register(built.pipeline.close)
        _quiet_gc()
    return _BUILT[kind].flow
