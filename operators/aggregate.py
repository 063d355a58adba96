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
from dataclasses import replace
from typing import Any

from featureplane.codec import Item, make_item
from featureplane.errors import ValidationError
from featureplane.spec import Catalog, IngestionRule
from operators.dispatch import MISSING, get_path
from operators.records import Event, Work

__all__ = ["Aggregator"]


class Aggregator:
    """Builds the items of matched events."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def item(self, rule: IngestionRule, event: Event) -> Item:
        """One rule applied to one event; raises `ValidationError`."""
        group = self.catalog.groups[rule.group]
        raw = get_path(event.body, rule.id)
        if raw is MISSING or raw is None:
            raise ValidationError(f"missing id field {rule.id}")
        if isinstance(raw, int) and not isinstance(raw, bool):
            raw = str(raw)
        if not isinstance(raw, str):
            raise ValidationError(f"id field {rule.id} must be a string, got {raw!r:.80}")
        features: dict[str, Any] = {}
        for name, path in rule.features.items():
            value = get_path(event.body, path)
            features[name] = None if value is MISSING else value
        return make_item(group, raw, event.ts, event.event_id, features)

    def aggregate(self, works: Iterable[Work]) -> list[Work]:
        out: list[Work] = []
        for work in works:
            if work.status != "pending" or work.event is None:
                out.append(work)
                continue
            items: list[Item] = []
            reason = None
            for rule in work.rules:
                try:
                    items.append(self.item(rule, work.event))
                except ValidationError as exc:
                    reason = f"rule {rule.name}: {exc}"
                    break
            if reason is None:
                out.append(replace(work, items=tuple(items)))
            else:
                out.append(replace(work, status="malformed", reason=reason))
        return out
