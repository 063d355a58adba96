"""Aggregators: an event and the rules it matched -> checked items, one per rule.

The entity id comes from the rule's `id` path (a string, or an integer
written as its decimal string); features are read from their payload paths
(a missing path is `None`) and checked by `codec.make_item` against the
group's types and the 8 KiB limit. If any rule fails, the record is
malformed and none of its items are written: it goes to the DLQ whole,
with the rule and the problem in its reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from featureplane.codec import Item, make_item
from featureplane.errors import ValidationError, quote
from featureplane.operators.dispatch import MISSING, get_parts
from featureplane.operators.records import Event, Work
from featureplane.spec import Catalog, FeatureGroup, IngestionRule

__all__ = ["Aggregator"]


_Path = tuple[str, tuple[str, ...]]
"""A dotted path split at the dots: its first part, and the parts below it (often none)."""


@dataclass(frozen=True, slots=True)
class _Plan:
    """A rule with its paths split at the dots once, not per event."""

    group: FeatureGroup
    id_path: _Path
    features: tuple[tuple[str, _Path], ...]


def _split(path: str) -> _Path:
    first, *rest = path.split(".")
    return first, tuple(rest)


def _below(node: Any, parts: tuple[str, ...]) -> Any:
    """The value at `parts` under `node`, None where the path does not exist."""
    if len(parts) == 1 and type(node) is dict:  # `article.id`: the usual depth
        return node.get(parts[0])
    value = get_parts(node, parts)
    return None if value is MISSING else value


class Aggregator:
    """Builds the items of matched events."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._plans: dict[str, _Plan] = {}

    def _plan(self, rule: IngestionRule) -> _Plan:
        plan = self._plans.get(rule.name)
        if plan is None:
            plan = self._plans[rule.name] = _Plan(
                self.catalog.groups[rule.group],
                _split(rule.id),
                tuple((name, _split(path)) for name, path in rule.features.items()),
            )
        return plan

    def item(self, rule: IngestionRule, event: Event) -> Item:
        """One rule applied to one event; raises `ValidationError`."""
        plan = self._plan(rule)
        # A missing path and a null value both read as None (a feature's None, a missing id):
        # the first part is one `get`, deeper parts a call (this runs per feature per event).
        get = event.body.get
        first, rest = plan.id_path
        raw = get(first)
        if rest and raw is not None:
            raw = _below(raw, rest)
        if type(raw) is not str:
            if raw is None:
                raise ValidationError(f"missing id field {rule.id}")
            if isinstance(raw, int) and not isinstance(raw, bool):
                raw = str(raw)
            if not isinstance(raw, str):
                raise ValidationError(f"id field {rule.id} must be a string, got {quote(raw)}")
        features: dict[str, Any] = {}
        for name, (first, rest) in plan.features:
            value = get(first)
            features[name] = _below(value, rest) if rest and value is not None else value
        return make_item(plan.group, raw, event.ts, event.event_id, features)

    def items(
        self, rules: Iterable[IngestionRule], event: Event
    ) -> tuple[tuple[Item, ...], str | None]:
        """The items of `event` under each rule, or () and why the record is malformed."""
        items: list[Item] = []
        for rule in rules:
            try:
                items.append(self.item(rule, event))
            except ValidationError as exc:
                return (), f"rule {rule.name}: {exc}"
        return tuple(items), None

    def aggregate(self, works: Iterable[Work]) -> list[Work]:
        out: list[Work] = []
        for work in works:
            if work.status != "pending" or work.event is None:
                out.append(work)
                continue
            items, reason = self.items(work.rules, work.event)
            if reason is None:
                out.append(work.with_items(items))
            else:
                out.append(work.with_status("malformed", reason))
        return out
