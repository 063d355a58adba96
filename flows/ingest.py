"""The entry of the stream ingestion dataflow: `featureplane ingest`, and cluster mode.

`run` runs the dataflow (built in `featureplane.flows.dataflow`) in this
process until SIGTERM. `flow` builds the same dataflow from FEATUREPLANE_*
variables for Bytewax's own runner, which calls it:

    python -m bytewax.run "featureplane.flows.ingest:flow()" -w WORKERS [-i ID -a ADDRS]
"""

from __future__ import annotations

from bytewax.dataflow import Dataflow

from featureplane.flows import dataflow
from featureplane.flows.options import FlowOptions
from featureplane.settings import Settings
from featureplane.spec import Catalog

__all__ = ["flow", "run"]


def run(settings: Settings, catalog: Catalog, options: FlowOptions) -> int:
    """Run the ingest dataflow in this process until SIGTERM; 0 after a graceful stop."""
    return dataflow.run("ingest", settings, catalog, options)


def flow() -> Dataflow:
    """The ingest dataflow built from FEATUREPLANE_* variables, for `bytewax.run`.

    It checks the broker, serves metrics and creates missing topics first, as `run` does.
    """
    return dataflow.module_flow("ingest")
