"""Unit tests of the ingestion operators with fakes: no broker, no store."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featureplane.codec import Item, decode
from featureplane.errors import MalformedError, TransientStoreError, ValidationError
from featureplane.operators.aggregate import Aggregator
from featureplane.operators.commit import OffsetTracker
from featureplane.operators.decode import decode_event, decode_works
from featureplane.operators.dispatch import MISSING, Dispatcher, get_path
from featureplane.operators.metrics import IngestMetrics
from featureplane.operators.pipeline import Pipeline, PipelineConfig, Worker
from featureplane.operators.policy import RetryInPlace, ToRetryTopic, classify, targets
from featureplane.operators.records import Event, Message, Origin, Work
from featureplane.operators.retry import Backoff, RetryHold
from featureplane.operators.route import (
    TIERS_HEADER,
    Abandon,
    Outgoing,
    RetryHeaders,
    fit,
    parse_retry_headers,
    route_of,
    wire_size,
)
from featureplane.operators.write import Writer
from featureplane.spec import load_catalog
from featureplane.stores.base import Query, Store

CATALOG = load_catalog(Path(__file__).resolve().parents[2] / "examples")
T = 1_763_800_000_000


def msg(
    value: object,
    topic: str = "user-actions",
    offset: int = 0,
    attempt: int = 0,
    tracker: OffsetTracker | None = None,
) -> Message:
    raw = value if isinstance(value, bytes) or value is None else json.dumps(value).encode()
    return Message(topic, 0, offset, b"k", raw, Origin(topic, 0, offset), attempt, tracker=tracker)


def click(**over: object) -> dict[str, object]:
    ev: dict[str, object] = {
        "event_id": "e1",
        "event_type": "click",
        "ts": T,
        "user_id": "u1",
        "session": "s",
        "article": {"id": "a1", "kind": "fleaMarket", "category": "bikes"},
    }
    ev.update(over)
    return ev


def steps(*messages: Message) -> list[Work]:
    works = decode_works([Work(m) for m in messages])
    works = Dispatcher.from_catalog(CATALOG).dispatch(works)
    return Aggregator(CATALOG).aggregate(works)


# ---------------------------------------------------------------- commit


def test_tracker_commits_highest_contiguous_done_offset_plus_one() -> None:
    t = OffsetTracker("t", 0)
    for o in (5, 6, 7, 9):  # 8 is a gap (compaction, a transaction marker)
        t.track(o)
    t.ack(6)
    assert t.position is None  # 5 is still in flight
    t.ack(5)
    assert t.position == 7 and t.to_commit() == 7
    t.committed(7)
    assert t.to_commit() is None
    t.ack(9)
    assert t.position == 7  # 7 still pending: one slow record holds the commit, not the stream
    t.ack(7)
    assert t.position == 10 and t.in_flight == 0
    with pytest.raises(ValueError):
        t.track(3)


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{oops", "not valid JSON"),
        (b"[1]", "not a JSON object"),
        (None, "empty record value"),
        (json.dumps({"event_type": "x", "ts": 1}).encode(), "missing field event_id"),
        (json.dumps({"event_id": "", "event_type": "x", "ts": 1}).encode(), "event_id must"),
        (json.dumps({"event_id": "a", "event_type": "x"}).encode(), "missing field ts"),
        (json.dumps({"event_id": "a", "event_type": "x", "ts": True}).encode(), "ts must"),
        (json.dumps({"event_id": "a", "event_type": "x", "ts": 1.5}).encode(), "ts must"),
    ],
)
def test_decode_rejects_malformed(value: bytes | None, reason: str) -> None:
    with pytest.raises(MalformedError, match=reason):
        decode_event(value)


# ---------------------------------------------------------------- dispatch and aggregate


def test_get_path() -> None:
    body = {"a": {"b": {"c": 1}}, "x": None}
    assert get_path(body, "a.b.c") == 1
    assert get_path(body, "x") is None
    assert get_path(body, "a.z") is get_path(body, "x.y")
    # other mappings than dict, and non-mappings on the way, as before the dict fast path
    assert get_path({"a": MappingProxyType({"b": 2})}, "a.b") == 2
    assert get_path({"a": [1]}, "a.0") is get_path({"a": "s"}, "a.b") is MISSING


def test_one_click_feeds_two_groups_and_where_filters() -> None:
    (w,) = steps(msg(click()))
    assert [i.group for i in w.items] == [
        "recent_user_clicked_fleaMarketArticles",
        "user_last_click",
    ]
    (w,) = steps(msg(click(article={"id": "a1", "kind": "business"})))
    assert [i.group for i in w.items] == ["user_last_click"]


def test_where_does_not_confuse_bool_and_int() -> None:
    from featureplane.spec import IngestionRule

    rule = IngestionRule(
        name="r",
        topic="t",
        event_type="e",
        where={"flag": True},
        group="g",
        id="id",
        features={"f": "f"},
    )
    d = Dispatcher([rule])
    assert d.match("t", "e", {"flag": True}) == (rule,)
    assert d.match("t", "e", {"flag": 1}) == ()


def test_unmatched_event_is_done_without_items() -> None:
    (w,) = steps(msg(click(event_type="view")))
    assert w.status == "done" and w.items == ()


def test_bad_feature_type_and_oversized_item_are_malformed() -> None:
    bad = {
        "event_id": "s",
        "event_type": "search",
        "ts": T,
        "user_id": "u",
        "query": "q",
        "result_count": "many",
    }
    (w,) = steps(msg(bad))
    assert w.status == "malformed" and "rule searches_to_recent" in (w.reason or "")
    (w,) = steps(msg(click(session="x" * 9000)))
    assert w.status == "malformed" and "8192-byte limit" in (w.reason or "")
    (w,) = steps(msg(click(user_id=None)))
    assert w.status == "malformed" and "missing id field user_id" in (w.reason or "")


def test_integer_ids_become_strings() -> None:
    (w,) = steps(msg(click(user_id=1234)))
    assert {i.id for i in w.items} == {"1234"}


def test_rule_paths_read_nested_missing_null_and_non_mapping_values_as_none(
    tmp_path: Path,
) -> None:
    (tmp_path / "s.yaml").write_text(
        """
feature_groups:
  - {name: g, entity: e, kind: latest, features: [{name: a, type: string},
     {name: b, type: string}, {name: c, type: string}, {name: d, type: string},
     {name: n, type: string}]}
ingestion:
  - {name: r, topic: t, event_type: e, group: g, id: who.id,
     features: {a: x, b: y.z, c: missing, d: s.t, n: nul.deep}}
  - {name: r2, topic: t, event_type: e, group: g, id: x, features: {a: x}}
"""
    )
    catalog = load_catalog(tmp_path)
    agg = Aggregator(catalog)
    rule, rule2 = catalog.rules
    body = {"who": {"id": "u"}, "x": "1", "y": {"z": "2"}, "s": "str", "nul": None}
    item = agg.item(rule, Event("e1", "e", T, body))
    assert item.id == "u" and decode(catalog.groups["g"], item.value) == [
        "1",
        "2",
        None,
        None,
        None,
    ]
    for who in ({}, None, "u", [1]):  # no id under it, null, not a mapping
        with pytest.raises(ValidationError, match=r"missing id field who\.id"):
            agg.item(rule, Event("e1", "e", T, {**body, "who": who}))
    with pytest.raises(ValidationError, match=r"missing id field who\.id"):
        agg.item(rule, Event("e1", "e", T, {"x": "1"}))
    # rules without `where` match every event of their (topic, event_type), in spec order
    d = Dispatcher.from_catalog(catalog)
    assert d.match("t", "e", {}) == (rule, rule2) and d.match("t", "other", {}) == ()


# ---------------------------------------------------------------- write


class FakeStore(Store):
    def __init__(self, fail: BaseException | None = None) -> None:
        super().__init__(CATALOG)
        self.fail = fail
        self.items: list[Item] = []

    async def write(self, items: Sequence[Item]) -> None:
        if self.fail:
            raise self.fail
        self.items.extend(items)

    async def read(self, queries: Sequence[Query]) -> list[list[object]]:  # type: ignore[override]
        return [[] for _ in queries]


class Lifecycle:
    """start/aclose of a cache tier, counted."""

    starts = 0
    closes = 0

    async def start(self) -> None:
        self.starts += 1

    async def aclose(self) -> None:
        self.closes += 1


class FakeCache(Lifecycle):
    def __init__(self) -> None:
        self.items: list[Item] = []

    async def write_through(self, items: Sequence[Item]) -> None:
        self.items.extend(items)


def test_writer_writes_store_and_write_through_cache() -> None:
    store, cache = FakeStore(), FakeCache()
    works = steps(*(msg(click(event_id=f"e{i}"), offset=i) for i in range(10)))
    out = asyncio.run(Writer(CATALOG, store, cache, chunk_items=3).write(works))
    assert all(w.status == "done" for w in out)
    assert len(store.items) == 20
    # the cache tier sees every item (write_through decides what it caches)
    assert len(cache.items) == 20


def test_writer_marks_failed_chunks_transient() -> None:
    store = FakeStore(TransientStoreError("throttled"))
    works = steps(msg(click()), msg(click(event_type="view"), offset=1))
    out = asyncio.run(Writer(CATALOG, store, None).write(works))
    assert out[0].status == "transient" and "throttled" in (out[0].reason or "")
    assert out[1].status == "done"


def test_classify() -> None:
    assert classify(TimeoutError(), "store").kind == "timeout"
    assert classify(TransientStoreError("x"), "redis").kind == "transient"
    assert classify(RuntimeError("x"), "store").kind == "store_error"
    assert classify(ValidationError("x"), "store").malformed


# ---------------------------------------------------------------- route and retry


def test_route_transient_to_retry_until_the_budget_then_dlq() -> None:
    w = Work(msg(click(), offset=7), status="transient", reason="redis down")
    out = route_of(w, budget_ms=60_000, now_ms=T)
    assert isinstance(out, Outgoing) and out.kind == "retry" and out.topic == "user-actions.retry"
    h = dict(out.headers)
    assert h["attempt"] == b"1" and h["first_failure_ms"] == str(T).encode()
    assert h["offset"] == b"7" and h["reason"] == b"redis down" and TIERS_HEADER not in h
    parsed = parse_retry_headers(list(out.headers), "x.retry", 3, 99)
    assert parsed == RetryHeaders("user-actions", Origin("user-actions", 0, 7), 1, T, False)
    # attempts do not decide: time since the first failure does
    again = Work(
        Message("user-actions", 0, 0, b"k", b"{}", Origin("user-actions", 0, 7), 50, T),
        status="transient",
        reason="still down",
    )
    out = route_of(again, budget_ms=60_000, now_ms=T + 59_999)
    assert isinstance(out, Outgoing) and out.kind == "retry"
    assert dict(out.headers)["attempt"] == b"51"
    out = route_of(again, budget_ms=60_000, now_ms=T + 60_000)
    assert isinstance(out, Outgoing) and out.kind == "dlq" and out.topic == "user-actions.dlq"
    assert dict(out.headers)["reason"] == b"gave up after 50 retries over 60s: still down"
    assert dict(out.headers)["first_failure_ms"] == str(T).encode()
    bad = Work(msg(b"{"), status="malformed", reason="not valid JSON")
    out = route_of(bad, 5, T)
    assert isinstance(out, Outgoing) and out.kind == "dlq" and out.value == b"{"
    assert route_of(Work(msg(click()), status="done"), 5, T) is None


def test_a_redis_only_failure_retries_the_cache_and_never_reaches_the_dlq() -> None:
    w = Work(msg(click()), status="transient", reason="redis: down", cache_only=True)
    out = route_of(w, budget_ms=1_000, now_ms=T)
    assert isinstance(out, Outgoing) and out.kind == "retry"
    assert dict(out.headers)[TIERS_HEADER] == b"redis"
    assert parse_retry_headers(list(out.headers), "user-actions.retry", 0, 0).cache_only
    late = Work(
        Message("user-actions", 0, 0, b"k", b"{}", Origin("user-actions", 0, 0), 9, T, True),
        status="transient",
        reason="redis: down",
        cache_only=True,
    )
    gone = route_of(late, budget_ms=1_000, now_ms=T + 5_000)
    assert isinstance(gone, Abandon) and "cache write abandoned after 9 retries" in gone.reason


def test_fit_cuts_a_dlq_copy_to_the_limit_with_headers_and_refuses_a_retry_copy() -> None:
    small = Outgoing("dlq", "t.dlq", b"k", b"v" * 10, (("reason", b"r"),))
    assert fit(small, 4096) is small
    big = Outgoing("dlq", "t.dlq", b"k", b"v" * 1_048_576, (("reason", b"bad"),))
    cut = fit(big, 1_048_588)
    assert cut is not None and wire_size(cut) <= 1_048_588
    h = dict(cut.headers)
    assert h["truncated"] == b"true" and h["original_size"] == b"1048576"
    assert h["reason"] == b"bad" and cut.value == (big.value or b"")[: len(cut.value or b"")]
    assert len(cut.value or b"") > 1_000_000
    huge_key = Outgoing("dlq", "t.dlq", b"k" * 50_000, b"v" * 50_000, ())
    cut = fit(huge_key, 20_000)
    assert cut is not None and wire_size(cut) <= 20_000 and len(cut.key or b"") == 1024
    assert dict(cut.headers)["original_key_size"] == b"50000"
    assert fit(Outgoing("retry", "t.retry", None, b"v" * 5000, ()), 4096) is None


def test_retry_hold_releases_in_due_order_without_blocking() -> None:
    now = [T]
    hold = RetryHold(Backoff(base_ms=1000, cap_ms=8000), lambda: now[0], random.Random(1))
    slow = msg(click(), offset=1, attempt=4)  # up to 8 s
    fast = msg(click(), offset=2, attempt=1)  # up to 1 s
    hold.push(slow, T)
    hold.push(fast, T)
    now[0] = T + 1000
    assert [m.offset for m in hold.pop_due(10)] == [2]
    now[0] = T + 8000
    assert [m.offset for m in hold.pop_due(10)] == [1]
    assert len(hold) == 0 and hold.next_due_ms() is None


# ---------------------------------------------------------------- per tier


class DownCache(Lifecycle):
    async def write_through(self, items: Sequence[Item]) -> None:
        raise TransientStoreError("redis down")


def test_a_cache_failure_after_a_store_success_is_cache_only() -> None:
    store = FakeStore()
    works = steps(msg(click()), msg(click(event_id="e2"), offset=1))
    out = asyncio.run(Writer(CATALOG, store, DownCache()).write(works))
    assert [w.status for w in out] == ["transient", "transient"]
    assert all(w.cache_only and "redis down" in (w.reason or "") for w in out)
    assert len(store.items) == 4  # the store has every item
    # both tiers failed: the whole record is retried, not the cache alone
    out = asyncio.run(
        Writer(CATALOG, FakeStore(TransientStoreError("x")), DownCache()).write(works)
    )
    assert [w.cache_only for w in out] == [False, False]


def test_a_cache_only_retry_skips_the_store() -> None:
    store, cache = FakeStore(), FakeCache()
    m = msg(click())
    retried = Message(m.topic, 0, 0, m.key, m.value, m.origin, 3, T, cache_only=True)
    out = asyncio.run(Writer(CATALOG, store, cache).write(steps(retried, msg(click(), offset=1))))
    assert [w.status for w in out] == ["done", "done"]
    assert len(store.items) == 2 and len(cache.items) == 4
    # a failing store does not touch the cache-only record
    out = asyncio.run(
        Writer(CATALOG, FakeStore(TransientStoreError("x")), cache).write(steps(retried))
    )
    assert out[0].status == "done"


# ---------------------------------------------------------------- one record, one outcome


def deep(depth: int, leaf: object = 1) -> object:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def deep_json(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


@pytest.mark.parametrize("field", ["ts", "event_id", "event_type", "user_id", "session"])
def test_a_value_nested_1000_deep_is_one_malformed_record_with_a_short_reason(field: str) -> None:
    # json.dumps recurses: write the nesting by hand
    body = json.dumps(click(**{field: "__X__"})).replace('"__X__"', deep_json(1000)).encode()
    works = steps(msg(body), msg(click(), offset=1))
    assert works[0].status == "malformed" and len(works[0].reason or "") < 300, works[0].reason
    assert works[1].status == "pending" and len(works[1].items) == 2


def test_nesting_beyond_orjsons_limit_is_not_valid_json() -> None:
    body = ('{"event_id":"e","event_type":"click","ts":1,"x":' + deep_json(5000) + "}").encode()
    (w,) = steps(msg(body))
    assert w.status == "malformed" and "not valid JSON" in (w.reason or "")


def no_worker() -> Worker:
    raise AssertionError("this test needs no clients")


def pipeline(
    clock: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    open_worker: Callable[[], Worker] = no_worker,
) -> Pipeline:
    """A pipeline with metrics of its own, whose clients are made on first use."""
    return Pipeline(CATALOG, PipelineConfig(), IngestMetrics(), open_worker, clock)


def test_a_step_that_raises_on_one_record_affects_only_that_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = pipeline()
    real = p.aggregator.item

    def item(rule: object, event: Event) -> Item:
        if event.event_id == "boom":
            raise RecursionError("maximum recursion depth exceeded")
        return real(rule, event)  # type: ignore[arg-type]

    monkeypatch.setattr(p.aggregator, "item", item)
    batch = p.to_batch([msg(click(event_id=f"e{i}"), offset=i) for i in range(5)])[0]
    batch[2] = Work(msg(click(event_id="boom"), offset=2))
    out = p.aggregate(p.dispatch(p.decode(batch)))
    assert [w.status for w in out] == ["pending", "pending", "malformed", "pending", "pending"]
    assert (
        out[2].reason
        == "internal error in aggregate: RecursionError: maximum recursion depth exceeded"
    )
    assert all(len(w.items) == 2 for i, w in enumerate(out) if i != 2)


def test_an_unexpected_write_error_is_transient_for_that_record_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = pipeline()
    batch = p.aggregate(p.dispatch(p.decode([Work(msg(click(), offset=i)) for i in range(3)])))

    def run(works: list[Work]) -> list[Work]:
        if any(w.message.offset == 1 for w in works):
            raise ValueError("bug")
        return [w.with_status("done") for w in works]

    out = p._guarded("write", batch, run, "transient")
    assert [w.status for w in out] == ["done", "transient", "done"]
    assert out[1].reason == "internal error in write: ValueError: bug"


# ---------------------------------------------------------------- any input


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None)
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        JSON.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {"event_id": JSON, "event_type": st.sampled_from(["click", "search", "x"]), "ts": JSON}
        ).map(lambda v: json.dumps(v).encode()),
        st.builds(
            lambda f, v: json.dumps(click(**{f: v})).encode(),
            st.sampled_from(["user_id", "session", "article", "ts", "event_id"]),
            JSON,
        ),
        st.integers(1, 3000).map(
            lambda d: (
                '{"event_id":"e","event_type":"click","ts":1,"user_id":' + deep_json(d) + "}"
            ).encode()
        ),
    )
)
def test_any_value_is_decided_by_the_pure_steps_without_raising(raw: bytes) -> None:
    works = steps(msg(raw), msg(click(), offset=1))
    assert works[0].status in ("pending", "done", "malformed")
    assert len(works[0].reason or "") <= 600
    assert works[1].status == "pending" and len(works[1].items) == 2


def test_tracker_knows_where_it_started_and_what_it_committed() -> None:
    t = OffsetTracker("t", 0)
    assert t.first_read is None and t.last_committed is None
    t.track(40)
    t.track(41)
    t.ack(40)
    t.committed(41)
    assert t.first_read == 40 and t.last_committed == 41


def test_route_abandons_a_spent_cache_only_retry_acknowledges_and_counts_it() -> None:
    p = pipeline()  # no delivery happens, so no broker is needed
    tracker = OffsetTracker("user-actions", 0)
    tracker.track(0)
    m = msg(click(), tracker=tracker)
    old = Message(m.topic, 0, 0, m.key, m.value, m.origin, 7, T - 7_200_000, True, tracker=tracker)
    labels = {"flow": "ingest", "topic": "user-actions"}
    before = p.metrics.value("featureplane_ingest_cache_abandoned_total", labels) or 0
    (w,) = p.route([Work(old, status="transient", reason="redis down", cache_only=True)])
    assert w.status == "done" and "cache write abandoned after 7 retries" in (w.reason or "")
    p.ack([w])
    assert tracker.position == 1
    after = p.metrics.value("featureplane_ingest_cache_abandoned_total", labels)
    assert after == before + 1


class FakeDeliverer:
    max_message_bytes = 1_048_588

    def close(self) -> None:
        pass

    def __init__(self) -> None:
        self.error: str | None = "broker down"
        self.sent: list[Outgoing] = []

    def deliver(self, records: Sequence[Outgoing], timeout_s: float, rounds: int) -> list[object]:
        if self.error is None:
            self.sent.extend(records)
        return [self.error] * len(records)


def test_a_record_whose_dlq_delivery_failed_is_delivered_with_a_later_batch() -> None:
    now = [T]
    deliverer = FakeDeliverer()
    loop = asyncio.new_event_loop()
    p = pipeline(lambda: now[0], lambda: Worker(loop, Writer(CATALOG, None, None), deliverer))
    tracker = OffsetTracker("user-actions", 0)
    tracker.track(0)
    (w,) = p.route([Work(msg(b"{", tracker=tracker), status="malformed", reason="not JSON")])
    p.ack([w])
    assert w.status == "stuck" and tracker.position is None
    deliverer.error = None
    now[0] += 5_000
    p.route([])
    assert tracker.position is None and not deliverer.sent  # not yet: every 10 s
    now[0] += 5_000
    p.route([])
    assert tracker.position == 1 and [o.kind for o in deliverer.sent] == ["dlq"]
    p.close()
    assert loop.is_closed()


class FlakyCache(Lifecycle):
    def __init__(self) -> None:
        self.down = True
        self.calls = 0

    async def write_through(self, items: Sequence[Item]) -> None:
        self.calls += 1
        if self.down:
            raise TransientStoreError("redis down")


def test_an_unreachable_cache_is_paused_with_doubling_waits_and_resumed_on_success() -> None:
    now = [T]
    cache, store = FlakyCache(), FakeStore()
    writer = Writer(
        CATALOG,
        store,
        cache,
        clock=lambda: now[0],
        policy=ToRetryTopic(cache_pause_ms=(1_000, 4_000)),
    )

    def write() -> list[Work]:
        return asyncio.run(writer.write(steps(msg(click()))))

    assert write()[0].cache_only and cache.calls == 1  # failed: paused for 1 s
    now[0] += 500
    (w,) = write()
    assert w.status == "transient" and w.cache_only and cache.calls == 1  # not tried
    assert "paused" in (w.reason or "") and len(store.items) == 4  # the store still is
    now[0] += 500
    assert write()[0].cache_only and cache.calls == 2  # tried again, failed: 2 s
    now[0] += 1_999
    write()
    assert cache.calls == 2
    now[0] += 1
    cache.down = False
    assert write()[0].status == "done" and cache.calls == 3
    now[0] += 1
    assert write()[0].status == "done" and cache.calls == 4  # no pause after a success


# ---------------------------------------------------------------- one write path

TIERED = """
feature_groups:
  - {name: cache_only, entity: user, kind: latest, tiers: [local, redis],
     features: [{name: v, type: string}]}
  - {name: everywhere, entity: user, kind: latest, tiers: [local, redis, store],
     features: [{name: v, type: string}]}
  - {name: store_only, entity: user, kind: timeseries, tiers: [store],
     features: [{name: v, type: string}]}
  - {name: around, entity: user, kind: latest, tiers: [redis, store], write: around,
     features: [{name: v, type: string}]}
"""


def tiered_items(tmp_path: Path) -> tuple[object, list[Item]]:
    from featureplane.codec import make_item

    (tmp_path / "g.yaml").write_text(TIERED)
    catalog = load_catalog(tmp_path / "g.yaml")
    items = [
        make_item(catalog.groups[g], "u1", T, f"e-{g}", {"v": "x"})
        for g in ("cache_only", "everywhere", "store_only", "around")
    ]
    return catalog, items


def test_a_groups_tiers_decide_where_its_items_go(tmp_path: Path) -> None:
    catalog, items = tiered_items(tmp_path)
    groups = catalog.groups  # type: ignore[attr-defined]
    assert targets(groups["cache_only"]) == (False, True)
    assert targets(groups["everywhere"]) == (True, True)
    assert targets(groups["store_only"]) == (True, False)
    assert targets(groups["around"]) == (True, True)  # write_through only clears markers
    store, cache = FakeStore(), FakeCache()
    asyncio.run(Writer(catalog, store, cache).write_items(items))  # type: ignore[arg-type]
    assert sorted(i.group for i in store.items) == ["around", "everywhere", "store_only"]
    assert sorted(i.group for i in cache.items) == ["around", "cache_only", "everywhere"]


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class FailingStore(FakeStore):
    """Raises the given errors on the first writes, then writes."""

    def __init__(self, *errors: Exception) -> None:
        super().__init__()
        self.errors = list(errors)
        self.calls = 0

    async def write(self, items: Sequence[Item]) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        self.items.extend(items)


def test_in_place_retries_the_failed_tier_with_capped_backoff_then_succeeds() -> None:
    store = FailingStore(TransientStoreError("throttled"), TimeoutError())
    cache, sleeps = FakeCache(), Sleeps()
    policy = RetryInPlace(max_attempts=3, base_ms=100, cap_ms=150)
    writer = Writer(CATALOG, store, cache, policy=policy, sleep=sleeps, rand=random.Random(1))
    works = steps(msg(click()), msg(click(event_id="e2"), offset=1))
    out = asyncio.run(writer.write(works))
    assert [w.status for w in out] == ["done", "done"] and store.calls == 3
    assert len(store.items) == 4 and len(sleeps.delays) == 2
    assert 0 <= sleeps.delays[0] <= 0.1 and 0 <= sleeps.delays[1] <= 0.15
    # the store succeeded and the cache failed: the cache alone is written again
    store, flaky = FailingStore(), FlakyCache()
    writer = Writer(CATALOG, store, flaky, policy=policy, sleep=Sleeps())

    async def heal() -> None:
        task = asyncio.ensure_future(writer.write(steps(msg(click()))))
        while flaky.calls == 0:
            await asyncio.sleep(0)
        flaky.down = False
        (w,) = await task
        assert w.status == "done"

    asyncio.run(heal())
    assert store.calls == 1 and flaky.calls == 2


def test_in_place_gives_up_after_max_attempts_with_the_reason_and_stops_on_bad_data() -> None:
    from featureplane.errors import ValidationError

    sleeps = Sleeps()
    down = FailingStore(*[TransientStoreError("throttled")] * 10)
    writer = Writer(CATALOG, down, None, policy=RetryInPlace(max_attempts=2), sleep=sleeps)
    with pytest.raises(TransientStoreError, match=r"gave up after 2 retries: store: .*throttled"):
        asyncio.run(writer.write_items(steps(msg(click()))[0].items))
    assert down.calls == 3 and len(sleeps.delays) == 2
    bad = FailingStore(ValidationError("too large"))
    writer = Writer(CATALOG, bad, None, policy=RetryInPlace(), sleep=sleeps)
    with pytest.raises(ValidationError, match="too large"):
        asyncio.run(writer.write_items(steps(msg(click()))[0].items))
    assert bad.calls == 1 and len(sleeps.delays) == 2  # no retry of bad data


class SlowFailingStart(FakeCache):
    """A cache whose start fails after a while, counting overlapping starts."""

    def __init__(self) -> None:
        super().__init__()
        self.running = 0
        self.overlap = 0

    async def start(self) -> None:
        self.starts += 1
        self.running += 1
        self.overlap = max(self.overlap, self.running)
        await asyncio.sleep(0.01)
        self.running -= 1
        raise TransientStoreError("connection refused")


def test_a_cache_down_at_start_up_is_a_transient_failure_and_chunks_never_race_its_start() -> None:
    cache = SlowFailingStart()
    writer = Writer(CATALOG, FakeStore(), cache, chunk_items=2)
    works = steps(*(msg(click(event_id=f"e{i}"), offset=i) for i in range(4)))  # 4 chunks
    out = asyncio.run(writer.write(works))
    assert all(w.status == "transient" and w.cache_only for w in out)
    assert "connection refused" in (out[0].reason or "")
    assert cache.starts >= 1 and cache.overlap == 1 and not cache.items
    asyncio.run(writer.aclose())
    assert cache.closes == 0  # never started, never closed


def test_two_pipelines_in_one_process_count_apart() -> None:
    a, b = pipeline(), pipeline()
    tracker = OffsetTracker("user-actions", 0)
    m = msg(click(), tracker=tracker)
    old = Message(m.topic, 0, 0, m.key, m.value, m.origin, 7, T - 7_200_000, True)
    a.route([Work(old, status="transient", reason="down", cache_only=True)])
    labels = {"flow": "ingest", "topic": "user-actions"}
    assert a.metrics.value("featureplane_ingest_cache_abandoned_total", labels) == 1
    assert b.metrics.value("featureplane_ingest_cache_abandoned_total", labels) is None


class BuggyWriter(Writer):
    """Raises on any write of more than one record while `buggy`."""

    buggy = False

    async def write(self, works: Sequence[Work]) -> list[Work]:
        if self.buggy and len(works) > 1:
            raise RuntimeError("bug")
        return await super().write(works)


def test_write_behind_returns_the_batch_before_and_flush_acknowledges_the_last() -> None:
    store = FakeStore()
    loop = asyncio.new_event_loop()
    writer = BuggyWriter(CATALOG, store, None)
    p = pipeline(open_worker=lambda: Worker(loop, writer, FakeDeliverer()))
    tracker = OffsetTracker("user-actions", 0)

    def batch(first: int) -> list[Work]:
        tracker.track_many(range(first, first + 2))
        ms = [msg(click(event_id=f"e{o}"), offset=o, tracker=tracker) for o in (first, first + 1)]
        return p.prepare(p.to_batch(ms)[0])

    assert p.write_behind(batch(0)) == []  # under way, nothing finished yet
    second = p.write_behind(batch(2))
    assert [(w.message.offset, w.status) for w in second] == [(0, "done"), (1, "done")]
    p.ack(p.route(second))
    assert tracker.position == 2
    p.flush()  # the source read nothing new: the last batch is finished and acknowledged
    assert tracker.position == 4 and len(store.items) == 8
    p.flush()  # nothing under way: nothing to do
    writer.buggy = True  # a write that raises on the batch: rerun record by record
    assert p.write_behind(batch(4)) == []
    p.flush()
    assert tracker.position == 6 and len(store.items) == 12
    p.close()
    assert loop.is_closed()


def test_bulk_histogram_exposes_what_a_prometheus_histogram_of_the_same_values_does() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from featureplane.operators.metrics import BulkHistogram

    values = [0.0, 0.25, 0.375, 0.5, 2, 3600, 7200]  # on the bounds too; sums exact in binary
    bulk_registry, plain_registry = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("h", "doc", ["flow"], (0.25, 0.5, 3600), registry=bulk_registry)
    plain = Histogram("h", "doc", ["flow"], buckets=(0.25, 0.5, 3600), registry=plain_registry)
    bulk.observe_many(("ingest",), values[:3])
    bulk.observe_many(("ingest",), values[3:])
    for v in values:
        plain.labels("ingest").observe(v)

    def series(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return [ln for ln in text.splitlines() if ln.startswith("h_") and "created" not in ln]

    assert series(bulk_registry) == series(plain_registry)
