"""The retry dataflow: reprocess records that failed for a transient reason.

Reads <topic>.retry for every event topic of the spec (its own consumer
group, FEATUREPLANE_RETRY_GROUP, default <kafka group>-retry). A record with
header attempt=n waits a random backoff of up to
min(cap, base * 2**(n-1)) from when it was handed over, without holding
back other records, then goes through the same decode, dispatch, aggregate
and write steps as in `featureplane ingest` (a record with header
tiers=redis, whose store write had succeeded, rewrites the Redis tier only).
If it fails again it goes back to <topic>.retry as attempt n+1 until
--retry-budget (FEATUREPLANE_RETRY_BUDGET, default 1h) has passed since its
first failure, then to <topic>.dlq with the reason; a Redis-only record is
never dead-lettered: its cache write is abandoned, logged and counted in
featureplane_ingest_cache_abandoned. Offsets are committed only once a record
is written or handed over with delivery confirmed. SIGTERM stops gracefully.
Metrics are served on FEATUREPLANE_METRICS_PORT [9101, so that ingest's 9100
and retry's do not collide on one host].

Cluster mode: python -m bytewax.run flows.retry:flow reads the same variables.
"""

from __future__ import annotations

import argparse
from typing import Any

from featureplane.cli import load_spec, settings_from
from featureplane.flows import dataflow
from featureplane.flows.options import add_arguments_of, options_from

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_arguments_of("retry", p)


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    return dataflow.run("retry", settings, load_spec(settings), options_from(args))


def __getattr__(name: str) -> Any:
    if name == "flow":
        return dataflow.module_flow("retry")
    raise AttributeError(name)
