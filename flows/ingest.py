"""Stream ingestion: read the event topics that the spec's ingestion rules name,
from the consumer group's committed offsets, and write every feature group
they feed.

Each record is decoded and validated, dispatched to every rule it matches
(event_type and `where`), turned into items by the rule's group, and
written to the store (and, for `write: through` groups, the Redis tier)
batch by batch with concurrent I/O. Offsets are committed only when a
record's items are written, or the record is confirmed delivered to
<topic>.dlq (malformed: bad JSON, missing field, wrong type, over 8 KiB;
a copy larger than the broker's max.message.bytes is cut, with headers
truncated=true and original_size) or <topic>.retry (transient store
failure, or tiers=redis when only the Redis write failed; see `featureplane
retry`). A record a step fails on affects only itself, never its batch. The
retry and DLQ topics (and missing event topics) are created at start.
SIGTERM stops reading, finishes writes in flight, commits and exits 0 (a
SIGTERM during start-up too). A broker that does not answer, or a metrics
port that is taken, stops the start with one line saying what to change.
Metrics are served on FEATUREPLANE_METRICS_PORT [9100; retry's is 9101]
(0 picks a free port). Scale out by starting more processes in the same
FEATUREPLANE_KAFKA_GROUP: they share the topics' partitions, and a process
that dies has its partitions moved to the others after the session timeout.

Cluster mode: python -m bytewax.run flows.ingest:flow -w WORKERS [-i ID -a ADDRS]
reads the same FEATUREPLANE_* variables.
"""

from __future__ import annotations

import argparse
from typing import Any

from featureplane.cli import load_spec, settings_from
from featureplane.flows import dataflow
from featureplane.flows.options import add_arguments_of, options_from

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_arguments_of("ingest", p)


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    return dataflow.run("ingest", settings, load_spec(settings), options_from(args))


def __getattr__(name: str) -> Any:
    if name == "flow":
        return dataflow.module_flow("ingest")
    raise AttributeError(name)
