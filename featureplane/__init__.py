"""featureplane: a self-hosted real-time feature platform for recommender systems.

This package holds what ingestion, serving and batch share: the spec model,
keys, the item codec, settings and the store backends.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
