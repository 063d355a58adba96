"""`quote`: the one helper that bounds user input quoted in an error message."""

from __future__ import annotations

import sys

from featureplane.errors import quote


def _nested(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    return value


def test_quote_is_bounded_whatever_the_input() -> None:
    deep_dict: dict[str, object] = {}
    node = deep_dict
    for _ in range(10_000):
        node["a"] = node = {}
    cases: list[object] = [
        _nested(sys.getrecursionlimit() * 10),
        deep_dict,
        "x" * 1_000_000,
        b"\xff" * 100_000,
        list(range(100_000)),
        10**5000,  # past Python's int-to-text limit: repr() raises
        float("nan"),
    ]
    for value in cases:
        text = quote(value)
        assert 0 < len(text) <= 80, text


def test_quote_keeps_short_values_readable() -> None:
    assert quote("bike") == "'bike'"
    assert quote(42) == "42"
    assert quote([1, [2, [3, [4]]]]) == "[1, [2, [3, [...]]]]"
    assert quote("y" * 500, limit=20) == repr("y" * 500)[:17] + "..."
