"""Item codec: feature values by spec index, encoded with orjson, vectors packed.

An item's value is the JSON array of its features' wire forms in spec
order (`["a", "1111"]`), Karrot's `{"0": "a", "1": "1111"}` without the
keys. Features appended to a spec later decode as `None` for old items.
One encoded item is at most 8 KiB (`MAX_ITEM_BYTES`).

An item with a `vector<float,N>` feature set is written *packed*, so that a
768-d embedding takes 3,072 bytes, not ~15 KiB of JSON floats:

    offset     size     what
    0          1        0x01, the format byte of this layout
    1          2        K, how many vectors are packed (uint16, little-endian)
    3          4 K      per vector, in spec order: its feature's index, then its
                        dimension N (two uint16, little-endian)
    3 + 4 K    ...      the JSON array above, `null` where a packed vector goes
    ...        4 N a    each vector's floats in the table's order: float32,
               vector   little-endian, ending the value

The JSON part ends where the floats begin: the value's length minus 4 bytes a
float of the table. The first byte tells the two forms apart: orjson writes
an array starting with `[` (0x5B), so every item written before this layout,
and every item still written without a vector, starts with `[`, and no packed
one does. A later layout takes another byte below 0x5B; `decode` refuses a
byte it does not know (`StoreError`) rather than guess. Only a feature whose
type is `vector<float,N>` is packed; a vector inside a list or map is JSON,
rounded to float32 all the same (`featureplane.types`). `decode` is the one
reader of both forms, and reads them forever.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from featureplane.errors import ItemTooLargeError, StoreError, ValidationError, quote
from featureplane.keys import check_id, version
from featureplane.spec import FeatureGroup
from featureplane.types import (
    INT_MAX,
    INT_MIN,
    MAX_ITEM_BYTES,
    coerce,
    pack_vector,
    to_python,
    unpack_vector,
)

__all__ = [
    "MAX_ITEM_BYTES",
    "PACKED",
    "Item",
    "Record",
    "decode",
    "decode_many",
    "decode_python",
    "encode",
    "make_item",
    "project",
]

PACKED = 0x01
"""The first byte of a packed item (the layout in the module docstring)."""
_HEAD = struct.Struct("<BH")
_JSON = b"["
"""The first byte of every item written as a JSON array (old items, items without a vector)."""


@dataclass(slots=True)
class Item:
    """One item to write: a group's features of one id at one event time.

    Not frozen, as `Record`: ingest builds ~2.4 an event, and a frozen dataclass's
    `__init__` costs ~5x a plain one's. Nothing changes an item once built.
    """

    group: str
    id: str
    ts: int
    version: str
    value: bytes


@dataclass(slots=True)
class Record:
    """One item as read back: newest-first lists of these answer a query.

    Not frozen, unlike featureplane's other records: a read builds one per stored item (31
    for a timeseries answer of 30), and a frozen dataclass's `__init__` sets each field
    through `object.__setattr__`: 595 -> 183 ns to build one here, `records_of` of a
    30-item Redis reply 32.7 -> 19.1 us. Nothing changes a record
    once built: treat it as frozen.
    """

    ts: int
    version: str
    value: bytes


def encode(group: FeatureGroup, features: Mapping[str, Any]) -> bytes:
    """Check `features` (name -> value) against `group` and encode them by index."""
    values: list[Any] = [None] * len(group.features)
    index, specs = group.index, group.features
    packed: list[tuple[int, bytes]] = []
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
        elif t.kind == "vector":
            packed.append((i, pack_vector(t, value, name)))
        else:
            values[i] = coerce(t, value, name)
    try:
        data = orjson.dumps(values)
    except TypeError as exc:  # e.g. an int beyond 64 bits inside a container
        raise ValidationError(f"cannot encode features: {exc}") from None
    # The size is checked before the table is packed: within the limit, every index and
    # dimension fits its uint16 whatever the spec holds.
    vectors = sum(len(floats) for _, floats in packed) if packed else 0  # no generator: ~0.5 us
    size = len(data) + (_HEAD.size + 4 * len(packed) + vectors if packed else 0)
    if size > MAX_ITEM_BYTES:
        raise ItemTooLargeError(
            f"item of group {group.name!r} is {size} bytes encoded, "
            f"over the {MAX_ITEM_BYTES}-byte limit"
            + (f" (its vectors take {vectors} bytes, 4 a float)" if vectors else "")
        )
    if packed:
        packed.sort()  # spec order, whatever order `features` named them in
        table = [n for i, floats in packed for n in (i, len(floats) // 4)]
        head = _HEAD.pack(PACKED, len(packed)) + struct.pack(f"<{len(table)}H", *table)
        data = b"".join([head, data, *(floats for _, floats in packed)])
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
    """Stored bytes (either form) -> wire values, one per feature of the current spec;
    `StoreError` for bytes that are neither form."""
    # `decode_many`'s steps for one item, without its lists (a latest group's render took
    # 3.7 us through them, 2.8 us so); tests/unit/test_codec_vectors.py pins the two equal.
    try:
        values = orjson.loads(value) if value[:1] == _JSON else _unpack(group, value)
    except orjson.JSONDecodeError as exc:
        raise _corrupt(group, exc) from None
    n = len(group.features)
    return values if len(values) == n else _fit(values, n)


def decode_many(group: FeatureGroup, values: Iterable[bytes]) -> list[list[Any]]:
    """`decode` of each item of `values` (items of `group`), in order.

    One pass with no Python call per JSON item (a 30-item answer spent more time in
    `decode`'s calls than in orjson). Each item is parsed alone: one `orjson.loads` of the
    items joined into one array was ~2 us a 30-item answer faster, but cannot tell where an
    item ends, so corrupt items that balance each other would pass as others' values.
    """
    loads = orjson.loads
    try:
        rows: list[list[Any]] = [loads(v) if v[:1] == _JSON else _unpack(group, v) for v in values]
    except orjson.JSONDecodeError as exc:
        raise _corrupt(group, exc) from None
    n = len(group.features)
    return [r if len(r) == n else _fit(r, n) for r in rows]


def _fit(values: list[Any], n: int) -> list[Any]:
    """`values` as the current spec's `n` features: None for features added since."""
    return values + [None] * (n - len(values)) if len(values) < n else values[:n]


def _corrupt(group: FeatureGroup, exc: Exception) -> StoreError:
    return StoreError(f"a stored item of group {group.name!r} is not a valid encoding: {exc}")


def _unpack(group: FeatureGroup, value: bytes) -> list[Any]:
    """A packed item -> its wire values (the layout in the module docstring)."""
    try:
        marker, count = _HEAD.unpack_from(value)
        if marker != PACKED:
            raise ValueError(f"unknown format byte {marker:#04x} (a newer featureplane's?)")
        table = struct.unpack_from(f"<{2 * count}H", value, _HEAD.size)
        start = _HEAD.size + 4 * count
        end = len(value) - 4 * sum(table[1::2])
        if end <= start:
            raise ValueError("its vectors' table says more floats than it holds")
        view = memoryview(value)
        values = orjson.loads(view[start:end])
        if not isinstance(values, list):
            raise ValueError("its JSON part is not an array")
        for slot, dim in zip(table[::2], table[1::2], strict=True):
            values[slot] = unpack_vector(view[end : end + 4 * dim])
            end += 4 * dim
    except (ValueError, LookupError, TypeError, struct.error) as exc:
        raise _corrupt(group, exc) from None
    return values


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
