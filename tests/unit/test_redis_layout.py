"""The pure layout functions of the Redis tier: keys and their hash slots, members, bounds
and batch planning."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot
from redis.exceptions import DataError

from featureplane.codec import make_item
from featureplane.errors import ValidationError
from featureplane.keys import newest, version
from featureplane.spec import load_catalog
from featureplane.stores._redis_conn import c_packing
from featureplane.stores.redis_layout import (
    VERSION_LEN,
    by_slot,
    check_prefix,
    key_of,
    lex_range,
    member_of,
    negative_key_of,
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


def test_keys_are_utf8_tagged_and_bad_text_is_rejected() -> None:
    assert key_of("fp:", "g", "ü#1") == "fp:g{#ü#1}".encode()
    assert negative_key_of("fp:", "g", "ü#1") == "fp:g{#ü#1}:neg".encode()
    with pytest.raises(ValidationError):
        key_of("fp:", "g", "\ud800")


BRACES = st.text(alphabet=st.sampled_from("{}#:ab\u00e9\U0001f600"), max_size=12)
"""Text made mostly of the characters that decide a hash tag."""
IDS = st.one_of(BRACES, st.text(max_size=40).filter(lambda t: t.encode("utf-8", "replace")))
GROUPS = st.from_regex(r"[A-Za-z0-9_]{1,20}", fullmatch=True)


def _tagged(prefix: str) -> bool:
    """False for the prefixes `check_prefix` refuses (an empty tag at the first `{`)."""
    first = prefix.find("{")
    return not (first >= 0 and prefix[first + 1 : first + 2] == "}")


@given(prefix=BRACES.filter(_tagged), group=GROUPS, entity_id=IDS)
def test_a_pairs_keys_share_their_slot_whatever_braces_they_hold(
    prefix: str, group: str, entity_id: str
) -> None:
    try:
        key = key_of(prefix, group, entity_id)
    except ValidationError:  # not valid unicode: refused before any slot matters
        return
    assert key_slot(key) == key_slot(negative_key_of(prefix, group, entity_id))
    assert key != negative_key_of(prefix, group, entity_id)


@given(prefix=BRACES.filter(_tagged), groups=st.tuples(GROUPS, GROUPS), entity_id=IDS)
def test_every_group_of_an_id_shares_its_slot(
    prefix: str, groups: tuple[str, str], entity_id: str
) -> None:
    try:
        one, other = (key_of(prefix, g, entity_id) for g in groups)
    except ValidationError:
        return
    first = prefix.find("{")
    if first >= 0 and prefix.find("}", first + 1) < 0:
        return  # a `{` the prefix leaves open makes the group part of every tag
    assert key_slot(one) == key_slot(other)


@given(prefix=BRACES.filter(_tagged), a=st.tuples(GROUPS, IDS), b=st.tuples(GROUPS, IDS))
def test_no_two_pairs_share_a_key(prefix: str, a: tuple[str, str], b: tuple[str, str]) -> None:
    try:
        keys_a = {key_of(prefix, *a), negative_key_of(prefix, *a)}
        keys_b = {key_of(prefix, *b), negative_key_of(prefix, *b)}
    except ValidationError:
        return
    assert (keys_a == keys_b) == (a == b) and (a == b or not keys_a & keys_b)


def test_plain_ids_spread_over_slots_and_a_prefix_with_an_empty_tag_is_refused() -> None:
    # the tag is the (group, id), not the prefix: ids land on many slots
    assert len({key_slot(key_of("fp:", "g", f"u{i}")) for i in range(100)}) > 90
    assert check_prefix("a{b}:") == "a{b}:"  # legal, though it puts every key in one slot
    for bad in ("{}", "x{}y:", "x{}{y}"):
        with pytest.raises(ValidationError, match="empty hash tag"):
            check_prefix(bad)


def test_by_slot_groups_indexes_in_order() -> None:
    keys = [b"a", b"b", b"c", b"d", b"e"]
    assert by_slot(keys, lambda k: k[0] % 2) == [[0, 2, 4], [1, 3]]
    assert by_slot([], key_slot) == []


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
    entries = [
        (key_of("fp:", "g", f"u{i}"), negative_key_of("fp:", "g", f"u{i}"), [b"l", 1, b"m"])
        for i in range(10)
    ]
    entries.append((None, negative_key_of("fp:", "g", "u0"), []))  # only clears a marker
    plain = through_chunks(entries, 4, None)
    assert [len(c) for c in plain] == [4, 4, 3] and [e for c in plain for e in c] == entries
    # under a cluster an entry stays whole (its keys share a slot), one slot per call
    cluster = through_chunks(entries, 3, key_slot)
    for chunk in cluster:
        assert len(chunk) <= 3
        assert len({key_slot(k) for key, neg, _ in chunk for k in (key, neg) if k}) == 1
    assert sorted(map(repr, (e for c in cluster for e in c))) == sorted(map(repr, entries))
    _, keys, args = through_call(cluster[0])
    assert len(keys) == sum(k is not None for e in cluster[0] for k in e[:2])
    assert args[0] == sum(1 for key, _, _ in cluster[0] if key is not None)
    with pytest.raises(ValueError, match="without a key"):
        through_chunks([(None, None, [])], 3, key_slot)


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
