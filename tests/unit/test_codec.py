"""Keys, types and the item codec without any store."""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from featureplane.codec import (
    MAX_ITEM_BYTES,
    Record,
    decode,
    decode_python,
    encode,
    make_item,
    project,
)
from featureplane.errors import ItemTooLargeError, ValidationError
from featureplane.keys import (
    MAX_ID_BYTES,
    check_id,
    newest,
    partition_key,
    replaces,
    ts_of,
    version,
    version_bounds,
)
from featureplane.spec import FeatureGroup
from featureplane.types import coerce, parse_type

GROUP = FeatureGroup.model_validate(
    {
        "name": "g",
        "entity": "u",
        "kind": "latest",
        "features": [
            {"name": "s", "type": "string"},
            {"name": "i", "type": "int"},
            {"name": "f", "type": "float"},
            {"name": "raw", "type": "bytes"},
            {"name": "tags", "type": "set<string>"},
            {"name": "m", "type": "map<string,int>"},
            {"name": "v", "type": "vector<float,3>"},
        ],
    }
)


def test_keys() -> None:
    assert partition_key("recent", "1234") == "recent#1234"
    v = version(987654321, "event-1")
    assert v.startswith("0000987654321#") and len(v) == 26 and ts_of(v) == 987654321
    assert version(987654321, "event-1") == v  # a replay gets the same sort key
    assert version(987654321, "event-2") != v  # a second event in the same ms survives
    low, high = version_bounds(100, 200)
    assert low <= version(100, "a") <= high and low <= version(200, "zz") <= high
    assert not low <= version(99, "a") <= high and not version(201, "a") <= high


def test_stored_form_is_values_by_index() -> None:
    data = encode(GROUP, {"s": "a", "tags": ["y", "x", "y"], "raw": b"\x00\xff"})
    assert orjson.loads(data) == ["a", None, None, "AP8=", ["x", "y"], None, None]


def test_type_errors_name_the_feature() -> None:
    with pytest.raises(ValidationError, match="i: expected int, got str"):
        encode(GROUP, {"i": "7"})
    with pytest.raises(ValidationError, match="v: vector must have 3 floats, got 2"):
        encode(GROUP, {"v": [1, 2]})
    with pytest.raises(ValidationError, match="outside signed 64-bit"):
        encode(GROUP, {"i": 2**63})
    with pytest.raises(ValidationError, match="bytes must be base64"):
        encode(GROUP, {"raw": "not base64!"})
    with pytest.raises(ValidationError, match="no feature 'nope'"):
        encode(GROUP, {"nope": 1})
    with pytest.raises(ValidationError, match="expected int, got bool"):
        encode(GROUP, {"i": True})
    with pytest.raises(ValidationError, match="finite"):
        encode(GROUP, {"f": math.inf})


def test_size_limit() -> None:
    with pytest.raises(ItemTooLargeError):
        encode(GROUP, {"s": "x" * MAX_ITEM_BYTES})
    assert len(encode(GROUP, {"s": "x" * (MAX_ITEM_BYTES - 40)})) <= MAX_ITEM_BYTES


def test_bad_ts() -> None:
    for ts in (-1, 10**13, "1", 1.5, True):
        with pytest.raises(ValidationError, match="ts must be epoch milliseconds"):
            make_item(GROUP, "u", ts, "e", {})  # type: ignore[arg-type]


def test_features_appended_later_decode_as_none() -> None:
    old = orjson.dumps(["a", 1])
    assert decode(GROUP, old) == ["a", 1, None, None, None, None, None]
    assert project(GROUP, decode(GROUP, old), ["i", "s"]) == {"i": 1, "s": "a"}


@given(
    s=st.text(),
    i=st.integers(-(2**63), 2**63 - 1),
    f=st.floats(allow_nan=False, allow_infinity=False),
    raw=st.binary(),
    tags=st.sets(st.text()),
    m=st.dictionaries(st.text(), st.integers(-(2**63), 2**63 - 1)),
    # Floats that float32 holds exactly come back as given (vectors are float32: rounding
    # is tested in test_codec_vectors.py).
    v=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=3, max_size=3),
)
def test_round_trip(s, i, f, raw, tags, m, v) -> None:  # type: ignore[no-untyped-def]
    values = {"s": s, "i": i, "f": f, "raw": raw, "tags": tags, "m": m, "v": v}
    try:
        data = encode(GROUP, values)
    except ItemTooLargeError:
        return
    assert decode_python(GROUP, data) == values


def test_coerce_accepts_json_and_python_forms() -> None:
    t = parse_type("set<bytes>")
    assert coerce(t, [b"b", b"a"]) == coerce(t, ["Yg==", "YQ=="]) == ["YQ==", "Yg=="]
    assert coerce(parse_type("float"), 3) == 3.0


def test_check_id_fast_path_keeps_the_limits() -> None:
    assert check_id("u" * MAX_ID_BYTES) == "u" * MAX_ID_BYTES
    with pytest.raises(ValidationError, match="over the"):
        check_id("u" * (MAX_ID_BYTES + 1))
    with pytest.raises(ValidationError, match="over the"):
        check_id("\u00e9" * (MAX_ID_BYTES // 2 + 1))  # 2 bytes a character
    with pytest.raises(ValidationError, match="unicode"):
        check_id("a\ud800")


def test_newest_wins_and_an_equal_version_is_a_replay() -> None:
    old, new = version(1_000, "a"), version(1_001, "a")
    tie_low, tie_high = sorted([version(1_000, "x"), version(1_000, "y")])
    assert replaces(new, old) and not replaces(old, new)
    assert replaces(tie_high, tie_low) and not replaces(tie_low, tie_high)
    assert replaces(new, new)  # the same event again: rewritten, never refused
    first, again = Record(1_001, new, b"[1]"), Record(1_001, new, b"[1]")
    assert newest([first, again]) is again
    older = Record(1_000, old, b"[0]")
    for order in ([older, first], [first, older]):
        assert newest(order) is first
