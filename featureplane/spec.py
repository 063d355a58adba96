"""The spec: feature groups, ingestion rules and batch jobs, as spec files declare them.

The models are in `featureplane._spec_models` (and `featureplane.jobs`) and are
imported from here; the checks across entries in `featureplane._spec_checks`.
`load_catalog(path)` reads one YAML file or a folder of them and returns a
frozen `Catalog`, or raises `SpecError` listing every problem as
`file:line: field: message`. Each file is read by `_spec_yaml.read_yaml`
within limits of size, YAML nodes and depth, so a hostile file is a problem
too, found in bounded time and memory.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel

from featureplane._spec_checks import (
    SECTIONS,
    Entry,
    Loc,
    Section,
    check_jobs,
    check_rules,
    did_you_mean,
    firsts,
    quote_name,
)
from featureplane._spec_fields import parse_duration
from featureplane._spec_models import (
    DUPLICATE_FEATURE,
    TTL,
    Catalog,
    Feature,
    FeatureGroup,
    IngestionRule,
)
from featureplane._spec_yaml import field_of, read_yaml
from featureplane.errors import SpecError, SpecProblem, quote
from featureplane.jobs import BatchJob

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
    entries: dict[type[Section], list[Entry]] = {m: [] for m in SECTIONS.values()}
    for file in _spec_files(Path(path)):
        for entry in _parse_file(file, problems):
            entries[entry.model_type].append(entry)
    groups, rules, jobs = entries[FeatureGroup], entries[IngestionRule], entries[BatchJob]
    known = firsts(groups, "group", problems)
    check_rules(rules, known, problems)
    check_jobs(jobs, known, rules, problems)
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


def _parse_file(file: Path, problems: list[SpecProblem]) -> Iterator[Entry]:
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
        if key not in SECTIONS:
            hint = did_you_mean(key, SECTIONS) or f" (expected one of {', '.join(SECTIONS)})"
            line = lines.get((key,), 1)
            problems.append(SpecProblem(name, line, field_of((key,)), "unknown section" + hint))
    for section, model in SECTIONS.items():
        entries = data.get(section) or []
        if not isinstance(entries, list):
            problems.append(SpecProblem(name, lines.get((section,), 1), section, "must be a list"))
            continue
        for i, raw in enumerate(entries):
            loc = Loc(name, (section, i), lines)
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


def _valid_entry(model: Section, loc: Loc) -> Entry:
    if isinstance(model, FeatureGroup):
        names = tuple(f.name for f in model.features)
        return Entry(FeatureGroup, loc, model, model.name, names, None, bool(model.on_demand))
    if isinstance(model, BatchJob):
        return Entry(BatchJob, loc, model, model.name, None, after=model.after)
    return Entry(IngestionRule, loc, model, model.name, tuple(model.features), model.group)


def _raw_entry(
    model: type[Section],
    raw: dict[Any, Any],
    renamed: dict[tuple[Any, ...], Any],
    loc: Loc,
    problems: list[SpecProblem],
) -> Entry:
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
        return Entry(model, loc, None, text(get(raw, ("name",))), None, after=ups)
    features = get(raw, ("features",))
    if model is IngestionRule:
        keys = None
        if isinstance(features, dict) and all(isinstance(k, str) for k in features):
            keys = tuple(features)
        return Entry(model, loc, None, text(get(raw, ("name",))), keys, text(get(raw, ("group",))))
    names = None
    if isinstance(features, list):
        found = [
            text(get(f, ("features", i, "name"))) if isinstance(f, dict) else None
            for i, f in enumerate(features)
        ]
        seen: set[str] = set()
        for i, n in enumerate(found):
            if n in seen:
                message = f"duplicate feature name {quote_name(n)}"
                problems.append(loc.problem(("features", i, "name"), message))
            elif n is not None:
                seen.add(n)
        if None not in found:  # else a rule's feature might be the one that cannot be read
            names = tuple(n for n in found if n is not None)
    on_demand = bool(text(get(raw, ("on_demand",))))
    return Entry(model, loc, None, text(get(raw, ("name",))), names, None, on_demand)


def _report(
    model: type[BaseModel], exc: pydantic.ValidationError, loc: Loc, problems: list[SpecProblem]
) -> dict[tuple[Any, ...], Any]:
    """Report a failed entry's errors, one per root cause; return the misspelled keys taken
    for a missing field (field path -> the key written)."""
    errors = exc.errors()
    missing = {tuple(e["loc"]) for e in errors if e["type"] == "missing"}
    renamed: dict[tuple[Any, ...], Any] = {}
    found: list[tuple[tuple[Any, ...], str]] = []
    for err in errors:
        where = tuple(err["loc"])
        if err["type"] == DUPLICATE_FEATURE:
            continue  # reported per repeated name, at its line, by `_raw_entry`
        if err["type"] == "too_short" and any(
            e["loc"][: len(where)] == err["loc"] and e is not err for e in errors
        ):
            continue  # "too short" only because its entries failed
        message = _message(err)
        if err["type"] == "extra_forbidden":
            hint = did_you_mean(where[-1], _keys_at(model, where[:-1]))
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
