"""Tuning options of the ingest and retry dataflows, from flags or FEATUREPLANE_* variables.

These add to `featureplane.settings.Settings` (where the broker, store and
Redis are); like it, a flag wins over a variable, and each field's docstring
is its flag's help.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from featureplane.settings import Duration

__all__ = ["METRICS_PORTS", "RETRY_FIELDS", "FlowOptions"]

METRICS_PORTS = {"ingest": 9100, "retry": 9101}
"""Metrics port of each dataflow when FEATUREPLANE_METRICS_PORT is unset."""


class FlowOptions(BaseSettings):
    """How a dataflow reads, batches, writes and retries."""

    model_config = SettingsConfigDict(
        env_prefix="FEATUREPLANE_", extra="forbid", frozen=True, use_attribute_docstrings=True
    )

    workers: int = Field(1, ge=1, le=64)
    """Worker threads in this process, each a consumer in the group; scale out by running
    more processes."""
    batch_size: int = Field(2000, ge=1, le=100_000)
    """Most records read and written as one batch."""
    chunk_items: int = Field(10_000, ge=1, le=100_000)
    """Items per concurrent store write within a batch."""
    commit_interval: Duration = 1000
    """How often acknowledged offsets are committed (also on rebalance and shutdown)."""
    write_timeout: Duration = 10_000
    """A batch write slower than this is a transient failure: its records go to the retry
    topic."""
    drain_timeout: Duration = 30_000
    """On SIGTERM, the longest wait for records in flight before committing and exiting."""
    session_timeout: Duration = 10_000
    """Kafka consumer session timeout: how soon a dead member's partitions are reassigned."""
    topic_partitions: int = Field(4, ge=1, le=10_000)
    """Partitions of an event topic created because it was missing; its retry and DLQ
    topics copy their event topic's count."""
    retry_budget: Duration = 3_600_000
    """How long after its first failure a record is retried, with capped exponential
    backoff, before it goes to <topic>.dlq; a record whose Redis write alone failed never
    goes there (its cache write is abandoned and counted)."""
    backoff_base: Duration = 1000
    """Retry n waits a random time up to min(cap, base * 2**(n-1)) after its failure."""
    backoff_cap: Duration = 60_000
    """Longest retry wait."""
    retry_group: str | None = None
    """Consumer group of the retry dataflow; unset means <kafka group>-retry."""


RETRY_FIELDS = ("retry_budget", "backoff_base", "backoff_cap", "retry_group")
"""The options only the retry dataflow reads."""
