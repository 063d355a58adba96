"""Vectors in the item encoding: packed float32 (the layout in `featureplane.codec`),
old JSON items read as before, float32 rounding, and what fits one 8 KiB item."""

from __future__ import annotations

import functools
import math
import struct
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featureplane.codec import (
    MAX_ITEM_BYTES,
    PACKED,
    decode,
    decode_many,
    decode_python,
    encode,
    project,
)
from featureplane.errors import ItemTooLargeError, StoreError, ValidationError
from featureplane.spec import FeatureGroup
from featureplane.types import MAX_VECTOR_DIM, parse_type

F32_MAX = 3.4028234663852886e38


def group(*features: tuple[str, str]) -> FeatureGroup:
    return FeatureGroup.model_validate(
        {
            "name": "g",
            "entity": "article",
            "kind": "latest",
            "features": [{"name": n, "type": t} for n, t in features],
        }
    )


@functools.cache
def embedding_group(dim: int) -> FeatureGroup:
    return group(
        ("embedding", f"vector<float,{dim}>"),
        ("model", "string"),
        ("score", "float"),
        ("version", "int"),
    )


FITS = MAX_VECTOR_DIM - 3
"""The longest embedding `embedding_group` may hold: its three other features' nulls take
the 12 bytes of 3 floats (`validate` refuses a group whose vectors cannot fit one item)."""


def f32(values: list[Any]) -> list[float]:
    """Each value rounded to the nearest float32, as Python floats."""
    return [struct.unpack("<f", struct.pack("<f", v))[0] for v in values]


TWO = group(("s", "string"), ("a", "vector<float,3>"), ("n", "int"), ("b", "vector<float,2>"))


def test_the_packed_layout_is_pinned() -> None:
    """The bytes of a packed item, byte by byte: stored items are read forever."""
    data = encode(TWO, {"b": [0.5, -2], "s": "x", "a": [1.0, 0.0, -0.25], "n": 7})
    assert data == (
        b"\x01"  # format byte
        + b"\x02\x00"  # two vectors
        + b"\x01\x00\x03\x00"  # feature 1 (a), 3 floats
        + b"\x03\x00\x02\x00"  # feature 3 (b), 2 floats
        + b'["x",null,7,null]'
        + struct.pack("<3f", 1.0, 0.0, -0.25)
        + struct.pack("<2f", 0.5, -2.0)
    )
    assert data[0] == PACKED != ord("[")
    assert decode(TWO, data) == ["x", [1.0, 0.0, -0.25], 7, [0.5, -2.0]]


def test_an_item_without_a_vector_is_json_as_before() -> None:
    assert encode(TWO, {"s": "x", "n": 7}) == b'["x",null,7,null]'
    assert encode(TWO, {"s": "x", "a": None}) == b'["x",null,null,null]'


def test_old_json_items_decode_as_before() -> None:
    """Items written before packing hold vectors as JSON float64s: read unrounded."""
    old = orjson.dumps(["x", [0.1, 0.2, 1e-300], 7, [0.3, 1 / 3]])
    assert decode(TWO, old) == ["x", [0.1, 0.2, 1e-300], 7, [0.3, 1 / 3]]
    assert decode_python(TWO, orjson.dumps(["x", [0.1, 0.2, 0.3]])) == {
        "s": "x",
        "a": [0.1, 0.2, 0.3],
        "n": None,
        "b": None,
    }
    # A packed item of a spec that gained features later: they decode as None too.
    two = group(("s", "string"), ("a", "vector<float,3>"))
    packed = encode(two, {"s": "y", "a": [1, 2, 3]})
    assert decode(TWO, packed) == ["y", [1.0, 2.0, 3.0], None, None]
    assert project(TWO, decode(TWO, packed), ["a"]) == {"a": [1.0, 2.0, 3.0]}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    dim=st.integers(1, FITS) | st.integers(FITS - 8, FITS),
    with_scalars=st.booleans(),
)
def test_round_trip_is_the_float32_rounding_of_the_input(
    data: st.DataObject, dim: int, with_scalars: bool
) -> None:
    number = st.floats(-F32_MAX, F32_MAX) | st.integers(-(2**24), 2**24)
    # Hypothesis draws a few hundred values at most; longer vectors repeat them.
    drawn = data.draw(st.lists(number, min_size=1, max_size=min(dim, 200)))
    vector = (drawn * (dim // len(drawn) + 1))[:dim]
    scalars = ["m", 0.5, 3] if with_scalars else [None, None, None]
    g = embedding_group(dim)
    features = dict(
        zip(("embedding", "model", "score", "version"), [vector, *scalars], strict=True)
    )
    size = 7 + len(orjson.dumps([None, *scalars])) + 4 * dim  # the layout's arithmetic
    if size > MAX_ITEM_BYTES:
        with pytest.raises(ItemTooLargeError, match=f"is {size} bytes encoded"):
            encode(g, features)
        return
    encoded = encode(g, features)
    assert len(encoded) == size
    assert decode(g, encoded) == [f32(vector), *scalars]
    assert encode(g, features | {"embedding": f32(vector)}) == encoded  # the answer re-sent


def test_float32_rounding_on_the_wire() -> None:
    """The API answers the stored float32 exactly, as the float64 equal to it."""
    g = group(("v", "vector<float,6>"))
    sent = [0.1, 1 / 3, 1e-46, 1e-45, F32_MAX, -7]
    back = decode(g, encode(g, {"v": sent}))[0]
    assert back == [0.10000000149011612, 0.3333333432674408, 0.0, 1.401298464324817e-45, *sent[4:]]
    assert orjson.dumps(back).startswith(b"[0.10000000149011612,0.3333333432674408,0.0,")
    # Normal floats are within float32's relative precision (subnormals are not).
    assert all(math.isclose(a, b, rel_tol=2**-24) for a, b in zip(back[:2], sent[:2], strict=True))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1.0, math.nan, 0.0], r"v\[1\]: float must be finite, got nan"),
        ([1.0, 0.0, -math.inf], r"v\[2\]: float must be finite, got -inf"),
        ([3.5e38, 0.0, 0.0], r"v\[0\]: 3.5e\+38 is beyond the float32 range"),
        ([0.0, -3.4028235677973366e38, 0.0], r"v\[1\]: .* beyond the float32 range"),
        ([10**400, -(10**400), 0], r"v\[0\]: float must be finite"),
        ([0.0, True, 0.0], r"v\[1\]: expected float, got bool"),
        ([0.0, "1", 0.0], r"v\[1\]: expected float, got str"),
        ([0.0, 1.0], "v: vector must have 3 floats, got 2"),
        ("1,2,3", "v: expected vector<float,3>, got str"),
        ({"a": 1}, "v: expected vector<float,3>, got dict"),
    ],
)
def test_bad_vectors_are_refused_naming_the_element(value: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        encode(group(("v", "vector<float,3>")), {"v": value})


def test_a_768d_embedding_and_scalars_fit_one_item() -> None:
    g = embedding_group(768)
    features = {"embedding": [i / 768 for i in range(768)], "model": "clip-vit-b32-2026-11"}
    data = encode(g, features | {"score": 0.87, "version": 12})
    assert len(data) == 7 + len(b'[null,"clip-vit-b32-2026-11",0.87,12]') + 768 * 4
    assert len(data) < MAX_ITEM_BYTES // 2
    assert decode_python(g, data)["embedding"] == f32(features["embedding"])


def test_the_largest_dimension_fits_alone_and_a_larger_is_a_spec_error() -> None:
    alone = group(("v", f"vector<float,{MAX_VECTOR_DIM}>"))
    assert len(encode(alone, {"v": [1.5] * MAX_VECTOR_DIM})) + 4 > MAX_ITEM_BYTES
    assert len(encode(alone, {"v": [1.5] * MAX_VECTOR_DIM})) <= MAX_ITEM_BYTES
    with pytest.raises(ValueError, match=r"must be 1\.\.2044 \(what fits one 8 KiB item"):
        parse_type("vector<float,2048>")


def test_an_item_over_the_limit_says_what_its_vectors_take() -> None:
    g = embedding_group(FITS)
    with pytest.raises(
        ItemTooLargeError,
        match=r"is 8230 bytes encoded, over the 8192-byte limit \(its vectors take 8164 bytes",
    ):
        encode(g, {"embedding": [0.0] * FITS, "model": "m" * 40})
    two = group(("a", "vector<float,1000>"), ("b", "vector<float,1000>"), ("s", "string"))
    with pytest.raises(ItemTooLargeError, match="its vectors take 8000 bytes"):
        encode(two, {"a": [0.0] * 1000, "b": [0.0] * 1000, "s": "x" * 200})


def test_vectors_inside_containers_are_json_rounded_to_float32() -> None:
    g = group(("vs", "list<vector<float,2>>"), ("m", "map<string,vector<float,1>>"))
    data = encode(g, {"vs": [[0.1, 2], [3, 0.5]], "m": {"k": [0.1]}})
    assert data[:1] == b"["
    assert decode(g, data) == [[[0.10000000149011612, 2.0], [3.0, 0.5]], {"k": [f32([0.1])[0]]}]


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\x02\x00\x00[]",  # a format byte this version does not know
        b"\x01\x01\x00\x00\x00\x03\x00[null]",  # the table names 12 bytes of floats
        b"\x01\x01\x00\x05\x00\x01\x00[null]" + b"\x00" * 4,  # feature 5 of 1
        b"\x01\x01\x00\x00\x00\x01\x00{}" + b"\x00" * 4,  # the JSON part is not an array
        b"\x01\x01\x00\x00\x00\x01\x00[nul" + b"\x00" * 4,
        b"\x01\x05",
    ],
)
def test_a_corrupt_packed_item_is_a_store_error(value: bytes) -> None:
    with pytest.raises(StoreError, match="not a valid encoding"):
        decode(TWO, value)


# ---------------------------------------------------------------- decode_many
OLD_TWO = group(("s", "string"), ("a", "vector<float,3>"))
"""`TWO` as an older spec had it: items written then lack the two later features."""

_floats = st.floats(-1e6, 1e6, width=32)
_features = st.fixed_dictionaries(
    {},
    optional={
        "s": st.text(max_size=4),
        "a": st.lists(_floats, min_size=3, max_size=3),
        "n": st.integers(-(2**40), 2**40),
        "b": st.lists(_floats, min_size=2, max_size=2),
    },
)
_items = st.one_of(
    _features.map(lambda f: encode(TWO, f)),  # packed when a vector is set, else JSON
    _features.map(lambda f: encode(OLD_TWO, {k: v for k, v in f.items() if k in "sa"})),
    st.builds(orjson.dumps, st.lists(st.integers(-(2**63), 2**63 - 1) | st.text(max_size=3))),
)


@given(values=st.lists(_items, max_size=8), spec=st.sampled_from([TWO, OLD_TWO]))
def test_decode_many_is_decode_of_each_item(values: list[bytes], spec: FeatureGroup) -> None:
    """Mixed packed, JSON and older or newer items: the batch reads each as `decode`."""
    assert decode_many(spec, values) == [decode(spec, v) for v in values]


@given(
    values=st.lists(_items, max_size=5),
    bad=st.binary(max_size=24) | _items.map(lambda v: v[:-1]) | _items.map(lambda v: v + b"]"),
    at=st.integers(0, 5),
)
def test_a_corrupt_item_fails_the_batch_as_it_fails_decode(
    values: list[bytes], bad: bytes, at: int
) -> None:
    values.insert(at, bad)
    try:
        expected = [decode(TWO, v) for v in values]
    except StoreError:
        with pytest.raises(StoreError, match="not a valid encoding"):
            decode_many(TWO, values)
    else:
        assert decode_many(TWO, values) == expected


@pytest.mark.parametrize("value", [b"[1,", b"[1] [2]", b'["a]', b"[", b"[nul]"])
def test_a_corrupt_json_item_is_a_store_error(value: bytes) -> None:
    """Not a JSON error escaping as a bug (serving answers a StoreError 503, not 500)."""
    with pytest.raises(StoreError, match="not a valid encoding"):
        decode(TWO, value)
    with pytest.raises(StoreError, match="not a valid encoding"):
        decode_many(TWO, [encode(TWO, {"s": "x"}), value])
