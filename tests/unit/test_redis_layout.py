"""The pure layout functions of the Redis tier: members, bounds and batch planning."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.exceptions import DataError

from featureplane.codec import make_item
from featureplane.errors import ValidationError
from featureplane.keys import newest, version
from featureplane.spec import load_catalog
from featureplane.stores._redis_conn import c_packing
from featureplane.stores.redis_layout import (
    VERSION_LEN,
    key_of,
    lex_range,
    member_of,
    record_of,
    records_of,
    stored_of,
    through_call,
    through_chunks,
    timeseries_members,
)

CATALOG = load_catalog(Path(__file__).parent.parent / "contract" / "catalog.yaml")
SMALL = CATALOG.group("small")
T0 = 1_763_800_000_000


def test_version_length_matches_keys() -> None:
    assert len(version(0, "")) == len(version(10**13 - 1, "x" * 100)) == VERSION_LEN


def test_member_round_trips_to_a_record() -> None:
    item = make_item(SMALL, "u1", T0, "e", {"x": 3})
    record = record_of(member_of(item))
    assert (record.ts, record.version, record.value) == (T0, item.version, b"[3]")
    assert stored_of(record) == member_of(item)
    assert records_of(None) == [] and records_of([]) == []
    assert records_of(member_of(item)) == [record] == records_of([member_of(item)])


def test_keys_are_utf8_and_bad_text_is_rejected() -> None:
    assert key_of("fp:", "g", "ü#1") == "fp:g#ü#1".encode()
    with pytest.raises(ValidationError):
        key_of("fp:", "g", "\ud800")


def test_lex_range_is_inclusive_at_both_ends() -> None:
    high, low = lex_range(T0, T0 + 5)
    inside = [version(T0, "a").encode() + b"[1]", version(T0 + 5, "b").encode() + b"[1]"]
    outside = [version(T0 - 1, "a").encode() + b"[1]", version(T0 + 6, "b").encode() + b"[1]"]
    assert all(low[1:] <= m <= high[1:] for m in inside)
    assert not any(low[1:] <= m <= high[1:] for m in outside)
    assert lex_range(None, None) == (b"[9999999999999#~", b"[0000000000000")


def test_timeseries_members_dedupe_filter_and_cap() -> None:
    items = [make_item(SMALL, "u", T0 + i, f"e{i}", {"x": i}) for i in range(10)]
    replay = make_item(SMALL, "u", T0 + 9, "e9", {"x": 99})
    got = timeseries_members([*items, replay], max_items=3, cutoff=None)
    assert [record_of(m).value for m in got] == [b"[7]", b"[8]", b"[99]"]
    got = timeseries_members(items, max_items=50, cutoff=T0 + 8)
    assert [record_of(m).ts for m in got] == [T0 + 8, T0 + 9]
    assert timeseries_members(items, max_items=50, cutoff=T0 + 10) == []


def test_latest_winner_is_the_greatest_version_whatever_the_order() -> None:
    profile = CATALOG.group("profile")
    items = [make_item(profile, "u", T0 + i % 3, f"e{i}", {"updated_by": str(i)}) for i in range(9)]
    best = max(items, key=lambda i: i.version)
    assert newest(items) == best == newest(items[::-1])


def test_through_chunks_cap_size_and_keep_one_slot_per_call() -> None:
    entries = [(f"k{i}".encode(), f"n{i}".encode(), [b"l", 1, b"m"]) for i in range(10)]
    plain = through_chunks(entries, 4, None)
    assert [len(c) for c in plain] == [4, 4, 2] and [e for c in plain for e in c] == entries
    # under a cluster, value keys and markers go to the call of their own slot
    cluster = through_chunks(entries, 3, lambda key: key[-1] % 2)
    for chunk in cluster:
        assert len(chunk) <= 3
        assert len({k[-1] % 2 for key, neg, _ in chunk for k in (key, neg) if k}) == 1
    _, keys, args = through_call(cluster[0])
    assert len(keys) == 3 and args[0] == sum(1 for key, _, _ in cluster[0] if key is not None)
    assert sorted(k for c in cluster for key, neg, _ in c for k in (key, neg) if k) == sorted(
        k for key, neg, _ in entries for k in (key, neg)
    )


def test_through_call_puts_value_keys_before_markers() -> None:
    entries = [
        (b"a", b"na", [b"l", 5, b"m"]),
        (None, b"nb", []),
        (b"c", b"nc", [b"t", 6, 3, "", 1, b"x"]),
    ]
    _, keys, args = through_call(entries)
    assert keys == [b"a", b"c", b"na", b"nb", b"nc"]
    assert args == [2, b"l", 5, b"m", b"t", 6, 3, "", 1, b"x"]


def test_c_packing_sends_the_bytes_redis_py_would() -> None:
    from redis.asyncio.connection import Connection

    packed = c_packing(Connection, {})
    assert packed is not Connection  # hiredis is a dependency here
    commands = [
        ("EVALSHA", "ab" * 20, 2, b"k1", "k\u00e9", b"l", 300_000, -7, 0.1, b"\x00\xff", ""),
        ("SCRIPT LOAD", "return 1"),
        (b"CONFIG GET", b"maxmemory"),
    ]
    for cmd in commands:
        assert b"".join(packed().pack_command(*cmd)) == b"".join(Connection().pack_command(*cmd))
    with pytest.raises(DataError):  # what redis-py raises for a type it cannot send
        packed().pack_command("SET", "k", None)
    assert c_packing(Connection, {"encoding": "latin-1"}) is Connection
