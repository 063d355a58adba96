"""Stream ingestion operators: plain functions and small classes, engine-agnostic.

The Bytewax layer (`flows/`) only wires these together:

    kafka.GroupConsumer ─> decode ─> dispatch ─> aggregate ─> write ─> route ─> ack
         (commit.OffsetTracker per partition commits the contiguous acknowledged offsets)

`records` holds the frozen records that travel between the steps, `metrics`
the Prometheus metrics, `retry` the backoff hold of the retry dataflow.
"""

__all__: list[str] = []
