"""Tuning options of the ingest and retry dataflows, from flags or FEATUREPLANE_* variables.

These add to `featureplane.settings.Settings` (where the broker, store and
Redis are); like it, a flag wins over a variable.
"""

from __future__ import annotations

import argparse
from typing import Annotated

from pydantic import Field, PlainValidator
from pydantic_settings import BaseSettings, SettingsConfigDict

from featureplane.cli import add_kafka_options, add_spec_option, add_store_options
from featureplane.spec import parse_duration

__all__ = [
    "METRICS_PORTS",
    "FlowOptions",
    "add_arguments_of",
    "add_flow_options",
    "add_retry_options",
    "options_from",
]

METRICS_PORTS = {"ingest": 9100, "retry": 9101}
"""Metrics port of each dataflow when FEATUREPLANE_METRICS_PORT is unset."""


def _ms(value: object) -> int:
    return (
        value if isinstance(value, int) and not isinstance(value, bool) else parse_duration(value)
    )


Millis = Annotated[int, PlainValidator(_ms)]


class FlowOptions(BaseSettings):
    """How a dataflow reads, batches, writes and retries."""

    model_config = SettingsConfigDict(env_prefix="FEATUREPLANE_", extra="ignore", frozen=True)

    workers: int = Field(1, ge=1, le=64)
    """Worker threads in this process (each with its own consumer in the group)."""
    batch_size: int = Field(2000, ge=1, le=100_000)
    """Most records read and written as one batch."""
    chunk_items: int = Field(10_000, ge=1, le=100_000)
    """Items per concurrent store write within a batch."""
    commit_interval: Millis = 1000
    """How often acknowledged offsets are committed (also on rebalance and shutdown)."""
    write_timeout: Millis = 10_000
    """A batch write slower than this is a transient failure."""
    drain_timeout: Millis = 30_000
    """On SIGTERM, how long to wait for in-flight records before committing and exiting."""
    session_timeout: Millis = 10_000
    """Kafka consumer session timeout: how soon a dead member's partitions move on."""
    topic_partitions: int = Field(4, ge=1, le=10_000)
    """Partitions of an event topic created because it was missing."""
    retry_budget: Millis = 3_600_000
    """How long after its first failure a record is retried before <topic>.dlq (a record
    whose store write succeeded and only its Redis write failed is never sent there: its
    cache write is abandoned and counted)."""
    backoff_base: Millis = 1000
    """Retry n waits a random time up to min(cap, base * 2**(n-1)) after its failure."""
    backoff_cap: Millis = 60_000
    """Longest retry wait."""
    retry_group: str | None = None
    """Consumer group of the retry dataflow [<kafka group>-retry]."""


def add_arguments_of(kind: str, p: argparse.ArgumentParser) -> None:
    """Every flag of `featureplane ingest` (kind "ingest") or `featureplane retry`."""
    add_spec_option(p)
    add_kafka_options(p)
    add_store_options(p)
    p.add_argument(
        "--metrics-port",
        type=int,
        help="Prometheus port; 0 picks a free one; a taken port stops the start "
        f"[FEATUREPLANE_METRICS_PORT, {METRICS_PORTS[kind]}; ingest and retry "
        "differ so both run on one host]",
    )
    p.add_argument(
        "--metrics-host",
        help="address the metrics listen on [FEATUREPLANE_METRICS_HOST, 0.0.0.0]",
    )
    add_flow_options(p)
    if kind == "retry":
        add_retry_options(p)


def add_flow_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataflow")
    g.add_argument(
        "--workers",
        type=int,
        help="worker threads, each a consumer in the group "
        "[FEATUREPLANE_WORKERS, 1]; scale out by running more processes",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        help="most records read and written as one batch [FEATUREPLANE_BATCH_SIZE, 2000]",
    )
    g.add_argument(
        "--chunk-items",
        type=int,
        help="items per concurrent store write [FEATUREPLANE_CHUNK_ITEMS, 10000]",
    )
    g.add_argument(
        "--commit-interval",
        help="how often acknowledged offsets are committed, "
        "e.g. 1s [FEATUREPLANE_COMMIT_INTERVAL, 1s]",
    )
    g.add_argument(
        "--write-timeout",
        help="a write slower than this goes to the retry topic [FEATUREPLANE_WRITE_TIMEOUT, 10s]",
    )
    g.add_argument(
        "--drain-timeout",
        help="on SIGTERM, the longest wait for writes in flight "
        "before committing and exiting [FEATUREPLANE_DRAIN_TIMEOUT, 30s]",
    )
    g.add_argument(
        "--session-timeout",
        help="Kafka consumer session timeout: how soon a dead member's partitions are "
        "reassigned [FEATUREPLANE_SESSION_TIMEOUT, 10s]",
    )
    g.add_argument(
        "--topic-partitions",
        type=int,
        help="partitions of a missing topic when it "
        "is created [FEATUREPLANE_TOPIC_PARTITIONS, 4]; retry and DLQ topics copy "
        "their event topic's count",
    )


def add_retry_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("retry")
    g.add_argument(
        "--retry-budget",
        help="how long after its first failure a record is retried, with capped "
        "exponential backoff, before it goes to <topic>.dlq, e.g. 1h; a record whose "
        "Redis write alone failed never goes there (its cache write is abandoned and "
        "counted) [FEATUREPLANE_RETRY_BUDGET, 1h]",
    )
    g.add_argument(
        "--backoff-base",
        help="retry n waits a random time up to "
        "min(cap, base * 2**(n-1)) [FEATUREPLANE_BACKOFF_BASE, 1s]",
    )
    g.add_argument("--backoff-cap", help="longest retry wait [FEATUREPLANE_BACKOFF_CAP, 60s]")
    g.add_argument(
        "--retry-group",
        help="consumer group of the retry dataflow [FEATUREPLANE_RETRY_GROUP, <kafka group>-retry]",
    )


_FIELDS = tuple(FlowOptions.model_fields)


def options_from(args: argparse.Namespace) -> FlowOptions:
    """Options from the environment, overridden by every flag that was given."""
    given = {k: getattr(args, k) for k in _FIELDS if getattr(args, k, None) is not None}
    return FlowOptions(**given)
