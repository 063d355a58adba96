"""Prometheus metrics of the ingest and retry dataflows.

Every metric has a `flow` label (`ingest` or `retry`). Served by
`serve_metrics(port, host)` on `FEATUREPLANE_METRICS_PORT` (0 picks a free
port; a taken port is a start-up error) and `FEATUREPLANE_METRICS_HOST`.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from featureplane.lifecycle import cannot_listen

__all__ = [
    "BATCH_WRITE_SECONDS",
    "CACHE_ABANDONED",
    "COMMITTED_OFFSET",
    "DLQ",
    "DLQ_TRUNCATED",
    "FAILURES",
    "FRESHNESS_SECONDS",
    "INTERNAL_ERRORS",
    "ITEMS_WRITTEN",
    "LAG",
    "RECORDS_IN",
    "RETRIES",
    "serve_metrics",
]

log = logging.getLogger(__name__)

RECORDS_IN = Counter(
    "featureplane_ingest_records", "Kafka records read, by topic", ["flow", "topic"]
)
ITEMS_WRITTEN = Counter(
    "featureplane_ingest_items_written",
    "Items written, by feature group and tier (store; redis: handed to write_through)",
    ["flow", "group", "tier"],
)
FAILURES = Counter(
    "featureplane_ingest_failures",
    "Records that failed, by reason class (malformed, transient, store_error, timeout, "
    "cache: only the Redis write failed, delivery)",
    ["flow", "reason"],
)
RETRIES = Counter(
    "featureplane_ingest_retry", "Records sent to <topic>.retry, by event topic", ["flow", "topic"]
)
DLQ = Counter(
    "featureplane_ingest_dlq", "Records sent to <topic>.dlq, by event topic", ["flow", "topic"]
)
DLQ_TRUNCATED = Counter(
    "featureplane_ingest_dlq_truncated",
    "Records sent to <topic>.dlq cut to the broker's message size, by event topic",
    ["flow", "topic"],
)
CACHE_ABANDONED = Counter(
    "featureplane_ingest_cache_abandoned",
    "Redis writes given up when the retry budget ran out (the store has the items), by topic",
    ["flow", "topic"],
)
INTERNAL_ERRORS = Counter(
    "featureplane_ingest_internal_errors",
    "Records a step raised on unexpectedly (decode, dispatch, aggregate: to the DLQ; "
    "write: to retry), by step",
    ["flow", "step"],
)
COMMITTED_OFFSET = Gauge(
    "featureplane_ingest_committed_offset",
    "Last committed offset (next to read), by topic-partition",
    ["flow", "topic", "partition"],
)
LAG = Gauge(
    "featureplane_ingest_lag",
    "High watermark minus committed offset, by topic-partition",
    ["flow", "topic", "partition"],
)
BATCH_WRITE_SECONDS = Histogram(
    "featureplane_ingest_batch_write_seconds",
    "Wall time of one batch's concurrent writes",
    ["flow"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
FRESHNESS_SECONDS = Histogram(
    "featureplane_ingest_freshness_seconds",
    "Write time minus event ts, by feature group",
    ["flow", "group"],
    buckets=(
        0.005,
        0.01,
        0.02,
        0.03,
        0.05,
        0.075,
        0.1,
        0.15,
        0.2,
        0.3,
        0.5,
        0.75,
        1,
        1.5,
        2,
        3,
        5,
        10,
        30,
        60,
        300,
        3600,
    ),
)


def serve_metrics(port: int, host: str = "0.0.0.0", flow: str = "dataflow") -> int:  # noqa: S104
    """Serve /metrics on host:port (port 0: a free one) and return the port.

    A port that is taken is a StartupError naming it and the setting that
    changes it: a dataflow running without its metrics would be invisible.
    """
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as exc:
        what = f"Prometheus metrics of {flow}"
        change = "--metrics-port or FEATUREPLANE_METRICS_PORT (0 = any free port)"
        raise cannot_listen(host, port, what, change, exc) from None
    bound = int(server.server_port)
    log.info("metrics: serving Prometheus metrics on %s:%d/metrics", host, bound)
    return bound
