"""Feature types: parsing the spec's type strings and checking values.

A value is kept in its *wire form*, the JSON form the HTTP API answers with:
sets as sorted lists without duplicates, bytes as base64 text, vectors as
lists of floats. `coerce` turns an event payload value (or a Python value:
`bytes`, `set`, ...) into wire form or raises `ValidationError`;
`to_python` turns wire form back into Python values (`set`, `bytes`, ...).
Ints are signed 64-bit, as in Kafka, DynamoDB and most feature consumers.

Vectors are float32, as embeddings are: `pack_vector` checks one and packs it
little-endian (the item codec stores it so, 4 bytes a float), `unpack_vector`
reads it back. A vector's wire form is therefore each float rounded to the
nearest float32, written as the float64 that equals it exactly: 0.1 is
answered as 0.10000000149011612, what `numpy.float32(0.1).item()` and
`array.tolist()` give, and what parses back to the same float32 in any
language. (Printing the shortest float32 text, `0.1`, would cost ~100 us a
768-d vector through numpy, which featureplane does not need, and ~1 ms in
pure Python, against ~15 us; compare embeddings with a tolerance: float32
keeps 24 bits, a relative error up to 6e-8.) As for floats, NaN and
infinities are refused, and so is a finite value beyond float32's range
(|x| > 3.4028235e38), whose nearest float32 is an infinity.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from featureplane.errors import ValidationError, quote

__all__ = [
    "INT_MAX",
    "INT_MIN",
    "MAX_ITEM_BYTES",
    "MAX_VECTOR_DIM",
    "PACKED_HEAD_BYTES",
    "FeatureType",
    "coerce",
    "pack_vector",
    "packed_floor",
    "parse_type",
    "to_python",
    "unpack_vector",
]

Kind = Literal["string", "int", "float", "bool", "bytes", "list", "set", "map", "vector"]
SCALARS = ("string", "int", "float", "bool", "bytes")
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
MAX_ITEM_BYTES = 8 * 1024
"""The most bytes one encoded item may take (`featureplane.codec`)."""
PACKED_HEAD_BYTES = 3
"""A packed item's format byte and vector count, before 4 bytes a vector of its table."""
MAX_VECTOR_DIM = 2044
"""The most floats a `vector<float,N>` may hold: one item holding only such a vector
(4 bytes a float after 13 bytes of header and `[null]`, see `featureplane.codec`) is
8,189 bytes, within the 8 KiB item limit. Vectors of one group share that limit with its
other features, and a spec whose vectors cannot fit one item together is refused."""
MAX_TYPE_DEPTH = 32  # map<string,list<float>> is 3; 5,000 raised RecursionError
MAX_TYPE_CHARS = 256


@dataclass(frozen=True, slots=True)
class FeatureType:
    """A parsed type: a scalar, or a container of `item`, or a vector of `dim` floats."""

    kind: Kind
    item: FeatureType | None = None
    dim: int = 0

    def __str__(self) -> str:
        if self.kind == "vector":
            return f"vector<float,{self.dim}>"
        if self.kind == "map":
            return f"map<string,{self.item}>"
        if self.item is not None:
            return f"{self.kind}<{self.item}>"
        return self.kind


_VECTOR = re.compile(r"vector<\s*float\s*,\s*(\d+)\s*>")
_MAP = re.compile(r"map<\s*string\s*,\s*(.+)>")
_CONTAINER = re.compile(r"(list|set)<\s*(.+)>")


def parse_type(text: str) -> FeatureType:
    """Parse `int`, `set<string>`, `map<string,list<float>>`, `vector<float,64>`..."""
    if len(text) > MAX_TYPE_CHARS:
        raise ValueError(f"type is longer than {MAX_TYPE_CHARS} characters")
    return _parse_type(text, 1)


def _parse_type(text: str, depth: int) -> FeatureType:
    if depth > MAX_TYPE_DEPTH:
        raise ValueError(f"type is nested more than {MAX_TYPE_DEPTH} levels deep")
    text = text.strip()
    if text in SCALARS:
        return FeatureType(text)  # type: ignore[arg-type]
    if m := _VECTOR.fullmatch(text):
        dim = int(m.group(1))
        if not 1 <= dim <= MAX_VECTOR_DIM:
            raise ValueError(
                f"vector dimension must be 1..{MAX_VECTOR_DIM} (what fits one 8 KiB item "
                f"at 4 bytes a float), got {quote(dim, 20)}"
            )
        return FeatureType("vector", dim=dim)
    if m := _MAP.fullmatch(text):
        return FeatureType("map", item=_parse_type(m.group(1), depth + 1))
    if m := _CONTAINER.fullmatch(text):
        item = _parse_type(m.group(2), depth + 1)
        if m.group(1) == "set" and item.kind not in SCALARS:
            raise ValueError(f"set elements must be a scalar type, got {item}")
        return FeatureType(m.group(1), item=item)  # type: ignore[arg-type]
    raise ValueError(
        f"unknown type {quote(text)} (expected string, int, float, bool, bytes, list<T>, "
        "set<T>, map<string,T> or vector<float,N>)"
    )


def coerce(t: FeatureType, value: Any, where: str = "value") -> Any:
    """Check `value` against `t` and return its wire form; `None` stays `None`."""
    if value is None:
        return None
    match t.kind:
        case "string":
            if isinstance(value, str):
                return value
        case "int":
            if isinstance(value, int) and not isinstance(value, bool):
                if INT_MIN <= value <= INT_MAX:
                    return value
                raise ValidationError(f"{where}: int {value} is outside signed 64-bit")
        case "float":
            if isinstance(value, int | float) and not isinstance(value, bool):
                try:
                    f = float(value)
                except OverflowError:  # an int beyond float64: 10**400
                    f = math.inf
                if math.isfinite(f):
                    return f
                raise ValidationError(f"{where}: float must be finite, got {quote(value, 40)}")
        case "bool":
            if isinstance(value, bool):
                return value
        case "bytes":
            return _bytes_wire(value, where)
        case "list":
            if isinstance(value, list | tuple):
                assert t.item is not None
                return [coerce(t.item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        case "set":
            if isinstance(value, list | tuple | set | frozenset):
                assert t.item is not None
                items = {coerce(t.item, v, f"{where}[]") for v in value}
                items.discard(None)
                return sorted(items)
        case "map":
            if isinstance(value, Mapping):
                assert t.item is not None
                out = {}
                for k, v in value.items():
                    if not isinstance(k, str):
                        raise ValidationError(f"{where}: map keys must be strings, got {quote(k)}")
                    out[k] = coerce(t.item, v, f"{where}.{k}")
                return out
        case "vector":
            return unpack_vector(pack_vector(t, value, where))
    raise ValidationError(f"{where}: expected {t}, got {type(value).__name__} {quote(value, 40)}")


def to_python(t: FeatureType, wire: Any) -> Any:
    """Turn a wire-form value back into Python values (`set`, `bytes`, nested)."""
    if wire is None:
        return None
    match t.kind:
        case "bytes":
            return base64.b64decode(wire)
        case "set":
            assert t.item is not None
            return {to_python(t.item, v) for v in wire}
        case "list":
            assert t.item is not None
            return [to_python(t.item, v) for v in wire]
        case "map":
            assert t.item is not None
            return {k: to_python(t.item, v) for k, v in wire.items()}
    return wire


_FLOAT = FeatureType("float")
_BIG_ENDIAN = sys.byteorder == "big"


def _f32(dim: int) -> struct.Struct:
    # One Struct a dimension, made once: `Struct.pack(*v)` is the fastest packer measured
    # here (12 us for 768 floats against 26 us for `array("f", v).tobytes()`), and it
    # refuses a finite float beyond float32's range (OverflowError) instead of storing inf.
    s = _STRUCTS.get(dim)
    if s is None:
        s = _STRUCTS[dim] = struct.Struct(f"<{dim}f")
    return s


_STRUCTS: dict[int, struct.Struct] = {}


def pack_vector(t: FeatureType, value: Any, where: str = "value") -> bytes:
    """Check `value` against the vector type `t` and pack it: `t.dim` float32s, little-endian.

    Raises `ValidationError` naming the first bad element (not a number, NaN or infinite,
    beyond float32's range) or the wrong length.
    """
    if not isinstance(value, list | tuple):
        raise ValidationError(
            f"{where}: expected {t}, got {type(value).__name__} {quote(value, 40)}"
        )
    if len(value) != t.dim:
        raise ValidationError(f"{where}: vector must have {t.dim} floats, got {len(value)}")
    # Fast path, C loops only: plain floats and ints (not bools; counting types took a
    # third less time than a set of them), a finite sum (a NaN or an infinity makes the sum
    # one), and the packer's own range check.
    types = list(map(type, value))
    floats = types.count(float)
    if floats == len(types) or floats + types.count(int) == len(types):
        try:
            if math.isfinite(sum(value)):
                return _f32(t.dim).pack(*value)
        except (OverflowError, struct.error):
            pass  # an int beyond float, a float beyond float32: say which, below
    checked = [coerce(_FLOAT, v, f"{where}[{i}]") for i, v in enumerate(value)]
    for i, f in enumerate(checked):
        try:
            _f32(1).pack(f)
        except OverflowError:
            raise ValidationError(
                f"{where}[{i}]: {f} is beyond the float32 range of a vector"
            ) from None
    return _f32(t.dim).pack(*checked)


def unpack_vector(data: bytes | memoryview) -> list[float]:
    """Packed little-endian float32s -> their exact values as Python floats."""
    floats = array("f")
    floats.frombytes(data)
    if _BIG_ENDIAN:
        floats.byteswap()
    return floats.tolist()


def _bytes_wire(value: Any, where: str) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValidationError(f"{where}: bytes must be base64 text") from None
        return base64.b64encode(raw).decode("ascii")
    raise ValidationError(f"{where}: expected bytes (base64), got {type(value).__name__}")


def packed_floor(types: Sequence[FeatureType]) -> int:
    """The fewest bytes an item of features of `types` takes with every `vector<float,N>`
    set and everything else null: the packed layout of `featureplane.codec`."""
    dims = [t.dim for t in types if t.kind == "vector"]
    json_nulls = 1 + 5 * len(types)  # `[null,null]`: 4 a null, a comma between, brackets
    if not dims:
        return json_nulls
    return PACKED_HEAD_BYTES + 4 * len(dims) + json_nulls + 4 * sum(dims)
