"""The spec model: feature groups and ingestion rules, as spec files declare them.

`load_catalog(path)` reads one YAML file or a folder of them and returns a
frozen `Catalog`, or raises `SpecError` listing every problem as
`file:line: field: message`. Each file is read by `_spec_yaml.read_yaml`
within limits of size, YAML nodes and depth, so a hostile file is a problem
too, found in bounded time and memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator

from featureplane._spec_yaml import read_yaml
from featureplane.errors import SpecError, SpecProblem, quote
from featureplane.types import FeatureType, parse_type

__all__ = [
    "TTL",
    "Catalog",
    "Feature",
    "FeatureGroup",
    "IngestionRule",
    "load_catalog",
    "parse_duration",
]

NAME = r"[A-Za-z0-9_]{1,128}"
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_ON_DEMAND = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def parse_duration(value: Any) -> int:
    """`500ms`, `30s`, `5m`, `2h`, `30d` -> milliseconds."""
    if isinstance(value, str) and (m := _DURATION.fullmatch(value.strip())):
        return int(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(
        f"bad duration {quote(value)} (expected a number and ms, s, m, h or d, e.g. 30s)"
    )


def _type(value: Any) -> FeatureType:
    if isinstance(value, FeatureType):
        return value
    if not isinstance(value, str):
        raise ValueError(f"type must be a string, got {quote(value)}")
    return parse_type(value)


SpecDuration = Annotated[int, PlainValidator(parse_duration)]
"""A duration in a spec file, in milliseconds: always written with its unit (`30s`), so
`ttl: {soft: 30}` is an error, not 30 ms. Settings take bare milliseconds too
(`featureplane.settings.Duration`, parsed by the same `parse_duration`)."""
TypeField = Annotated[FeatureType, PlainValidator(_type), PlainSerializer(str, return_type=str)]
Name = Annotated[str, Field(pattern=f"^{NAME}$")]
Scalar = str | int | float | bool


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Feature(_Model):
    """One feature of a group."""

    name: Name
    """Feature name, unique in its group."""
    type: TypeField
    """Value type, e.g. `string`, `set<string>`, `vector<float,64>`."""


class TTL(_Model):
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


class FeatureGroup(_Model):
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

    @pydantic.field_validator("features")
    @classmethod
    def _unique_features(cls, features: tuple[Feature, ...]) -> tuple[Feature, ...]:
        if dup := _duplicate([f.name for f in features]):
            raise ValueError(f"duplicate feature name {dup[1]!r}")
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


class IngestionRule(_Model):
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


class Catalog(_Model):
    """Every feature group and ingestion rule in force."""

    groups: Mapping[str, FeatureGroup]
    rules: tuple[IngestionRule, ...] = ()

    @cached_property
    def topics(self) -> tuple[str, ...]:
        """The topics that ingestion rules name, sorted."""
        return tuple(sorted({r.topic for r in self.rules}))

    def group(self, name: str) -> FeatureGroup:
        return self.groups[name]


# ---------------------------------------------------------------- loading


def load_catalog(path: str | Path) -> Catalog:
    """Load a YAML file or a folder of `*.yaml`/`*.yml` files; raise `SpecError`."""
    path = Path(path)
    if path.is_dir():
        # rglob does not follow symlinked folders, so a symlink loop cannot make it endless.
        files = sorted(
            p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and not p.is_dir()
        )
        if not files:
            raise SpecError([SpecProblem(str(path), 0, "-", "no .yaml or .yml files")])
    elif path.exists():
        files = [path]
    else:
        raise SpecError([SpecProblem(str(path), 0, "-", "no such file or folder")])

    problems: list[SpecProblem] = []
    invalid: set[Any] = set()  # names of groups that failed validation
    groups: dict[str, tuple[FeatureGroup, _Loc]] = {}
    rules: list[tuple[IngestionRule, _Loc]] = []
    for file in files:
        for obj, loc in _parse_file(file, problems, invalid):
            if isinstance(obj, FeatureGroup):
                if obj.name in groups:
                    first = groups[obj.name][1]
                    problems.append(
                        loc.problem(
                            ("name",),
                            f"duplicate group {obj.name!r} "
                            f"(first at {first.file}:{first.line(())})",
                        )
                    )
                else:
                    groups[obj.name] = (obj, loc)
            else:
                rules.append((obj, loc))

    names: set[str] = set()
    for rule, loc in rules:
        if rule.name in names:
            problems.append(loc.problem(("name",), f"duplicate rule {rule.name!r}"))
        names.add(rule.name)
        if rule.group not in invalid:
            problems.extend(_check_rule(rule, groups, loc))

    if problems:
        raise SpecError(sorted(problems, key=lambda p: (p.file, p.line)))
    return Catalog(groups={n: g for n, (g, _) in groups.items()}, rules=tuple(r for r, _ in rules))


def _duplicate(names: list[Any]) -> tuple[int, Any] | None:
    """(index, name) of the first name seen twice, or None."""
    seen: set[Any] = set()
    for i, name in enumerate(names):
        if name in seen:
            return i, name
        seen.add(name)
    return None


def _check_rule(
    rule: IngestionRule, groups: Mapping[str, tuple[FeatureGroup, _Loc]], loc: _Loc
) -> Iterator[SpecProblem]:
    if rule.group not in groups:
        yield loc.problem(("group",), f"unknown group {rule.group!r}")
        return
    group = groups[rule.group][0]
    if group.on_demand:
        yield loc.problem(("group",), f"group {group.name!r} is on-demand and cannot be ingested")
    for name in rule.features:
        if name not in group.index:
            yield loc.problem(("features", name), f"group {group.name!r} has no feature {name!r}")


class _Loc:
    """Where one top-level object sits: file, its path in the document, line per sub-path."""

    def __init__(self, file: str, prefix: tuple[Any, ...], lines: dict[tuple[Any, ...], int]):
        self.file, self.prefix, self.lines = file, prefix, lines

    def line(self, sub: tuple[Any, ...]) -> int:
        path = self.prefix + sub
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path, 1)

    def problem(self, sub: tuple[Any, ...], message: str) -> SpecProblem:
        return SpecProblem(self.file, self.line(sub), _field(self.prefix + sub), message)


def _field(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        if not isinstance(part, int):  # a key of the spec's own: any length
            part = part if isinstance(part, str) and len(part) <= 60 else quote(part, 60)
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "-"


_SECTIONS: dict[str, type[FeatureGroup] | type[IngestionRule]] = {
    "feature_groups": FeatureGroup,
    "ingestion": IngestionRule,
}


def _parse_file(
    file: Path, problems: list[SpecProblem], invalid: set[Any]
) -> Iterator[tuple[FeatureGroup | IngestionRule, _Loc]]:
    name = str(file)
    try:
        data, lines = read_yaml(file)
    except SpecError as exc:
        problems.extend(exc.problems)
        return
    if data is None:
        return
    if not isinstance(data, dict):
        problems.append(
            SpecProblem(name, 1, "-", "expected a mapping with feature_groups/ingestion")
        )
        return
    for key in data:
        if key not in _SECTIONS:
            problems.append(
                SpecProblem(
                    name,
                    lines.get((key,), 1),
                    _field((key,)),
                    "unknown section (expected feature_groups or ingestion)",
                )
            )
    for section, model in _SECTIONS.items():
        entries = data.get(section) or []
        if not isinstance(entries, list):
            problems.append(SpecProblem(name, lines.get((section,), 1), section, "must be a list"))
            continue
        for i, entry in enumerate(entries):
            loc = _Loc(name, (section, i), lines)
            try:
                yield model.model_validate(entry), loc
            except pydantic.ValidationError as exc:
                if model is FeatureGroup and isinstance(entry, dict):
                    invalid.add(_hashable(entry.get("name")))
                    problems.extend(_raw_duplicate_features(entry, loc))
                errors = exc.errors()
                for err in errors:
                    if err["type"] == "too_short" and any(
                        e["loc"][: len(err["loc"])] == err["loc"] and e is not err for e in errors
                    ):
                        continue  # "too short" only because its entries failed
                    problems.append(loc.problem(tuple(err["loc"]), _message(err)))


def _raw_duplicate_features(entry: dict[str, Any], loc: _Loc) -> Iterator[SpecProblem]:
    """Duplicate feature names, found even when other parts of the group fail to parse."""
    features = entry.get("features")
    if isinstance(features, list):
        names = [_hashable(f.get("name")) if isinstance(f, dict) else None for f in features]
        if (dup := _duplicate([n for n in names if n is not None])) is not None:
            i = [k for k, n in enumerate(names) if n == dup[1]][1]
            yield loc.problem(("features", i, "name"), f"duplicate feature name {quote(dup[1])}")


def _message(err: Any) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["type"] == "missing":
        return "required field is missing"
    if err["type"] == "literal_error":
        return f"{msg}, got {quote(err.get('input'))}"
    return msg


def _hashable(value: Any) -> Any:
    """`value`, or None when it cannot go in a set (a name written as a list)."""
    try:
        hash(value)
    except TypeError:
        return None
    return value
