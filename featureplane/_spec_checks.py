"""The checks of a catalog across its entries, each problem located at file:line.

Every group, rule and job is first read on its own (`featureplane.spec`); these
checks then hold them against each other: duplicate names, a rule's group and
features, a job's group, topic and `after` jobs, cycles. An entry that failed
its own checks still takes part with what it holds, so that its other problems
are found, but a problem is reported once, not again as the problems it causes.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from featureplane._spec_models import FeatureGroup, IngestionRule
from featureplane._spec_yaml import field_of
from featureplane.errors import SpecProblem, quote
from featureplane.jobs import BatchJob

__all__ = [
    "SECTIONS",
    "Entry",
    "Loc",
    "Section",
    "check_jobs",
    "check_rules",
    "did_you_mean",
    "firsts",
    "quote_name",
]


@dataclass(frozen=True, slots=True)
class Entry:
    """One group, rule or job as declared, valid or not: what the checks across entries need.

    For an entry that failed validation the fields come from what it holds, where they are
    well formed (None where not), so that its other problems are still found."""

    model_type: type[Section]
    loc: Loc
    model: Section | None
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


def firsts(entries: list[Entry], kind: str, problems: list[SpecProblem]) -> dict[str, Entry]:
    """Name -> its first declaration; each later one is a duplicate `kind` problem."""
    known: dict[str, Entry] = {}
    for entry in entries:
        if entry.name is None:
            continue
        if (first := known.get(entry.name)) is not None:
            where = f"first at {first.loc.file}:{first.loc.line(())}"
            problems.append(
                entry.loc.problem(("name",), f"duplicate {kind} {quote_name(entry.name)} ({where})")
            )
        else:
            known[entry.name] = entry
    return known


def check_rules(
    rules: list[Entry], groups: Mapping[str, Entry], problems: list[SpecProblem]
) -> None:
    firsts(rules, "rule", problems)
    for rule in rules:
        if rule.group is None:
            continue
        group = groups.get(rule.group)
        if group is None:
            hint = did_you_mean(rule.group, groups)
            problems.append(
                rule.loc.problem(("group",), f"unknown group {quote_name(rule.group)}{hint}")
            )
            continue
        if group.on_demand:
            problems.append(
                rule.loc.problem(
                    ("group",),
                    f"group {quote_name(rule.group)} is on-demand and cannot be ingested",
                )
            )
        if group.features is None or rule.features is None:
            continue  # a problem of the group's or the rule's own, reported there
        have = set(group.features)
        for name in rule.features:
            if name not in have:
                hint = did_you_mean(name, group.features)
                problems.append(
                    rule.loc.problem(
                        ("features", name),
                        f"group {quote_name(rule.group)} has no feature {quote_name(name)}{hint}",
                    )
                )


def check_jobs(
    jobs: list[Entry],
    groups: Mapping[str, Entry],
    rules: list[Entry],
    problems: list[SpecProblem],
) -> None:
    """Each job's groups, topic and `after` jobs exist, and `after` makes no cycle."""
    known = firsts(jobs, "batch job", problems)
    for entry in jobs:
        job = entry.model
        if isinstance(job, BatchJob) and job.load is not None:
            group = groups.get(job.load.group)
            if group is None:
                hint = did_you_mean(job.load.group, groups)
                problems.append(
                    entry.loc.problem(
                        ("load", "group"), f"unknown group {quote_name(job.load.group)}{hint}"
                    )
                )
            elif group.on_demand:
                message = f"group {quote_name(job.load.group)} is on-demand: it is never stored"
                problems.append(entry.loc.problem(("load", "group"), message))
        if isinstance(job, BatchJob) and job.backfill is not None:
            _check_backfill(entry, job, groups, rules, problems)
        for i, name in enumerate(entry.after):
            if name not in known:
                hint = did_you_mean(name, known)
                problems.append(
                    entry.loc.problem(("after", i), f"unknown job {quote_name(name)}{hint}")
                )
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
    entry: Entry,
    job: BatchJob,
    groups: Mapping[str, Entry],
    rules: list[Entry],
    problems: list[SpecProblem],
) -> None:
    assert job.backfill is not None
    topic, wanted = job.backfill.topic, job.backfill.groups
    for i, name in enumerate(wanted or ()):
        if name not in groups:
            hint = did_you_mean(name, groups)
            problems.append(
                entry.loc.problem(
                    ("backfill", "groups", i), f"unknown group {quote_name(name)}{hint}"
                )
            )
    feeding = {
        r.model.group
        for r in rules
        if isinstance(r.model, IngestionRule) and r.model.topic == topic
    }
    if not feeding:
        topics = sorted({r.model.topic for r in rules if isinstance(r.model, IngestionRule)})
        hint = did_you_mean(topic, topics)
        problems.append(
            entry.loc.problem(
                ("backfill", "topic"), f"no ingestion rule reads {quote_name(topic)}{hint}"
            )
        )
    elif wanted:
        for i, name in enumerate(wanted):
            if name in groups and name not in feeding:
                message = f"topic {quote_name(topic)} does not feed group {quote_name(name)}"
                problems.append(entry.loc.problem(("backfill", "groups", i), message))


def did_you_mean(word: Any, choices: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the choice closest to `word`, if one is close; else ``."""
    if not isinstance(word, str) or len(word) > 128:
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def quote_name(name: str) -> str:
    """A name for a message: as written when it fits a name's length, else cut short."""
    return repr(name) if len(name) <= 128 else quote(name)


class Loc:
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


Section = FeatureGroup | IngestionRule | BatchJob
SECTIONS: dict[str, type[Section]] = {
    "feature_groups": FeatureGroup,
    "ingestion": IngestionRule,
    "batch_jobs": BatchJob,
}
