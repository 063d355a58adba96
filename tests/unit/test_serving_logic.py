"""Pure serving logic with an injected clock and random source: TTLs, jitter, XFetch,
answerability, the LRU, the breaker and a request's read plan."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from featureplane.codec import Record
from featureplane.errors import UnknownGroupError
from featureplane.keys import version
from featureplane.serving.breaker import Breaker, BreakerState
from featureplane.serving.freshness import (
    Freshness,
    answer,
    entry_from_cache,
    entry_from_store,
    freshness,
    negative_entry,
    rebased,
    xfetch,
)
from featureplane.serving.local import LocalCache
from featureplane.serving.plan import Wanted, plan
from featureplane.spec import Catalog, FeatureGroup
from featureplane.stores.base import Query
from featureplane.ttl import jittered

T0 = 1_763_800_000_000
TS = FeatureGroup.model_validate(
    {
        "name": "ts",
        "entity": "u",
        "kind": "timeseries",
        "max_items": 5,
        "features": [{"name": "x", "type": "int"}],
        "ttl": {"soft": "10s", "hard": "60s", "jitter": 0.2},
    }
)
LATEST = FeatureGroup.model_validate(
    {
        "name": "l",
        "entity": "u",
        "kind": "latest",
        "features": [{"name": "x", "type": "int"}],
    }
)


def rec(ts: int) -> Record:
    return Record(ts, version(ts, f"e{ts}"), b"[1]")


def newest(*tss: int) -> list[Record]:
    return [rec(t) for t in sorted(tss, reverse=True)]


@pytest.mark.parametrize("r", [0.0, 0.25, 0.5, 0.999999])
def test_jitter_only_shortens_within_bounds(r: float) -> None:
    got = jittered(60_000, 0.2, r)
    assert 48_000 <= got <= 60_000
    assert got == int(60_000 * (1 - 0.2 * r))


def test_store_entry_deadlines_follow_ttl_with_jitter() -> None:
    e = entry_from_store(TS, newest(1, 2), T0, r_soft=0.5, r_hard=1.0 - 1e-9)
    assert e.stored_at == T0
    assert e.soft_at == T0 + 9_000
    assert T0 + 48_000 <= e.hard_at <= T0 + 48_001
    assert e.complete  # 2 < max_items


def test_freshness_states_by_clock() -> None:
    e = entry_from_store(TS, newest(1), T0, 0.0, 0.0)  # soft 10s, hard 60s exactly
    never = 1.0  # ln(1) = 0: XFetch never fires early
    assert freshness(e, T0 + 9_999, 5.0, 1.0, never) is Freshness.FRESH
    assert freshness(e, T0 + 10_000, 5.0, 1.0, never) is Freshness.STALE
    assert freshness(e, T0 + 59_999, 5.0, 1.0, never) is Freshness.STALE
    assert freshness(e, T0 + 60_000, 5.0, 1.0, never) is Freshness.EXPIRED


def test_xfetch_formula() -> None:
    # refresh when now - delta * beta * ln(r) >= expiry
    assert not xfetch(T0, T0 + 100, 10.0, 1.0, 1.0)
    r = math.exp(-10)  # -ln(r) = 10 -> reaches 100 ms ahead with delta 10
    assert xfetch(T0, T0 + 100, 10.0, 1.0, r)
    assert not xfetch(T0, T0 + 101, 10.0, 1.0, r)
    assert xfetch(T0, T0 + 200, 10.0, 2.0, r)  # beta doubles the reach
    e = entry_from_store(TS, newest(1), T0, 0.0, 0.0)
    assert freshness(e, T0 + 9_900, 10.0, 1.0, r) is Freshness.EARLY
    assert freshness(e, T0 + 9_899, 10.0, 1.0, r) is Freshness.FRESH


def test_xfetch_is_rarer_far_from_expiry() -> None:
    draws = [i / 1000 for i in range(1, 1001)]
    near = sum(xfetch(T0, T0 + 5, 10.0, 1.0, r) for r in draws)
    far = sum(xfetch(T0, T0 + 50, 10.0, 1.0, r) for r in draws)
    assert near > far > 0


def test_negative_entry_has_its_own_ttl_and_no_early_refresh() -> None:
    e = negative_entry(T0, 5_000)
    assert e.negative and e.hard_at == T0 + 5_000
    assert freshness(e, T0 + 4_999, 1e9, 1.0, 1e-9) is Freshness.FRESH
    assert freshness(e, T0 + 5_000, 1.0, 1.0, 1.0) is Freshness.EXPIRED
    assert answer(e, "timeseries", 3, None, None) == []


def test_cache_entry_age_is_taken_conservatively_from_pttl() -> None:
    # hard 60s and 45s left: at least 15s old -> past its 10s soft deadline already
    e = entry_from_cache(TS, newest(1), 45_000, T0, r_soft=0.0)
    assert e.hard_at == T0 + 45_000 and e.stored_at == T0 - 15_000
    assert freshness(e, T0, 1.0, 1.0, 1.0) is Freshness.STALE
    up = rebased(e, TS, 0.0, 0.0)
    assert up.hard_at <= e.hard_at and up.stored_at == e.stored_at


def test_answerability_of_an_incomplete_entry() -> None:
    full = entry_from_store(TS, newest(10, 20, 30, 40, 50), T0, 0, 0)  # 5 == max_items
    assert not full.complete
    assert answer(full, "timeseries", 3, None, None) == newest(50, 40, 30)
    assert answer(full, "timeseries", 2, 15, None) == newest(50, 40)  # enough in range
    assert answer(full, "timeseries", 5, 15, None) == newest(50, 40, 30, 20)  # oldest < since
    assert answer(full, "timeseries", 5, 10, 45) is None  # older ts=10 items may exist
    assert answer(full, "timeseries", 3, None, 25) is None  # only 2 cached in range
    assert answer(full, "timeseries", 2, None, 25) == newest(20, 10)


def test_answerability_of_a_complete_entry() -> None:
    some = entry_from_store(TS, newest(10, 20), T0, 0, 0)
    assert some.complete
    assert answer(some, "timeseries", 5, None, 15) == newest(10)
    assert answer(some, "timeseries", 5, 21, 30) == []


def test_local_cache_is_bounded_by_bytes_and_lru() -> None:
    e = entry_from_store(LATEST, newest(1), T0, 0, 0)
    cache = LocalCache(e.size * 3)
    for i in range(3):
        cache.put(("l", str(i)), e)
    assert cache.get(("l", "0")) is e  # 0 becomes most recent
    cache.put(("l", "3"), e)
    assert cache.get(("l", "1")) is None and cache.get(("l", "0")) is e
    assert cache.bytes <= cache.max_bytes and len(cache) == 3
    cache.put(("l", "3"), e)  # replacing keeps the byte count right
    assert cache.bytes == 3 * e.size


def test_invalidation_drops_keys_and_keeps_reads_under_way_out() -> None:
    e = entry_from_store(LATEST, newest(1), T0, 0, 0)
    cache = LocalCache(1 << 20)
    cache.put(("l", "a"), e)
    cache.put(("l", "b"), e)
    before = cache.token()  # a read of the tiers below starts
    cache.invalidate([("l", "a"), ("l", "never-held")])
    assert cache.get(("l", "a")) is None and cache.get(("l", "b")) is e
    assert cache.bytes == e.size
    cache.put(("l", "a"), e, before)  # the read brings the old value: refused
    cache.put(("l", "never-held"), e, before)
    assert cache.get(("l", "a")) is None and cache.get(("l", "never-held")) is None
    cache.put(("l", "b"), e, before)  # not invalidated: taken
    cache.put(("l", "a"), e, cache.token())  # a read begun after it: taken
    assert cache.get(("l", "a")) is e
    after = cache.token()
    cache.clear()  # invalidations may have been missed: nothing held, no read under way kept
    assert len(cache) == 0 and cache.bytes == 0
    cache.put(("l", "b"), e, after)
    assert cache.get(("l", "b")) is None


def test_invalidation_forgets_old_keys_without_letting_old_reads_in() -> None:
    e = entry_from_store(LATEST, newest(1), T0, 0, 0)
    cache = LocalCache(1 << 20)
    old = cache.token()
    for n in range(70_000):  # past the bound of remembered keys
        cache.invalidate([("l", str(n))])
    cache.invalidate([("l", "x")])
    cache.put(("l", "0"), e, old)  # its invalidation was forgotten: refused all the same
    assert cache.get(("l", "0")) is None
    cache.put(("l", "0"), e, cache.token())
    assert cache.get(("l", "0")) is e


def test_breaker_opens_then_half_opens_after_cooldown() -> None:
    now = [0]
    b = Breaker(failures=2, cooldown_ms=100, clock=lambda: now[0])
    b.failure()
    assert b.allow()
    b.failure()
    assert b.state is BreakerState.OPEN and not b.allow()
    now[0] = 100
    assert b.allow() and b.state is BreakerState.HALF_OPEN
    assert not b.allow()  # one trial at a time
    b.failure()
    assert b.state is BreakerState.OPEN
    now[0] = 200
    assert b.allow()
    b.success()
    assert b.state is BreakerState.CLOSED and b.allow()


def test_read_plan_clamps_each_query_as_the_stores_do() -> None:
    kept = TS.model_copy(update={"name": "kept", "retention": 60_000})
    catalog = Catalog(groups={"ts": TS, "l": LATEST, "kept": kept})
    got = plan(
        catalog,
        [
            Query("ts", "a", 30, since=5, until=9),
            Query("l", "a", 30, since=5, until=9),
            Query("kept", "a", 2),
            Query("kept", "b", 2, since=T0 - 1),
        ],
        T0,
    )
    assert got == [
        Wanted(TS, ("ts", "a"), 5, 5, 9),  # limit capped at max_items
        Wanted(LATEST, ("l", "a"), 1, None, None),  # a latest group has no range
        Wanted(kept, ("kept", "a"), 2, T0 - 60_000, None),  # retention raises since
        Wanted(kept, ("kept", "b"), 2, T0 - 1, None),
    ]
    assert [w.ranged for w in got] == [True, False, True, True]
    assert got[0].query() == Query("ts", "a", 5, 5, 9) and got[0].records is None


def test_read_plan_refuses_an_unknown_group() -> None:
    with pytest.raises(UnknownGroupError) as err:
        plan(Catalog(groups={"ts": TS}), [Query("ts", "a"), Query("nope", "a")], T0)
    assert err.value.group == "nope"


def test_rendered_answers_are_counted_and_go_with_their_entry() -> None:
    cache = LocalCache(1 << 20)
    e = entry_from_store(LATEST, newest(1), T0, 0, 0)
    cache.put(("l", "a"), e)
    cache.keep_rendered(("l", "a"), e, ("shape", 1), (1, b"x" * 100))
    assert e.rendered == {("shape", 1): (1, b"x" * 100)}
    assert cache.bytes == e.size > entry_from_store(LATEST, newest(1), T0, 0, 0).size
    # replaced: the new entry starts with nothing rendered, and the count follows
    fresh = entry_from_store(LATEST, newest(2), T0, 0, 0)
    cache.put(("l", "a"), fresh)
    assert fresh.rendered == {} and cache.bytes == fresh.size
    cache.keep_rendered(("l", "a"), e, ("shape", 1), (1, b"old"))  # no longer held: ignored
    assert fresh.rendered == {} and cache.bytes == fresh.size
    for n in range(20):  # a client varying its shape keeps at most a few renderings
        cache.keep_rendered(("l", "a"), fresh, n, (1, b"y"))
    assert 0 < len(fresh.rendered) <= 8 and cache.bytes == fresh.size
    cache.invalidate([("l", "a")])
    assert cache.bytes == 0 and len(cache) == 0
    # dataclasses.replace (a longer soft TTL, say) makes an entry with nothing rendered
    assert replace(e, soft_at=e.soft_at + 1).rendered == {}


def test_rendered_answers_count_towards_the_bound_and_evict() -> None:
    e1 = entry_from_store(LATEST, newest(1), T0, 0, 0)
    e2 = entry_from_store(LATEST, newest(2), T0, 0, 0)
    cache = LocalCache(e1.size + e2.size + 50)
    cache.put(("l", "1"), e1)
    cache.put(("l", "2"), e2)
    cache.keep_rendered(("l", "2"), e2, None, (1, b"z" * 500))  # past the bound: LRU goes
    assert cache.get(("l", "1")) is None and cache.bytes <= cache.max_bytes
