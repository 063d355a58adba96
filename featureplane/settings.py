"""Settings shared by every command, and the `Duration` type every settings model uses.

`Settings` says where the spec, broker, store, cache and HTTP server are. It
reads FEATUREPLANE_* variables once, at the entry point; the command line
passes the flags that were given as keyword arguments, so a flag wins over a
variable. Each field's docstring is its description, and the command line's
help for its flag.

A `Duration` is milliseconds, given as a number (`1000`, also as text) or as
a number with a unit (`500ms`, `30s`, `5m`, `2h`, `30d`), the same in every
model, flag and variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Final, Literal

from pydantic import BeforeValidator, Field, SecretStr
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from featureplane.errors import quote
from featureplane.kafka_config import KafkaConfig
from featureplane.spec import parse_duration

__all__ = ["DURATION", "Duration", "Settings", "format_duration", "to_ms"]


def to_ms(value: object) -> object:
    """A duration as milliseconds: an int as is, digits as an int, `30s` and the like parsed.

    Anything else is returned for pydantic to reject with its own message (a float
    with no fraction is accepted as milliseconds, like the int it equals).
    """
    if isinstance(value, bool):  # an int to Python, never a duration to a person
        raise ValueError(f"bad duration {quote(value)}")
    if isinstance(value, str):
        text = value.strip()
        return int(text) if text.isdigit() else parse_duration(text)
    return value


class _DurationMark:
    """Marks a field as a `Duration`, so the command line shows `30s` rather than 30000."""

    def __repr__(self) -> str:
        return "DURATION"


DURATION: Final = _DurationMark()
"""The marker in `Duration`'s metadata (`DURATION in field.metadata`)."""

Duration = Annotated[int, BeforeValidator(to_ms), Field(ge=0), DURATION]
"""Milliseconds: `1000`, `"1000"`, `"1s"`, `"500ms"`, `"5m"`, `"2h"`, `"30d"`."""

_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000))


def format_duration(ms: int) -> str:
    """Milliseconds in the largest unit that divides them: 30000 -> `30s`, 1500 -> `1500ms`."""
    for unit, size in _UNITS:
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


class Settings(BaseSettings):
    """Where the spec, broker, store, cache and HTTP server are."""

    model_config = SettingsConfigDict(
        env_prefix="FEATUREPLANE_",
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        hide_input_in_errors=True,  # a bad value may hold a password
    )

    spec: Path = Path("featureplane.yaml")
    """Spec file or folder."""
    kafka_bootstrap: str | None = None
    """Kafka bootstrap servers, HOST:PORT[,...]; unset under `up` starts the embedded broker."""
    kafka_group: str = "featureplane-ingest"
    """Consumer group of the ingest dataflow."""
    kafka_config: Annotated[KafkaConfig, NoDecode] = KafkaConfig()
    """librdkafka properties added to every Kafka client, as one JSON object: TLS or SASL
    for a production cluster, e.g. {"security.protocol": "SASL_SSL", "sasl.mechanism":
    "SCRAM-SHA-512", "sasl.username": "...", "sasl.password": "..."}. A variable only, never
    a flag, since it holds passwords; the properties featureplane sets itself are refused."""
    store: Literal["embedded", "dynamodb"] = "embedded"
    """The durable store: the embedded one on this machine, or DynamoDB."""
    data_dir: Path = Path(".featureplane")
    """Where the embedded store keeps its files (and `up` its logs)."""
    dynamodb_table: str = "featureplane"
    """DynamoDB table, created if missing."""
    dynamodb_endpoint: str | None = None
    """DynamoDB endpoint URL; unset means AWS."""
    dynamodb_region: str | None = None
    """AWS region of the DynamoDB table; unset leaves it to the AWS SDK (AWS_DEFAULT_REGION,
    the AWS config file), else us-east-1. Credentials always come from the SDK's chain
    (variables, files, the pod's or instance's role)."""
    redis_url: SecretStr | None = None
    """redis://... or rediss://... of the Redis tier; unset means no Redis tier."""
    redis_cluster: bool = False
    """The Redis URL is a node of a Redis Cluster (ElastiCache cluster mode: give its
    configuration endpoint); the client finds the other nodes from it."""
    host: str = "127.0.0.1"
    """Address the HTTP API listens on."""
    port: int = Field(8000, ge=0, le=65535)
    """Port the HTTP API listens on."""
    metrics_port: int = Field(9100, ge=0, le=65535)
    """Prometheus port of a dataflow process; 0 picks a free one; a taken port stops the
    start. Unset, ingest uses 9100 and retry 9101, so both run on one host."""
    metrics_host: str = "0.0.0.0"  # noqa: S104 - scraped by Prometheus from outside the pod
    """Address a dataflow's metrics listen on (`up` uses 127.0.0.1)."""
    token: SecretStr | None = None
    """Bearer token the HTTP API requires; unset means none. A variable only, never a flag,
    so it stays out of `ps`."""
    batch_target_duration: Duration = 600_000
    """`parallelism: auto` gives a batch job enough shards to finish in about this long,
    from the input's size and the per-shard speed measured by earlier runs."""
    batch_max_shards: int = Field(32, ge=1, le=1000)
    """The most shards `parallelism: auto` gives one batch job."""
    batch_job: str | None = None
    """The batch job that a `load` or `backfill` shard belongs to, set by the manifests
    of `batch render`: the `job` label of the shard's pushed metrics."""
    pushgateway_url: str | None = None
    """Prometheus Pushgateway (http://host:9091) that batch runs and shards push their
    metrics to when they end, so a short-lived pod loses none; unset = none."""
