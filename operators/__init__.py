"""Stream ingestion operators: plain functions and small classes, engine-agnostic.

The Bytewax layer (`flows/`) only wires these together and builds what they
use (metrics, each worker thread's clients), passing it in:

    kafka.GroupConsumer ─> decode ─> dispatch ─> aggregate ─> write ─> route ─> ack
         (commit.OffsetTracker per partition commits the contiguous acknowledged offsets)

`pipeline` runs those steps over batches; `records` holds the frozen records
that travel between them. `write.Writer` is the one write path of every job
(ingest, retry, backfill, load), following the rules of `policy`; `route`
decides where a failed record goes and `handoff` delivers it to the retry or
DLQ topic. `metrics` holds the Prometheus collectors in a registry of their
own, `retry` the backoff hold of the retry dataflow.
"""

__all__: list[str] = []
