"""Prometheus metrics of the ingest and retry dataflows, in a registry of their own.

`IngestMetrics` holds the collectors; a dataflow process makes one at start-up
and passes it to the steps, the consumers and the writers, so two pipelines
in one process (tests) never collide in a global registry. Every metric has
a `flow` label (`ingest` or `retry`). `serve_metrics` serves the registry
on `FEATUREPLANE_METRICS_PORT` (0 picks a free port; a taken port is a
start-up error) and `FEATUREPLANE_METRICS_HOST`.
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from featureplane.lifecycle import cannot_listen

__all__ = ["BulkHistogram", "IngestMetrics", "serve_metrics"]

log = logging.getLogger(__name__)

_WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_FRESHNESS_BUCKETS = (
    *(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75),
    *(1, 1.5, 2, 3, 5, 10, 30, 60, 300, 3600),
)


_FAILURE_REASONS = ("malformed", "transient", "store_error", "timeout", "cache", "delivery")
"""The `reason` label values of `featureplane_ingest_failures_total`."""
_STEPS = ("decode", "dispatch", "aggregate", "write")
"""The `step` label values of `featureplane_ingest_internal_errors_total`."""


class IngestMetrics:
    """The collectors of one dataflow process (or one test), registered in `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        self.records_in = Counter(
            "featureplane_ingest_records",
            "Kafka records read, by topic",
            ["flow", "topic"],
            registry=r,
        )
        self.items_written = Counter(
            "featureplane_ingest_items_written",
            "Items written, by feature group and tier (store; redis: handed to write_through)",
            ["flow", "group", "tier"],
            registry=r,
        )
        self.failures = Counter(
            "featureplane_ingest_failures",
            "Records that failed, by reason class (malformed, transient, store_error, timeout, "
            "cache: only the Redis write failed, delivery)",
            ["flow", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "featureplane_ingest_retry",
            "Records sent to <topic>.retry, by event topic",
            ["flow", "topic"],
            registry=r,
        )
        self.dlq = Counter(
            "featureplane_ingest_dlq",
            "Records sent to <topic>.dlq, by event topic",
            ["flow", "topic"],
            registry=r,
        )
        self.dlq_truncated = Counter(
            "featureplane_ingest_dlq_truncated",
            "Records sent to <topic>.dlq cut to the broker's message size, by event topic",
            ["flow", "topic"],
            registry=r,
        )
        self.cache_abandoned = Counter(
            "featureplane_ingest_cache_abandoned",
            "Redis writes given up when the retry budget ran out (the store has the items), "
            "by topic",
            ["flow", "topic"],
            registry=r,
        )
        self.internal_errors = Counter(
            "featureplane_ingest_internal_errors",
            "Records a step raised on unexpectedly (decode, dispatch, aggregate: to the DLQ; "
            "write: to retry), by step",
            ["flow", "step"],
            registry=r,
        )
        self.invalidations = Counter(
            "featureplane_invalidations_published",
            "Invalidation messages for serving's local tiers, by outcome (ok, failed: not "
            "sent, serving keeps old values until their soft TTL)",
            ["flow", "outcome"],
            registry=r,
        )
        self.committed_offset = Gauge(
            "featureplane_ingest_committed_offset",
            "Last committed offset (next to read), by topic-partition",
            ["flow", "topic", "partition"],
            registry=r,
        )
        self.lag = Gauge(
            "featureplane_ingest_lag",
            "High watermark minus committed offset, by topic-partition",
            ["flow", "topic", "partition"],
            registry=r,
        )
        self.batch_write_seconds = Histogram(
            "featureplane_ingest_batch_write_seconds",
            "Wall time of one batch's concurrent writes",
            ["flow"],
            buckets=_WRITE_BUCKETS,
            registry=r,
        )
        self.freshness_seconds = BulkHistogram(
            "featureplane_ingest_freshness_seconds",
            "Write time minus event ts, by feature group",
            ["flow", "group"],
            _FRESHNESS_BUCKETS,
            registry=r,
        )

    def initialize(
        self, flow: str, read_topics: Iterable[str], event_topics: Iterable[str]
    ) -> None:
        """Create at zero the counters `flow` will count, before any record is read.

        A counter that appears at its first increment is no increase to `rate()` or
        `increase()`: the first dead letter would never fire an alert. `read_topics` are
        the topics the flow consumes (event topics, or their retry topics), `event_topics`
        the event topics that the DLQ and retry counters name.
        """
        for topic in read_topics:
            self.records_in.labels(flow, topic)
        for topic in event_topics:
            for counter in (self.retries, self.dlq, self.dlq_truncated, self.cache_abandoned):
                counter.labels(flow, topic)
        for reason in _FAILURE_REASONS:
            self.failures.labels(flow, reason)
        for step in _STEPS:
            self.internal_errors.labels(flow, step)
        self.batch_write_seconds.labels(flow)
        for outcome in ("ok", "failed"):
            self.invalidations.labels(flow, outcome)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample's value (`name` as exposed, e.g. `..._total`), None when absent."""
        return self.registry.get_sample_value(name, labels or {})


class BulkHistogram(Collector):
    """A Prometheus histogram (`<name>_bucket`, `_count`, `_sum`) observed a batch at a time.

    `prometheus_client`'s `Histogram` takes a lock and walks its buckets in Python on every
    observation (~1.5 us); ingestion observes the freshness of every item it writes, 2-3 an
    event, so that was a few percent of an event's cost. Here one call takes a batch of
    values of one label set: one lock, one bisect a value.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.bounds = sorted(float(b) for b in buckets)
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        """labels -> (count of each bucket and of +Inf, not cumulative; [sum])"""
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def observe_many(self, labels: Sequence[str], values: Sequence[float]) -> None:
        """Observe each of `values` under `labels` (one value a label name)."""
        if not values:
            return
        bounds = self.bounds
        key = tuple(labels)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = ([0] * (len(bounds) + 1), [0.0])
            counts = series[0]
            for v in values:
                counts[bisect_left(bounds, v)] += 1  # the first bound >= v: le is inclusive
            series[1][0] += sum(values)

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            series = [(k, list(c), s[0]) for k, (c, s) in self._series.items()]
        les: list[str] = [floatToGoString(b) for b in self.bounds]  # type: ignore[no-untyped-call]
        les.append("+Inf")
        for key, counts, total in series:
            cumulative, buckets = 0, []
            for le, n in zip(les, counts, strict=True):
                cumulative += n
                buckets.append((le, float(cumulative)))
            family.add_metric(list(key), buckets, total)
        return [family]


def serve_metrics(
    metrics: IngestMetrics,
    port: int,
    host: str = "0.0.0.0",  # noqa: S104 - scraped by Prometheus from outside the pod
    flow: str = "dataflow",
) -> int:
    """Serve /metrics of `metrics` on host:port (port 0: a free one) and return the port.

    A port that is taken is a StartupError naming it and the setting that
    changes it: a dataflow running without its metrics would be invisible.
    """
    try:
        server, _ = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        what = f"Prometheus metrics of {flow}"
        change = "--metrics-port or FEATUREPLANE_METRICS_PORT (0 = any free port)"
        raise cannot_listen(host, port, what, change, exc) from None
    bound = int(server.server_port)
    log.info("metrics: serving Prometheus metrics on %s:%d/metrics", host, bound)
    return bound
