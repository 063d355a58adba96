"""The spec's models: features, TTLs, feature groups, ingestion rules and the catalog.

`featureplane.spec` reads them from YAML (and re-exports them: import them from there);
batch jobs are in `featureplane.jobs`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cached_property
from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field, PlainSerializer, PlainValidator
from pydantic_core import PydanticCustomError

from featureplane._spec_fields import Description, Name, Owner, SpecDuration, SpecModel, Tags
from featureplane.errors import quote
from featureplane.jobs import BatchJob
from featureplane.types import MAX_ITEM_BYTES, FeatureType, packed_floor, parse_type

__all__ = [
    "DUPLICATE_FEATURE",
    "TTL",
    "Catalog",
    "Feature",
    "FeatureGroup",
    "IngestionRule",
    "Scalar",
    "Tier",
]

_ON_DEMAND = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
DUPLICATE_FEATURE = "duplicate_feature"


def _type(value: Any) -> FeatureType:
    if isinstance(value, FeatureType):
        return value
    if not isinstance(value, str):
        raise ValueError(f"type must be a string, got {quote(value)}")
    return parse_type(value)


TypeField = Annotated[FeatureType, PlainValidator(_type), PlainSerializer(str, return_type=str)]
Scalar = str | int | float | bool


class Feature(SpecModel):
    """One feature of a group."""

    name: Name
    """Feature name, unique in its group."""
    type: TypeField
    """Value type, e.g. `string`, `set<string>`, `vector<float,64>`."""
    description: Description | None = None
    """What the value means, for people: the catalog shows it."""
    owner: Owner | None = None
    """Who to ask about it, when not the group's owner."""
    tags: Tags = ()
    """Labels to find it by."""


class TTL(SpecModel):
    """Cache TTLs: past `soft` a cached value is refreshed, past `hard` never served."""

    soft: SpecDuration = 30_000
    """Milliseconds after which a cached value is refreshed in the background."""
    hard: SpecDuration = 300_000
    """Milliseconds after which a cached value is never served."""
    jitter: float = Field(0.1, ge=0, le=1)
    """Fraction by which each TTL is randomly shortened, to spread expiries."""

    @pydantic.model_validator(mode="after")
    def _soft_before_hard(self) -> TTL:
        if self.soft > self.hard:
            raise ValueError(f"soft ({self.soft} ms) must not exceed hard ({self.hard} ms)")
        return self


Tier = Literal["local", "redis", "store"]


class FeatureGroup(SpecModel):
    """A feature group: features stored together under one key per entity id."""

    name: Name
    """Group name; also the partition key prefix."""
    entity: Name
    """What an id names (user, article, ...)."""
    kind: Literal["timeseries", "latest"]
    """timeseries: many items per id, newest first; latest: one value per id."""
    features: tuple[Feature, ...] = Field(min_length=1)
    """Features in stored order; append only."""
    max_items: int = Field(50, ge=1, le=10_000)
    """timeseries: the most items a read may ask for and a cache keeps per id."""
    retention: SpecDuration | None = None
    """timeseries: items older than this (by event time) expire; None keeps them."""
    ttl: TTL = TTL()
    """Cache TTLs."""
    tiers: tuple[Tier, ...] = ("local", "redis", "store")
    """Read path, top first."""
    write: Literal["through", "around"] = "through"
    """through: ingestion also writes the Redis tier; around: the store only."""
    on_demand: str | None = Field(None, pattern=f"^{_ON_DEMAND.pattern}$")
    """`module:function` computing the group per request; never stored or cached."""
    description: Description | None = None
    """What the group holds and what it is for, for people: the catalog shows it."""
    owner: Owner | None = None
    """Who to ask about it: a team, a person or an address."""
    tags: Tags = ()
    """Labels to find it by."""

    @pydantic.field_validator("features")
    @classmethod
    def _unique_features(cls, features: tuple[Feature, ...]) -> tuple[Feature, ...]:
        names = [f.name for f in features]
        if len(set(names)) != len(names):
            # A type of its own: the loader reports each repeat at its own line instead.
            raise PydanticCustomError(DUPLICATE_FEATURE, "duplicate feature names")
        return features

    @pydantic.field_validator("features")
    @classmethod
    def _vectors_fit(cls, features: tuple[Feature, ...]) -> tuple[Feature, ...]:
        # Each vector alone fits (`MAX_VECTOR_DIM`); together they may not, and then no item
        # holding them all could ever be written.
        floor = packed_floor([f.type for f in features])
        if floor > MAX_ITEM_BYTES:
            raise ValueError(
                f"an item with every vector set takes at least {floor:,} bytes packed "
                f"(4 a float), over the {MAX_ITEM_BYTES:,}-byte item limit"
            )
        return features

    @pydantic.field_validator("tiers")
    @classmethod
    def _unique_tiers(cls, tiers: tuple[str, ...]) -> tuple[str, ...]:
        if not tiers or len(set(tiers)) != len(tiers):
            raise ValueError("tiers must be a non-empty list without repeats")
        return tiers

    @cached_property
    def index(self) -> Mapping[str, int]:
        """Feature name -> stored position."""
        return {f.name: i for i, f in enumerate(self.features)}


class IngestionRule(SpecModel):
    """Which events feed which group, and where each feature comes from."""

    name: Name
    """Rule name, unique in the catalog."""
    topic: str = Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")
    """Kafka topic the events come from."""
    event_type: str = Field(min_length=1)
    """Only events of this `event_type` match."""
    where: dict[str, Scalar] = {}
    """Payload path -> value that must be equal for the rule to match."""
    group: Name
    """Feature group fed."""
    id: str = Field(min_length=1)
    """Payload path of the entity id."""
    features: dict[str, str] = Field(min_length=1)
    """Feature name -> payload path."""


class Catalog(SpecModel):
    """Every feature group, ingestion rule and batch job in force."""

    groups: Mapping[str, FeatureGroup]
    rules: tuple[IngestionRule, ...] = ()
    jobs: Mapping[str, BatchJob] = {}
    """Batch jobs by name, in spec order."""

    @cached_property
    def topics(self) -> tuple[str, ...]:
        """The topics that ingestion rules name, sorted."""
        return tuple(sorted({r.topic for r in self.rules}))

    def group(self, name: str) -> FeatureGroup:
        return self.groups[name]
