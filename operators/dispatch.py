"""The dispatcher: which ingestion rules an event feeds (M:N).

Rules are indexed by (topic, event_type); a rule's `where` is a mapping of
dotted payload paths to values that must all be equal. An event matching
no rule is done at once (committed, not stored).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from featureplane.spec import Catalog, IngestionRule
from operators.records import Work

__all__ = ["MISSING", "Dispatcher", "get_path"]

MISSING: Any = object()
"""Returned by `get_path` when a path does not exist."""


def get_path(body: Mapping[str, Any], path: str) -> Any:
    """The value at dotted `path` (`article.category`) in `body`, or `MISSING`."""
    node: Any = body
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return MISSING
        node = node[part]
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
        self._index: dict[tuple[str, str], tuple[IngestionRule, ...]] = {}
        for rule in rules:
            key = (rule.topic, rule.event_type)
            self._index[key] = (*self._index.get(key, ()), rule)

    @classmethod
    def from_catalog(cls, catalog: Catalog) -> Dispatcher:
        return cls(catalog.rules)

    def match(
        self, topic: str, event_type: str, body: Mapping[str, Any]
    ) -> tuple[IngestionRule, ...]:
        candidates = self._index.get((topic, event_type), ())
        return tuple(
            r for r in candidates if all(_equal(get_path(body, p), v) for p, v in r.where.items())
        )

    def dispatch(self, works: Iterable[Work]) -> list[Work]:
        """Attach matching rules to each decoded work; one matching nothing is done."""
        out: list[Work] = []
        for work in works:
            if work.event is None or work.status != "pending":
                out.append(work)
                continue
            rules = self.match(work.message.topic, work.event.event_type, work.event.body)
            out.append(replace(work, rules=rules, status="pending" if rules else "done"))
        return out
