"""The dispatcher: which ingestion rules an event feeds (M:N).

Rules are indexed by (topic, event_type); a rule's `where` is a mapping of
dotted payload paths to values that must all be equal. An event matching
no rule is done at once (committed, not stored).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from featureplane.operators.records import Work
from featureplane.spec import Catalog, IngestionRule

__all__ = ["MISSING", "Dispatcher", "get_parts", "get_path"]

MISSING: Any = object()
"""Returned by `get_path` when a path does not exist."""

_Candidate = tuple[IngestionRule, tuple[tuple[tuple[str, ...], Any], ...]]


def get_path(body: Mapping[str, Any], path: str) -> Any:
    """The value at dotted `path` (`article.category`) in `body`, or `MISSING`."""
    return get_parts(body, tuple(path.split(".")))


def get_parts(body: Mapping[str, Any], parts: tuple[str, ...]) -> Any:
    """`get_path` of a path already split at its dots (the per-event form)."""
    node: Any = body
    for part in parts:
        if type(node) is dict:  # what orjson gives; the ABC check below costs far more
            node = node.get(part, MISSING)
            if node is MISSING:
                return MISSING
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            return MISSING
    return node


def _equal(actual: Any, expected: Any) -> bool:
    # bool is an int in Python: `where: {flag: true}` must not match 1.
    return (type(actual) is type(expected) and actual == expected) or (
        isinstance(actual, int | float)
        and isinstance(expected, int | float)
        and not isinstance(actual, bool)
        and not isinstance(expected, bool)
        and actual == expected
    )


class Dispatcher:
    """Finds the rules an event matches."""

    def __init__(self, rules: Sequence[IngestionRule]) -> None:
        # (topic, event_type) -> the candidate rules, each with its `where` split into paths
        self._index: dict[tuple[str, str], tuple[_Candidate, ...]] = {}
        for rule in rules:
            key = (rule.topic, rule.event_type)
            where = tuple((tuple(p.split(".")), v) for p, v in rule.where.items())
            self._index[key] = (*self._index.get(key, ()), (rule, where))
        # (topic, event_type) -> its rules, where none of them has a `where`: every event
        # of the pair matches them all, with no path to read
        self._always = {
            key: tuple(rule for rule, _ in candidates)
            for key, candidates in self._index.items()
            if not any(where for _, where in candidates)
        }

    @classmethod
    def from_catalog(cls, catalog: Catalog) -> Dispatcher:
        return cls(catalog.rules)

    def match(
        self, topic: str, event_type: str, body: Mapping[str, Any]
    ) -> tuple[IngestionRule, ...]:
        key = (topic, event_type)
        always = self._always.get(key)
        if always is not None:
            return always
        candidates = self._index.get(key)
        if candidates is None:
            return ()
        matched: list[IngestionRule] = []
        for rule, where in candidates:  # loops, not generators: this runs for every event
            for parts, expected in where:
                actual = get_parts(body, parts)
                # the common case inline, `_equal` (numbers, bools) for the rest
                if not (type(actual) is type(expected) and actual == expected) and not _equal(
                    actual, expected
                ):
                    break
            else:
                matched.append(rule)
        return tuple(matched)

    def dispatch(self, works: Iterable[Work]) -> list[Work]:
        """Attach matching rules to each decoded work; one matching nothing is done."""
        out: list[Work] = []
        for work in works:
            if work.event is None or work.status != "pending":
                out.append(work)
                continue
            rules = self.match(work.message.topic, work.event.event_type, work.event.body)
            out.append(work.with_rules(rules))
        return out
