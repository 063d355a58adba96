"""featureplane: a self-hosted real-time feature platform for recommender systems.

This package is the core that ingestion, serving and batch share: the spec
model, keys, the item codec, errors, settings and the store backends. It
imports none of the parts built on it (cli, flows, operators, serving, batch).
"""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    # Written once, in pyproject.toml; the installed metadata carries it here.
    __version__ = version("featureplane")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
