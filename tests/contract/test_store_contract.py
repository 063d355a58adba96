"""The store contract: every backend must pass every test here, so none can drift."""

from __future__ import annotations

import asyncio
import itertools
import random
import struct
from typing import Any

import pytest

from featureplane.codec import MAX_ITEM_BYTES, PACKED, Item, decode, decode_python, make_item
from featureplane.errors import (
    ItemTooLargeError,
    NotStartedError,
    UnknownGroupError,
    ValidationError,
)
from featureplane.keys import version
from featureplane.stores.base import Query, Store
from tests.contract.conftest import CATALOG, FakeClock

T0 = 1_763_800_000_000
CLICKS = CATALOG.group("clicks")
PROFILE = CATALOG.group("profile")


def click(uid: str, ts: int, n: int, event: str | None = None) -> Item:
    return make_item(CLICKS, uid, ts, event or f"e{uid}-{ts}-{n}", {"article_id": f"a{n}", "n": n})


def ns(records: list[Any], group: Any = CLICKS) -> list[int]:
    return [decode(group, r.value)[group.index["n"] if "n" in group.index else 0] for r in records]


async def read_one(store: Store, q: Query) -> list[Any]:
    return (await store.read([q]))[0]


async def test_timeseries_newest_first_whatever_the_write_order(store: Store) -> None:
    items = [click("u1", T0 + i * 10, i) for i in range(20)]
    random.Random(1).shuffle(items)
    await store.write(items[:7])
    await store.write(items[7:])
    got = await read_one(store, Query("clicks", "u1", limit=50))
    assert ns(got) == list(range(19, -1, -1))
    assert [r.ts for r in got] == [T0 + i * 10 for i in range(19, -1, -1)]


async def test_limit_returns_newest(store: Store) -> None:
    await store.write([click("u1", T0 + i, i) for i in range(10)])
    assert ns(await read_one(store, Query("clicks", "u1", limit=3))) == [9, 8, 7]
    assert ns(await read_one(store, Query("clicks", "u1", limit=1))) == [9]


async def test_since_until_are_inclusive(store: Store) -> None:
    await store.write([click("u1", T0 + i * 100, i) for i in range(10)])
    got = await read_one(store, Query("clicks", "u1", limit=50, since=T0 + 200, until=T0 + 500))
    assert ns(got) == [5, 4, 3, 2]
    got = await read_one(store, Query("clicks", "u1", limit=2, since=T0 + 200, until=T0 + 500))
    assert ns(got) == [5, 4]
    assert ns(await read_one(store, Query("clicks", "u1", limit=50, since=T0 + 850))) == [9]
    assert ns(await read_one(store, Query("clicks", "u1", limit=50, until=T0 + 50))) == [0]
    assert await read_one(store, Query("clicks", "u1", limit=50, since=T0 + 901)) == []


async def test_replayed_events_overwrite_themselves(store: Store) -> None:
    items = [click("u1", T0 + i, i) for i in range(10)]
    await store.write(items)
    await store.write(items)
    await store.write(items[3:6] + items[3:6])  # duplicates inside one batch too
    assert ns(await read_one(store, Query("clicks", "u1", limit=50))) == list(range(9, -1, -1))


async def test_two_events_in_one_millisecond_both_survive(store: Store) -> None:
    await store.write([click("u1", T0, 1, "a"), click("u1", T0, 2, "b"), click("u1", T0, 3, "c")])
    got = await read_one(store, Query("clicks", "u1", limit=50))
    assert sorted(ns(got)) == [1, 2, 3]
    assert {r.ts for r in got} == {T0}


async def test_max_items_keeps_at_least_the_newest(store: Store) -> None:
    await store.write(
        [make_item(CATALOG.group("small"), "u1", T0 + i, f"e{i}", {"x": i}) for i in range(12)]
    )
    got = await read_one(store, Query("small", "u1", limit=5))
    assert [decode(CATALOG.group("small"), r.value)[0] for r in got] == [11, 10, 9, 8, 7]
    got = await read_one(store, Query("small", "u1", limit=500))  # clamped to max_items
    assert len(got) == 5


async def test_latest_newest_ts_wins_in_any_order(store: Store) -> None:
    versions = [
        make_item(PROFILE, "u1", T0 + i, f"k{i}", {"keywords": {f"w{i}"}, "updated_by": str(i)})
        for i in range(30)
    ]
    rnd = random.Random(7)
    for _ in range(3):
        rnd.shuffle(versions)
        for chunk in range(0, 30, 4):
            await store.write(versions[chunk : chunk + 4])
        got = await read_one(store, Query("profile", "u1"))
        assert len(got) == 1
        assert got[0].ts == T0 + 29
        assert decode_python(PROFILE, got[0].value) == {"keywords": {"w29"}, "updated_by": "29"}


async def test_latest_older_event_never_overwrites(store: Store) -> None:
    new = make_item(PROFILE, "u1", T0 + 10, "new", {"keywords": ["bike"], "updated_by": "app"})
    old = make_item(PROFILE, "u1", T0, "old", {"keywords": ["car"], "updated_by": "web"})
    await store.write([new])
    await store.write([old])
    await store.write([old, new, old])
    got = await read_one(store, Query("profile", "u1"))
    assert decode(PROFILE, got[0].value) == [["bike"], "app"]


async def test_latest_tie_on_ts_is_decided_the_same_in_any_order(store: Store) -> None:
    a = make_item(PROFILE, "ua", T0, "event-a", {"updated_by": "a"})
    b = make_item(PROFILE, "ua", T0, "event-b", {"updated_by": "b"})
    winner = max(a, b, key=lambda i: i.version)
    await store.write([a])
    await store.write([b])
    a2 = make_item(PROFILE, "ub", T0, "event-a", {"updated_by": "a"})
    b2 = make_item(PROFILE, "ub", T0, "event-b", {"updated_by": "b"})
    await store.write([b2])
    await store.write([a2])
    got = await store.read([Query("profile", "ua"), Query("profile", "ub")])
    assert got[0][0].value == winner.value
    assert got[1][0].value == winner.value


def _profiles(uid: str) -> tuple[Item, Item, Item]:
    """An older, a newer, and the newer again (the same event replayed) for `uid`."""
    old = make_item(PROFILE, uid, T0, "old", {"updated_by": "old"})
    new, again = (make_item(PROFILE, uid, T0 + 5, "new", {"updated_by": "new"}) for _ in "ab")
    return old, new, again


async def test_latest_older_equal_and_newer_in_any_order_leave_the_newest(store: Store) -> None:
    """The one newest-wins rule (`keys.replaces`): an equal version is the same event, so
    replaying it leaves the stored value as it is and never fails."""
    queries = []
    for n, order in enumerate(itertools.permutations(range(3))):
        for batched in (False, True):
            uid = f"u{n}-{batched}"
            versions = _profiles(uid)
            if batched:
                await store.write([versions[i] for i in order])
            else:
                for i in order:
                    await store.write([versions[i]])
            queries.append(Query("profile", uid))
    for records in await store.read(queries):
        assert len(records) == 1
        assert (records[0].ts, decode(PROFILE, records[0].value)[1]) == (T0 + 5, "new")


async def test_unknown_group_is_an_error_naming_it(store: Store) -> None:
    item = Item("nope", "u1", T0, version(T0, "e"), b"[1]")
    with pytest.raises(UnknownGroupError) as info:
        await store.write([click("u1", T0, 1), item])
    assert info.value.group == "nope"
    with pytest.raises(UnknownGroupError) as info:
        await store.read([Query("clicks", "u1"), Query("nope", "u1")])
    assert info.value.group == "nope"


async def test_use_before_start_or_after_close_is_not_started(
    make_store: Any, clock: FakeClock
) -> None:
    store = make_store(CATALOG, clock)
    for _ in ("before start", "after aclose"):
        with pytest.raises(NotStartedError):
            await store.write([click("u1", T0, 1)])
        with pytest.raises(NotStartedError):
            await store.read([Query("clicks", "u1")])
        with pytest.raises(NotStartedError):
            await store.ping()
        await store.start()
        await store.ping()
        await store.aclose()


@pytest.mark.parametrize(
    "entity_id",
    ["ünïcödé-ユーザー", "a#b#c", "emoji-🥕", "nul\x00byte", "ctl\x01\x7f", " spaced ", "x" * 1018],
    ids=["unicode", "hash", "emoji", "nul", "control", "spaces", "long"],
)
async def test_unicode_and_binary_ids_round_trip(store: Store, entity_id: str) -> None:
    await store.write([click(entity_id, T0, 1), click(entity_id + "-other", T0, 2)])
    await store.write([make_item(PROFILE, entity_id, T0, "e", {"updated_by": entity_id})])
    ts, other, latest = await store.read(
        [
            Query("clicks", entity_id, limit=5),
            Query("clicks", entity_id + "-other", limit=5),
            Query("profile", entity_id),
        ]
    )
    assert ns(ts) == [1] and ns(other) == [2]
    assert decode(PROFILE, latest[0].value)[1] == entity_id


def test_bad_ids_are_rejected() -> None:
    for bad in ["", "x" * 1025, "\ud800"]:
        with pytest.raises(ValidationError):
            click(bad, T0, 1)


async def test_missing_keys_read_empty(store: Store) -> None:
    await store.write([click("present", T0, 1)])
    got = await store.read(
        [
            Query("clicks", "absent", limit=5),
            Query("profile", "absent"),
            Query("clicks", "present", limit=5),
        ]
    )
    assert got[0] == [] and got[1] == [] and ns(got[2]) == [1]


async def test_many_pairs_in_one_read_keep_request_order(store: Store) -> None:
    await store.write([click(f"u{i}", T0 + i, i) for i in range(150)])
    await store.write(
        [make_item(PROFILE, f"u{i}", T0, "e", {"updated_by": str(i)}) for i in range(0, 150, 2)]
    )
    queries = []
    for i in range(149, -1, -1):
        queries += [Query("profile", f"u{i}"), Query("clicks", f"u{i}", limit=5)]
    queries.append(Query("profile", "u0"))  # the same pair twice
    got = await store.read(queries)
    assert len(got) == len(queries)
    for q, records in zip(queries, got, strict=True):
        i = int(q.id[1:])
        if q.group == "clicks":
            assert ns(records) == [i]
        elif i % 2 == 0:
            assert decode(PROFILE, records[0].value)[1] == str(i)
        else:
            assert records == []


async def test_item_size_limit(store: Store) -> None:
    with pytest.raises(ItemTooLargeError, match="8192-byte limit"):
        make_item(PROFILE, "u1", T0, "big", {"updated_by": "x" * MAX_ITEM_BYTES})
    fits = make_item(PROFILE, "u1", T0, "fits", {"updated_by": "y" * (MAX_ITEM_BYTES - 20)})
    assert len(fits.value) <= MAX_ITEM_BYTES
    await store.write([fits])
    assert (await read_one(store, Query("profile", "u1")))[0].value == fits.value


async def test_every_type_round_trips(store: Store) -> None:
    group = CATALOG.group("everything")
    values: dict[str, Any] = {
        "s": 'grüße \u2603 \U0001f955 "quoted" \\ \n',
        "i": -(2**63),
        "f": 0.1 + 0.2,
        "b": False,
        "raw": bytes(range(256)),
        "tags": ["b", "a", "b", ""],
        "ids": {3, 1, 2**63 - 1},
        "counts": {"views": 2**53 + 1, "ключ": 0},
        "nested": {"k": [1e-300, -0.0, 1.5e300]},
        "emb": [0.125, -1.0, 3.4028234663852886e38, 1e-45, 0.0, 2.0, 0.333, -7.5],
    }
    item = make_item(group, "article-1", T0, "e1", values)
    await store.write([item])
    got = await read_one(store, Query("everything", "article-1"))
    emb = list(struct.unpack("<8f", struct.pack("<8f", *values["emb"])))  # float32 rounded
    assert decode_python(group, got[0].value) == values | {"emb": emb}
    partial = make_item(group, "article-2", T0, "e2", {"i": 2**63 - 1})
    await store.write([partial])
    back = decode_python(group, (await read_one(store, Query("everything", "article-2")))[0].value)
    assert back["i"] == 2**63 - 1 and back["s"] is None


def _every_byte() -> list[float]:
    """64 finite float32s whose little-endian bytes hold each byte 0x00-0xff once: the
    high byte of each is 0x00-0x3f (no NaN or infinity), the other 192 bytes the rest."""
    high, low = bytes(range(64)), bytes(range(64, 256))
    packed = b"".join(low[3 * k : 3 * k + 3] + high[k : k + 1] for k in range(64))
    return list(struct.unpack("<64f", packed))


async def test_a_packed_vector_item_and_any_bytes_round_trip(store: Store) -> None:
    """Stores keep values as opaque bytes: a packed item (every byte 0x00-0xff, a 768-d
    embedding with scalars) and raw values that are not UTF-8, replayed with other bytes."""
    group = CATALOG.group("embeddings")
    embedding = _every_byte() + [i / 704 - 0.5 for i in range(704)]
    values = {"embedding": embedding, "model": "m-\u00e9", "score": 0.25, "version": 3}
    item = make_item(group, "a1", T0, "e1", values)
    assert item.value[0] == PACKED and set(item.value) == set(range(256))
    raw = bytes(range(255, -1, -1))  # starts with 0xff: after any version in byte order
    firsts = [raw, b"\x00" + raw, b"\x80\xfe"]
    # The same events again with other bytes (a replay after a spec change): each
    # overwrites its first value, whatever bytes either holds.
    agains = [b"\xfe\xff", raw, raw[1:]]
    for values_ in (firsts, agains):
        ts_items = [
            Item("clicks", "raw", T0 + k, version(T0 + k, "r"), v) for k, v in enumerate(values_)
        ]
        latest = Item("profile", "raw", T0, version(T0, "r"), values_[0])
        await store.write([item, latest, *ts_items])
    got, ts, last = await store.read(
        [Query("embeddings", "a1"), Query("clicks", "raw", limit=50), Query("profile", "raw")]
    )
    assert got[0].value == item.value
    rounded = list(struct.unpack("<768f", struct.pack("<768f", *embedding)))
    assert decode_python(group, got[0].value) == values | {"embedding": rounded}
    assert [r.value for r in ts] == agains[::-1]
    assert [r.value for r in last] == [agains[0]]


async def test_retention_hides_old_items(store: Store, clock: FakeClock) -> None:
    group = CATALOG.group("aged")
    hour = 3_600_000
    clock.now = T0
    await store.write(
        [
            make_item(group, "u1", T0 - 2 * hour, "old", {"x": 1}),
            make_item(group, "u1", T0 - hour // 2, "mid", {"x": 2}),
            make_item(group, "u1", T0, "new", {"x": 3}),
        ]
    )
    got = await read_one(store, Query("aged", "u1", limit=50))
    assert [decode(group, r.value)[0] for r in got] == [3, 2]
    clock.now = T0 + hour - hour // 4
    got = await read_one(store, Query("aged", "u1", limit=50))
    assert [decode(group, r.value)[0] for r in got] == [3]
    got = await read_one(store, Query("aged", "u1", limit=50, since=T0 - 3 * hour))
    assert [decode(group, r.value)[0] for r in got] == [3]


async def test_concurrent_writers_lose_nothing(store: Store) -> None:
    async def writer(w: int) -> None:
        for b in range(5):
            await store.write(
                [
                    click("shared", T0 + w * 1000 + b * 10 + k, w * 100 + b * 10 + k)
                    for k in range(5)
                ]
                + [
                    make_item(
                        PROFILE, "shared", T0 + w * 10 + b, f"p{w}-{b}", {"updated_by": f"{w}-{b}"}
                    )
                ]
            )

    await asyncio.gather(*(writer(w) for w in range(8)))
    got, latest = await store.read(
        [Query("clicks", "shared", limit=50), Query("profile", "shared")]
    )
    expected = sorted(
        (
            (w * 1000 + b * 10 + k, w * 100 + b * 10 + k)
            for w in range(8)
            for b in range(5)
            for k in range(5)
        ),
        reverse=True,
    )[:50]
    assert ns(got) == [n for _, n in expected]
    assert decode(PROFILE, latest[0].value)[1] == "7-4"


async def test_big_batch_in_one_call(store: Store) -> None:
    items = [click(f"b{i % 97}", T0 + i, i) for i in range(1200)]
    items += [
        make_item(PROFILE, f"b{i}", T0 + i, f"p{i}", {"updated_by": str(i)}) for i in range(300)
    ]
    await store.write(items)
    got = await store.read([Query("clicks", f"b{k}", limit=50) for k in range(97)])
    assert sum(len(r) for r in got) == sum(min(50, len(range(k, 1200, 97))) for k in range(97))
    got = await store.read([Query("profile", f"b{i}") for i in range(300)])
    assert [decode(PROFILE, r[0].value)[1] for r in got] == [str(i) for i in range(300)]


async def test_writes_survive_reopening(make_store: Any, clock: FakeClock) -> None:
    first = make_store(CATALOG, clock)
    await first.start()
    await first.write([click("u1", T0, 1), make_item(PROFILE, "u1", T0, "e", {"updated_by": "x"})])
    await first.aclose()
    second = make_store(CATALOG, clock)
    await second.start()
    try:
        got = await second.read([Query("clicks", "u1", limit=5), Query("profile", "u1")])
        assert ns(got[0]) == [1] and len(got[1]) == 1
    finally:
        await second.aclose()
