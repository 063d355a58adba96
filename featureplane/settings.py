"""Settings shared by every command, read once from FEATUREPLANE_* variables.

Flags override variables: the CLI passes what was given on the command line
to `Settings(**flags)`. CONTRACT section 4 fixes the names and defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Where the spec, broker, store, cache and HTTP server are."""

    model_config = SettingsConfigDict(env_prefix="FEATUREPLANE_", extra="forbid", frozen=True)

    spec: Path = Path("featureplane.yaml")
    """Spec file or folder."""
    kafka_bootstrap: str | None = None
    """Kafka bootstrap servers; unset under `up` starts the embedded broker."""
    kafka_group: str = "featureplane-ingest"
    """Consumer group of the ingest dataflow."""
    store: Literal["embedded", "dynamodb"] = "embedded"
    """The durable store."""
    data_dir: Path = Path(".featureplane")
    """Where the embedded store keeps its files."""
    dynamodb_table: str = "featureplane"
    """DynamoDB table, created if missing."""
    dynamodb_endpoint: str | None = None
    """DynamoDB endpoint URL; unset means AWS (region and credentials from AWS_* variables)."""
    redis_url: SecretStr | None = None
    """redis://... of the Redis tier; unset means no Redis tier."""
    host: str = "127.0.0.1"
    """Serving address."""
    port: int = Field(8000, ge=0, le=65535)
    """Serving port."""
    metrics_port: int = Field(9100, ge=0, le=65535)
    """Prometheus port of a dataflow process (unset: 9100 for ingest, 9101 for retry)."""
    metrics_host: str = "0.0.0.0"  # noqa: S104 - scraped by Prometheus from outside the pod
    """Address the dataflow's metrics listen on (`up` uses 127.0.0.1)."""
    token: SecretStr | None = None
    """Bearer token the HTTP API requires; unset means none."""
