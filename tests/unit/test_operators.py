"""Unit tests of the ingestion operators with fakes: no broker, no store."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType

import pytest

from featureplane.codec import Item
from featureplane.errors import TransientStoreError
from featureplane.spec import load_catalog
from featureplane.stores.base import Query, Store
from operators.aggregate import Aggregator
from operators.commit import OffsetTracker
from operators.decode import MalformedError, decode_event, decode_works
from operators.dispatch import MISSING, Dispatcher, get_path
from operators.records import Message, Origin, Work
from operators.retry import Backoff, RetryHold
from operators.route import parse_retry_headers, route_of
from operators.write import Writer, classify

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


class FakeCache:
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
    from featureplane.errors import ValidationError

    assert classify(ValidationError("x"), "store").malformed


# ---------------------------------------------------------------- route and retry


def test_route_transient_to_retry_then_dlq_after_max_attempts() -> None:
    w = Work(msg(click(), offset=7), status="transient", reason="redis down")
    out = route_of(w, max_attempts=2, now_ms=T)
    assert out is not None and out.kind == "retry" and out.topic == "user-actions.retry"
    h = dict(out.headers)
    assert h["attempt"] == b"1" and h["first_failure_ms"] == str(T).encode()
    assert h["offset"] == b"7" and h["reason"] == b"redis down"
    topic, origin, attempt, first = parse_retry_headers(list(out.headers), "x.retry", 3, 99)
    assert (topic, origin, attempt, first) == ("user-actions", Origin("user-actions", 0, 7), 1, T)
    late = Work(msg(click(), attempt=2), status="transient", reason="still down")
    out = route_of(late, max_attempts=2, now_ms=T)
    assert out is not None and out.kind == "dlq" and out.topic == "user-actions.dlq"
    assert dict(out.headers)["reason"].startswith(b"gave up after 2 retries")
    bad = Work(msg(b"{"), status="malformed", reason="not valid JSON")
    out = route_of(bad, 5, T)
    assert out is not None and out.kind == "dlq" and out.value == b"{"
    assert route_of(Work(msg(click()), status="done"), 5, T) is None


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
