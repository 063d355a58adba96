"""The spec model: feature groups and ingestion rules, as spec files declare them.

`load_catalog(path)` reads one YAML file or a folder of them and returns a
frozen `Catalog`, or raises `SpecError` listing every problem as
`file:line: field: message`. Each file is read by `_spec_yaml.read_yaml`
within limits of size, YAML nodes and depth, so a hostile file is a problem
too, found in bounded time and memory.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, Field, PlainSerializer, PlainValidator
from pydantic_core import PydanticCustomError

from featureplane._spec_fields import Name, SpecDuration, SpecModel, parse_duration
from featureplane._spec_yaml import field_of, read_yaml
from featureplane.errors import SpecError, SpecProblem, quote
from featureplane.jobs import BatchJob
from featureplane.types import FeatureType, parse_type

__all__ = [
    "TTL",
    "Catalog",
    "Feature",
    "FeatureGroup",
    "IngestionRule",
    "SpecNotFoundError",
    "load_catalog",
    "parse_duration",
]

_ON_DEMAND = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_DUPLICATE_FEATURE = "duplicate_feature"


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

    @pydantic.field_validator("features")
    @classmethod
    def _unique_features(cls, features: tuple[Feature, ...]) -> tuple[Feature, ...]:
        names = [f.name for f in features]
        if len(set(names)) != len(names):
            # A type of its own: the loader reports each repeat at its own line instead.
            raise PydanticCustomError(_DUPLICATE_FEATURE, "duplicate feature names")
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


# ---------------------------------------------------------------- loading


class SpecNotFoundError(SpecError):
    """The spec path names no file or folder, or a folder without spec files."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__([SpecProblem(str(path), 0, "-", reason)])
        self.path = path
        where = "" if path.is_absolute() else f" ({path.absolute()})"
        self.message = (
            f"no spec at {path}{where}: {reason}.\n"
            "A spec is a YAML file, or a folder of them, declaring feature groups and "
            "ingestion rules.\nPoint --spec or FEATUREPLANE_SPEC at yours "
            "(`featureplane validate PATH` checks it),\nor try `featureplane up --demo`, "
            "which runs on the example catalog."
        )

    def __str__(self) -> str:
        return self.message


def load_catalog(path: str | Path) -> Catalog:
    """Load a YAML file or a folder of `*.yaml`/`*.yml` files (hidden ones skipped).

    Raises `SpecNotFoundError` when there is nothing to read, else `SpecError` with every
    problem of every file: each group and rule is checked, and checked against the others,
    even when some fail, but a problem is reported once, not again as the problems it causes.
    """
    problems: list[SpecProblem] = []
    entries: dict[type[_Section], list[_Entry]] = {m: [] for m in _SECTIONS.values()}
    for file in _spec_files(Path(path)):
        for entry in _parse_file(file, problems):
            entries[entry.model_type].append(entry)
    groups, rules, jobs = entries[FeatureGroup], entries[IngestionRule], entries[BatchJob]
    known = _firsts(groups, "group", problems)
    _check_rules(rules, known, problems)
    _check_jobs(jobs, known, rules, problems)
    if problems:
        raise SpecError(sorted(problems, key=lambda p: (p.file, p.line)))
    return Catalog(
        groups={g.model.name: g.model for g in groups if isinstance(g.model, FeatureGroup)},
        rules=tuple(r.model for r in rules if isinstance(r.model, IngestionRule)),
        jobs={j.model.name: j.model for j in jobs if isinstance(j.model, BatchJob)},
    )


def _spec_files(path: Path) -> list[Path]:
    if path.is_dir():
        # rglob does not follow symlinked folders, so a symlink loop cannot make it endless.
        # Hidden names are skipped: a Kubernetes ConfigMap volume holds each file twice, in
        # a `..<timestamp>` folder and as a symlink beside it, and editors leave `.#x.yaml`.
        files = sorted(
            p
            for p in path.rglob("*")
            if p.suffix in (".yaml", ".yml")
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
            and not p.is_dir()
        )
        if not files:
            raise SpecNotFoundError(path, "a folder with no .yaml or .yml files")
        return files
    if path.exists() or path.is_symlink():  # a dangling symlink: a problem of its own
        return [path]
    raise SpecNotFoundError(path, "no such file or folder")


@dataclass(frozen=True, slots=True)
class _Entry:
    """One group or rule as declared, valid or not: what the checks across entries need.

    For an entry that failed validation the fields come from what it holds, where they are
    well formed (None where not), so that its other problems are still found."""

    model_type: type[_Section]
    loc: _Loc
    model: _Section | None
    """None when the entry failed validation."""
    name: str | None
    features: tuple[str, ...] | None
    """A group's feature names, a rule's feature keys; None when they cannot be told."""
    group: str | None = None
    """A rule's group."""
    on_demand: bool = False
    """A group computed per request."""
    after: tuple[str, ...] = ()
    """A job's dependencies."""


def _firsts(entries: list[_Entry], kind: str, problems: list[SpecProblem]) -> dict[str, _Entry]:
    """Name -> its first declaration; each later one is a duplicate `kind` problem."""
    known: dict[str, _Entry] = {}
    for entry in entries:
        if entry.name is None:
            continue
        if (first := known.get(entry.name)) is not None:
            where = f"first at {first.loc.file}:{first.loc.line(())}"
            problems.append(
                entry.loc.problem(("name",), f"duplicate {kind} {_q(entry.name)} ({where})")
            )
        else:
            known[entry.name] = entry
    return known


def _check_rules(
    rules: list[_Entry], groups: Mapping[str, _Entry], problems: list[SpecProblem]
) -> None:
    _firsts(rules, "rule", problems)
    for rule in rules:
        if rule.group is None:
            continue
        group = groups.get(rule.group)
        if group is None:
            hint = _did_you_mean(rule.group, groups)
            problems.append(rule.loc.problem(("group",), f"unknown group {_q(rule.group)}{hint}"))
            continue
        if group.on_demand:
            problems.append(
                rule.loc.problem(
                    ("group",), f"group {_q(rule.group)} is on-demand and cannot be ingested"
                )
            )
        if group.features is None or rule.features is None:
            continue  # a problem of the group's or the rule's own, reported there
        have = set(group.features)
        for name in rule.features:
            if name not in have:
                hint = _did_you_mean(name, group.features)
                problems.append(
                    rule.loc.problem(
                        ("features", name),
                        f"group {_q(rule.group)} has no feature {_q(name)}{hint}",
                    )
                )


def _check_jobs(
    jobs: list[_Entry],
    groups: Mapping[str, _Entry],
    rules: list[_Entry],
    problems: list[SpecProblem],
) -> None:
    """Each job's groups, topic and `after` jobs exist, and `after` makes no cycle."""
    known = _firsts(jobs, "batch job", problems)
    for entry in jobs:
        job = entry.model
        if isinstance(job, BatchJob) and job.load is not None:
            group = groups.get(job.load.group)
            if group is None:
                hint = _did_you_mean(job.load.group, groups)
                problems.append(
                    entry.loc.problem(
                        ("load", "group"), f"unknown group {_q(job.load.group)}{hint}"
                    )
                )
            elif group.on_demand:
                message = f"group {_q(job.load.group)} is on-demand: it is never stored"
                problems.append(entry.loc.problem(("load", "group"), message))
        if isinstance(job, BatchJob) and job.backfill is not None:
            _check_backfill(entry, job, groups, rules, problems)
        for i, name in enumerate(entry.after):
            if name not in known:
                hint = _did_you_mean(name, known)
                problems.append(entry.loc.problem(("after", i), f"unknown job {_q(name)}{hint}"))
    state: dict[str, int] = {}  # 1: being visited, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for up in known[name].after:
            if up not in known:
                continue
            if state.get(up) == 1:
                cycle = " -> ".join([*path[path.index(up) :], up])
                where = known[name].after.index(up)
                problems.append(known[name].loc.problem(("after", where), f"cycle: {cycle}"))
            elif up not in state:
                visit(up, [*path, up])
        state[name] = 2

    for name in known:
        if name not in state:
            visit(name, [name])


def _check_backfill(
    entry: _Entry,
    job: BatchJob,
    groups: Mapping[str, _Entry],
    rules: list[_Entry],
    problems: list[SpecProblem],
) -> None:
    assert job.backfill is not None
    topic, wanted = job.backfill.topic, job.backfill.groups
    for i, name in enumerate(wanted or ()):
        if name not in groups:
            hint = _did_you_mean(name, groups)
            problems.append(
                entry.loc.problem(("backfill", "groups", i), f"unknown group {_q(name)}{hint}")
            )
    feeding = {
        r.model.group
        for r in rules
        if isinstance(r.model, IngestionRule) and r.model.topic == topic
    }
    if not feeding:
        topics = sorted({r.model.topic for r in rules if isinstance(r.model, IngestionRule)})
        hint = _did_you_mean(topic, topics)
        problems.append(
            entry.loc.problem(("backfill", "topic"), f"no ingestion rule reads {_q(topic)}{hint}")
        )
    elif wanted:
        for i, name in enumerate(wanted):
            if name in groups and name not in feeding:
                message = f"topic {_q(topic)} does not feed group {_q(name)}"
                problems.append(entry.loc.problem(("backfill", "groups", i), message))


def _did_you_mean(word: Any, choices: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the choice closest to `word`, if one is close; else ``."""
    if not isinstance(word, str) or len(word) > 128:
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _q(name: str) -> str:
    """A name for a message: as written when it fits a name's length, else cut short."""
    return repr(name) if len(name) <= 128 else quote(name)


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
        return SpecProblem(self.file, self.line(sub), field_of(self.prefix + sub), message)


_Section = FeatureGroup | IngestionRule | BatchJob
_SECTIONS: dict[str, type[_Section]] = {
    "feature_groups": FeatureGroup,
    "ingestion": IngestionRule,
    "batch_jobs": BatchJob,
}


def _parse_file(file: Path, problems: list[SpecProblem]) -> Iterator[_Entry]:
    name = str(file)
    try:
        doc = read_yaml(file)
    except SpecError as exc:
        problems.extend(exc.problems)
        return
    problems.extend(doc.problems)
    data, lines = doc.data, doc.lines
    if data is None:
        return
    if not isinstance(data, dict):
        problems.append(
            SpecProblem(name, 1, "-", "expected a mapping with feature_groups/ingestion/batch_jobs")
        )
        return
    for key in data:
        if key not in _SECTIONS:
            hint = _did_you_mean(key, _SECTIONS) or f" (expected one of {', '.join(_SECTIONS)})"
            line = lines.get((key,), 1)
            problems.append(SpecProblem(name, line, field_of((key,)), "unknown section" + hint))
    for section, model in _SECTIONS.items():
        entries = data.get(section) or []
        if not isinstance(entries, list):
            problems.append(SpecProblem(name, lines.get((section,), 1), section, "must be a list"))
            continue
        for i, raw in enumerate(entries):
            loc = _Loc(name, (section, i), lines)
            try:
                yield _valid_entry(model.model_validate(raw), loc)
            except pydantic.ValidationError as exc:
                before = len(problems)
                renamed = _report(model, exc, loc, problems)
                entry = (
                    _raw_entry(model, raw, renamed, loc, problems)
                    if isinstance(raw, dict)
                    else None
                )
                if len(problems) == before:  # every error was left to a check that did not run
                    problems.extend(loc.problem(tuple(e["loc"]), _message(e)) for e in exc.errors())
                if entry is not None:
                    yield entry


def _valid_entry(model: _Section, loc: _Loc) -> _Entry:
    if isinstance(model, FeatureGroup):
        names = tuple(f.name for f in model.features)
        return _Entry(FeatureGroup, loc, model, model.name, names, None, bool(model.on_demand))
    if isinstance(model, BatchJob):
        return _Entry(BatchJob, loc, model, model.name, None, after=model.after)
    return _Entry(IngestionRule, loc, model, model.name, tuple(model.features), model.group)


def _raw_entry(
    model: type[_Section],
    raw: dict[Any, Any],
    renamed: dict[tuple[Any, ...], Any],
    loc: _Loc,
    problems: list[SpecProblem],
) -> _Entry:
    """An entry that failed validation, from what it holds (a misspelled key read as the
    field it stands for), so that the checks across entries still see it."""

    def get(mapping: dict[Any, Any], path: tuple[Any, ...]) -> Any:
        if path[-1] in mapping or path not in renamed:
            return mapping.get(path[-1])
        return mapping.get(renamed[path])

    def text(value: Any) -> str | None:
        return value if isinstance(value, str) and value else None

    if model is BatchJob:
        after = get(raw, ("after",))
        ups = tuple(a for a in after if isinstance(a, str)) if isinstance(after, list) else ()
        return _Entry(model, loc, None, text(get(raw, ("name",))), None, after=ups)
    features = get(raw, ("features",))
    if model is IngestionRule:
        keys = None
        if isinstance(features, dict) and all(isinstance(k, str) for k in features):
            keys = tuple(features)
        return _Entry(model, loc, None, text(get(raw, ("name",))), keys, text(get(raw, ("group",))))
    names = None
    if isinstance(features, list):
        found = [
            text(get(f, ("features", i, "name"))) if isinstance(f, dict) else None
            for i, f in enumerate(features)
        ]
        seen: set[str] = set()
        for i, n in enumerate(found):
            if n in seen:
                message = f"duplicate feature name {_q(n)}"
                problems.append(loc.problem(("features", i, "name"), message))
            elif n is not None:
                seen.add(n)
        if None not in found:  # else a rule's feature might be the one that cannot be read
            names = tuple(n for n in found if n is not None)
    on_demand = bool(text(get(raw, ("on_demand",))))
    return _Entry(model, loc, None, text(get(raw, ("name",))), names, None, on_demand)


def _report(
    model: type[BaseModel], exc: pydantic.ValidationError, loc: _Loc, problems: list[SpecProblem]
) -> dict[tuple[Any, ...], Any]:
    """Report a failed entry's errors, one per root cause; return the misspelled keys taken
    for a missing field (field path -> the key written)."""
    errors = exc.errors()
    missing = {tuple(e["loc"]) for e in errors if e["type"] == "missing"}
    renamed: dict[tuple[Any, ...], Any] = {}
    found: list[tuple[tuple[Any, ...], str]] = []
    for err in errors:
        where = tuple(err["loc"])
        if err["type"] == _DUPLICATE_FEATURE:
            continue  # reported per repeated name, at its line, by `_raw_entry`
        if err["type"] == "too_short" and any(
            e["loc"][: len(where)] == err["loc"] and e is not err for e in errors
        ):
            continue  # "too short" only because its entries failed
        message = _message(err)
        if err["type"] == "extra_forbidden":
            hint = _did_you_mean(where[-1], _keys_at(model, where[:-1]))
            message += hint
            if hint:
                meant = (*where[:-1], hint.split("'")[1])
                if meant in missing:
                    renamed[meant] = where[-1]
        found.append((where, message))
    for where, message in found:
        if where not in renamed:  # "missing" because it is misspelled: said by the misspelling
            problems.append(loc.problem(where, message))
    return renamed


def _keys_at(model: type[BaseModel], path: tuple[Any, ...]) -> tuple[str, ...]:
    """The fields of the model found at `path` under `model` (a group's `ttl`, a feature)."""
    for part in path:
        if isinstance(part, int):
            continue  # an item of a list: the list's item model
        field = model.model_fields.get(part) if isinstance(part, str) else None
        inner = _model_in(field.annotation) if field else None
        if inner is None:
            return ()
        model = inner
    return tuple(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model an annotation holds: `TTL`, `tuple[Feature, ...]` -> Feature; else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (inner := _model_in(arg)) is not None:
            return inner
    return None


def _message(err: Any) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["type"] == "missing":
        return "required field is missing"
    if err["type"] == "literal_error":
        return f"{msg}, got {quote(err.get('input'))}"
    return msg
