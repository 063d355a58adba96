"""Item codec: feature values by spec index, encoded with orjson.

An item's value is the JSON array of its features' wire forms in spec
order (`["a", "1111"]`), Karrot's `{"0": "a", "1": "1111"}` without the
keys. Features appended to a spec later decode as `None` for old items.
One encoded item is at most 8 KiB (`MAX_ITEM_BYTES`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from featureplane.errors import ItemTooLargeError, ValidationError, quote
from featureplane.keys import check_id, version
from featureplane.spec import FeatureGroup
from featureplane.types import INT_MAX, INT_MIN, coerce, to_python

__all__ = [
    "MAX_ITEM_BYTES",
    "Item",
    "Record",
    "decode",
    "decode_python",
    "encode",
    "make_item",
    "project",
]

MAX_ITEM_BYTES = 8 * 1024


@dataclass(frozen=True, slots=True)
class Item:
    """One item to write: a group's features of one id at one event time."""

    group: str
    id: str
    ts: int
    version: str
    value: bytes


@dataclass(frozen=True, slots=True)
class Record:
    """One item as read back: newest-first lists of these answer a query."""

    ts: int
    version: str
    value: bytes


def encode(group: FeatureGroup, features: Mapping[str, Any]) -> bytes:
    """Check `features` (name -> value) against `group` and encode them by index."""
    values: list[Any] = [None] * len(group.features)
    index, specs = group.index, group.features
    for name, value in features.items():
        i = index.get(name)
        if i is None:
            raise ValidationError(f"group {group.name!r} has no feature {quote(name)}")
        if value is None:
            continue
        t = specs[i].type
        # Plain strings and in-range ints are their own wire form: skip `coerce`'s call
        # and match for the most common values (bools are not `type(...) is int`).
        if (type(value) is str and t.kind == "string") or (
            type(value) is int and t.kind == "int" and INT_MIN <= value <= INT_MAX
        ):
            values[i] = value
        else:
            values[i] = coerce(t, value, name)
    try:
        data = orjson.dumps(values)
    except TypeError as exc:  # e.g. an int beyond 64 bits inside a container
        raise ValidationError(f"cannot encode features: {exc}") from None
    if len(data) > MAX_ITEM_BYTES:
        raise ItemTooLargeError(
            f"item of group {group.name!r} is {len(data)} bytes encoded, "
            f"over the {MAX_ITEM_BYTES}-byte limit"
        )
    return data


def make_item(
    group: FeatureGroup, entity_id: str, ts: int, event_id: str, features: Mapping[str, Any]
) -> Item:
    """Build a checked item; raises `ValidationError` for anything that does not fit."""
    if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts <= 10**13 - 1:
        raise ValidationError(f"ts must be epoch milliseconds (0..9999999999999), got {quote(ts)}")
    check_id(entity_id)
    return Item(group.name, entity_id, ts, version(ts, event_id), encode(group, features))


def decode(group: FeatureGroup, value: bytes) -> list[Any]:
    """Stored bytes -> wire values, one per feature of the current spec."""
    values: list[Any] = orjson.loads(value)
    missing = len(group.features) - len(values)
    return values + [None] * missing if missing > 0 else values[: len(group.features)]


def decode_python(group: FeatureGroup, value: bytes) -> dict[str, Any]:
    """Stored bytes -> {name: Python value} (`set`, `bytes`, ...)."""
    return {
        f.name: to_python(f.type, v)
        for f, v in zip(group.features, decode(group, value), strict=True)
    }


def project(
    group: FeatureGroup, values: Sequence[Any], names: Iterable[str] | None
) -> dict[str, Any]:
    """Wire values -> {name: value} for the requested feature names (all when None)."""
    if names is None:
        return {f.name: v for f, v in zip(group.features, values, strict=True)}
    return {n: values[group.index[n]] for n in names}
