"""Builds and runs the ingest and retry dataflows (the thin Bytewax layer).

    kafka (GroupSource) -> batch -> prepare (decode, dispatch, aggregate) -> write -> route -> ack

The write step is `Pipeline.write_behind`: it starts a batch's writes and passes on the
batch before it, written, so the store and Redis work while the next batch is read and
prepared; the source calls `Pipeline.flush` when it reads nothing new.

Both flows share every step; they differ in what they read (event topics,
or `<topic>.retry` with a backoff hold) and in their consumer group.

This layer builds what the steps use and passes it in: the process's
`IngestMetrics` (made once, served on the metrics port) and the factory each
worker thread calls for its own clients (`worker_factory`: event loop, store,
Redis tier, producer), since Bytewax runs every worker in a thread of its own.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from confluent_kafka import KafkaException
from confluent_kafka import Message as KafkaMessage
from prometheus_client import REGISTRY, CollectorRegistry, Metric
from prometheus_client.registry import Collector

from featureplane import lifecycle
from featureplane.errors import FeatureplaneError, SpecError
from featureplane.flows.options import METRICS_PORTS, FlowOptions
from featureplane.flows.source import GroupPartition, GroupSource
from featureplane.operators.commit import OffsetTracker
from featureplane.operators.kafka import Deliverer, GroupConsumer
from featureplane.operators.kafka_cluster import (
    KafkaCluster,
    ensure_topics,
    max_message_bytes,
    topic_partitions,
)
from featureplane.operators.metrics import IngestMetrics, serve_metrics
from featureplane.operators.pipeline import Pipeline, PipelineConfig, Worker
from featureplane.operators.policy import ToRetryTopic
from featureplane.operators.records import Message, Origin
from featureplane.operators.retry import Backoff, RetryHold
from featureplane.operators.route import dlq_topic, parse_retry_headers, retry_topic
from featureplane.operators.write import Writer
from featureplane.settings import Settings
from featureplane.spec import Catalog
from featureplane.stores import open_cache, open_store
from featureplane.stores.base import wall_clock_ms

__all__ = [
    "Built",
    "build",
    "module_flow",
    "prepare_topics",
    "process_metrics",
    "run",
    "worker_factory",
]

log = logging.getLogger(__name__)

Kind = Literal["ingest", "retry"]


def _bootstrap(settings: Settings) -> str:
    if not settings.kafka_bootstrap:
        raise FeatureplaneError(
            "no Kafka broker: set FEATUREPLANE_KAFKA_BOOTSTRAP or pass --bootstrap HOST:PORT"
        )
    return settings.kafka_bootstrap


def _cluster(settings: Settings) -> KafkaCluster:
    return KafkaCluster(_bootstrap(settings), settings.kafka_config)


def prepare_topics(kind: Kind, settings: Settings, catalog: Catalog, options: FlowOptions) -> None:
    """Create the topics the flow needs if missing: event, retry and DLQ topics."""
    kafka = _cluster(settings)
    if not catalog.topics:
        raise FeatureplaneError(
            f"the spec at {settings.spec} has no ingestion rules: nothing to read"
        )
    try:
        existing = topic_partitions(kafka)
    except KafkaException as exc:
        raise FeatureplaneError(f"cannot reach Kafka at {kafka}: {exc}") from None
    wanted: dict[str, int] = {}
    for topic in catalog.topics:
        n = existing.get(topic, options.topic_partitions)
        if topic not in existing and kind == "ingest":
            log.warning("event topic %s does not exist; creating it with %d partitions", topic, n)
            wanted[topic] = n
        wanted[retry_topic(topic)] = n
        wanted[dlq_topic(topic)] = n
    try:
        ensure_topics(kafka, wanted)
    except KafkaException as exc:
        raise FeatureplaneError(f"cannot create topics on {kafka}: {exc}") from None


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


def process_metrics() -> IngestMetrics:
    """The metrics a dataflow process serves: the ingest collectors, in a registry of
    their own, beside everything in Prometheus's default registry (the process, platform
    and GC collectors, and module-level ones such as the embedded store's)."""
    registry = CollectorRegistry()
    registry.register(_DefaultRegistry())
    return IngestMetrics(registry)


class _DefaultRegistry(Collector):
    """Prometheus's default registry as one collector of another registry."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def worker_factory(
    settings: Settings, catalog: Catalog, config: PipelineConfig, metrics: IngestMetrics
) -> Callable[[], Worker]:
    """What a worker thread calls for its own clients: an event loop, the store (started
    now, so a bad store fails fast), the Redis tier (started on first write) and a
    producer for the retry and DLQ topics sized to what the broker takes."""
    kafka = _cluster(settings)
    outgoing = [f(t) for t in catalog.topics for f in (retry_topic, dlq_topic)]

    def open_worker() -> Worker:
        loop = asyncio.new_event_loop()
        writer = Writer(
            catalog,
            open_store(settings, catalog),
            open_cache(settings, catalog),
            policy=ToRetryTopic(),
            metrics=metrics,
            flow=config.flow,
            chunk_items=config.chunk_items,
            timeout_s=config.write_timeout_s,
        )
        try:
            loop.run_until_complete(writer.start())
        except BaseException:
            loop.close()
            raise
        limit = max_message_bytes(kafka, outgoing)
        return Worker(loop, writer, Deliverer(kafka, max_message_bytes=limit))

    return open_worker


@dataclass(frozen=True)
class Built:
    """A dataflow ready to run, and the pipeline whose clients `close()` releases."""

    flow: Dataflow
    pipeline: Pipeline


def build(
    kind: Kind,
    settings: Settings,
    catalog: Catalog,
    options: FlowOptions,
    metrics: IngestMetrics,
) -> Built:
    """The dataflow of `kind` (topics must exist: see `prepare_topics`)."""
    kafka = _cluster(settings)
    config = PipelineConfig(
        flow=kind,
        retry_budget_ms=options.retry_budget,
        chunk_items=options.chunk_items,
        write_timeout_s=options.write_timeout / 1000,
    )
    pipeline = Pipeline(
        catalog, config, metrics, worker_factory(settings, catalog, config, metrics)
    )
    if kind == "ingest":
        group, topics, convert = settings.kafka_group, list(catalog.topics), _ingest_message
    else:
        group = options.retry_group or f"{settings.kafka_group}-retry"
        topics, convert = [retry_topic(t) for t in catalog.topics], _retry_message
    metrics.initialize(kind, topics, catalog.topics)
    backoff = Backoff(options.backoff_base, options.backoff_cap)

    def partition(worker: int, workers: int) -> GroupPartition:
        consumer = GroupConsumer(
            kafka,
            group,
            topics,
            convert,
            flow=kind,
            metrics=metrics,
            config={
                "client.id": f"featureplane-{kind}-{worker}",
                "session.timeout.ms": options.session_timeout,
            },
        )
        log.info(
            "%s worker %d/%d: reading %s as group %s from %s",
            kind,
            worker + 1,
            workers,
            ", ".join(topics),
            group,
            kafka,
        )
        hold = RetryHold(backoff, wall_clock_ms) if kind == "retry" else None
        return GroupPartition(
            consumer,
            lifecycle.STOP,
            batch_size=options.batch_size,
            commit_interval_s=options.commit_interval / 1000,
            drain_timeout_s=options.drain_timeout / 1000,
            hold=hold,
            on_idle=pipeline.flush,
        )

    flow = Dataflow(f"featureplane_{kind}")
    s = op.input("kafka", flow, GroupSource(partition))
    b = op.flat_map_batch("batch", s, pipeline.to_batch)
    b = op.map("prepare", b, pipeline.prepare)  # decode -> dispatch -> aggregate
    b = op.map("write", b, pipeline.write_behind)  # returns the batch written before
    b = op.map("route", b, pipeline.route)
    op.inspect("ack", b, lambda _step, batch: pipeline.ack(batch))
    return Built(flow, pipeline)


def run(kind: Kind, settings: Settings, catalog: Catalog, options: FlowOptions) -> int:
    """Run a dataflow in this process until SIGTERM; 0 after a graceful stop.

    A SIGTERM during start-up (`lifecycle.STOP` set) ends it at the next step, also 0:
    nothing was read yet, so nothing needs committing.
    """
    metrics = _prepare(kind, settings, catalog, options)
    if lifecycle.STOP.is_set():
        log.info("%s: stopped during start-up, before reading anything", kind)
        return 0
    from bytewax.run import cli_main

    built = build(kind, settings, catalog, options, metrics)
    _quiet_gc()
    started = time.monotonic()
    try:
        cli_main(built.flow, workers_per_process=options.workers)  # type: ignore[no-untyped-call]
    finally:
        built.pipeline.close()
    log.info("%s: stopped after %.1fs", kind, time.monotonic() - started)
    return 0


def _prepare(
    kind: Kind, settings: Settings, catalog: Catalog, options: FlowOptions
) -> IngestMetrics:
    """Before the flow: signal handlers, the broker check, this process's metrics (made
    and served here, once), then the topics unless a SIGTERM came meanwhile."""
    bootstrap = _bootstrap(settings)
    lifecycle.install_stop_handlers()
    lifecycle.check_kafka_reachable(bootstrap)
    metrics = process_metrics()
    serve_metrics(metrics, _metrics_port(kind, settings), settings.metrics_host, kind)
    if not lifecycle.STOP.is_set():
        prepare_topics(kind, settings, catalog, options)
    return metrics


def _metrics_port(kind: Kind, settings: Settings) -> int:
    """The port set by flag or variable, else this flow's own default (ingest and retry differ)."""
    if "metrics_port" in settings.model_fields_set:
        return settings.metrics_port
    return METRICS_PORTS[kind]


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


def module_flow(kind: Kind) -> Dataflow:
    """The flow for `python -m bytewax.run`, built from the FEATUREPLANE_* variables.

    Bytewax's runner looks the flow up once a process and then owns the run, so
    nothing here keeps it: the pipeline's clients are closed at exit (`atexit` is
    the one hook left once the runner returns). A SIGTERM during start-up gives a flow
    whose sources end at once (`lifecycle.STOP` is set).
    """
    from featureplane.spec import load_catalog

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)-5s %(name)s: %(message)s"
    )
    settings, options = Settings(), FlowOptions()
    try:
        catalog = load_catalog(settings.spec)
        metrics = _prepare(kind, settings, catalog, options)
        built = build(kind, settings, catalog, options, metrics)
    except SpecError as exc:  # a user's mistake: its lines, not a traceback from the runner
        print(exc, file=sys.stderr)
        raise SystemExit(1) from None
    except FeatureplaneError as exc:
        print(f"featureplane: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    atexit.register(built.pipeline.close)
    _quiet_gc()
    return built.flow
