"""Unit tests of the redrive's choices, spec hash, headers and summary: no broker, no store."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import pytest

from featureplane.batch.dlq import REDRIVE_OF, REDRIVE_SPEC, DeadLetter
from featureplane.batch.redrive import (
    RedriveJob,
    Tally,
    _send_back,
    _write,
    choose,
    source_topic,
    spec_hash,
    summary,
)
from featureplane.batch.sink import Sink
from featureplane.errors import FeatureplaneError, ItemTooLargeError
from featureplane.operators.records import Work
from featureplane.operators.route import Outgoing
from featureplane.spec import load_catalog

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CATALOG = load_catalog(EXAMPLES)
T = 1_700_000_000_000


def letter(offset: int = 5, ts: int = T, **heads: str) -> DeadLetter:
    base = {"reason": "rule x: Result_Count must be int", "topic": "user-actions"}
    base |= {"partition": "2", "offset": "40", "attempt": "0"}
    return DeadLetter(1, offset, ts, b"k", b"{}", base | heads)


def test_choose_filters_then_skips_then_tries() -> None:
    job = RedriveJob("user-actions.dlq")
    assert choose(letter(), job, set(), "h") == "try"
    assert choose(letter(), RedriveJob("t.dlq", reason="RESULT_COUNT"), set(), "h") == "try"
    assert choose(letter(), RedriveJob("t.dlq", reason="timed out"), set(), "h") == "filtered"
    window = RedriveJob("t.dlq", start=T - 10, end=T + 10)
    assert choose(letter(ts=T - 10), window, set(), "h") == "try"
    assert choose(letter(ts=T + 10), window, set(), "h") == "try"
    assert choose(letter(ts=T - 11), window, set(), "h") == "filtered"
    assert choose(letter(ts=T + 11), window, set(), "h") == "filtered"
    assert choose(letter(offset=5), job, {"1:5"}, "h") == "redriven"
    assert choose(letter(offset=6), job, {"1:5"}, "h") == "try"
    assert choose(letter(**{REDRIVE_SPEC: "h"}), job, set(), "h") == "same spec"
    assert choose(letter(**{REDRIVE_SPEC: "old"}), job, set(), "h") == "try"
    assert choose(letter(truncated="true"), job, set(), "h") == "truncated"
    # A record outside the filters is neither skipped nor counted.
    assert choose(letter(ts=T - 11, truncated="true"), window, {"1:5"}, "h") == "filtered"


def test_a_dead_letter_is_read_as_its_original() -> None:
    m = letter(first_failure_ms="123", attempt="3").message("user-actions")
    assert (m.topic, m.partition, m.offset) == ("user-actions", 2, 40)
    assert (m.origin.topic, m.origin.partition, m.origin.offset) == ("user-actions", 2, 40)
    assert (m.attempt, m.first_failure_ms, m.key, m.value) == (3, 123, b"k", b"{}")
    bare = DeadLetter(0, 9, T, None, b"{}", {}).message("user-actions")
    assert (bare.partition, bare.offset, bare.attempt, bare.first_failure_ms) == (-1, -1, 0, None)


def test_source_topic() -> None:
    assert source_topic("user-actions.dlq") == "user-actions"
    for bad in ("user-actions", ".dlq", "user-actions.retry"):
        with pytest.raises(FeatureplaneError, match=r"TOPIC\.dlq"):
            source_topic(bad)


def test_spec_hash_covers_what_decides_the_topics_records_only() -> None:
    h = spec_hash(CATALOG, "user-actions")
    assert h == spec_hash(load_catalog(EXAMPLES), "user-actions")  # stable
    assert h != spec_hash(CATALOG, "article-updates")
    searches = CATALOG.groups["recent_user_searches"]
    fixed = searches.model_copy(
        update={
            "features": tuple(f.model_copy(update={"type": "string"}) for f in searches.features)
        }
    )
    changed = CATALOG.model_copy(update={"groups": {**CATALOG.groups, searches.name: fixed}})
    assert spec_hash(changed, "user-actions") != h
    # Another topic's groups, the rules' order and the batch jobs do not count.
    stats = CATALOG.groups["article_stats"]
    other = CATALOG.model_copy(
        update={
            "groups": {**CATALOG.groups, stats.name: stats.model_copy(update={"max_items": 7})},
            "rules": tuple(reversed(CATALOG.rules)),
            "jobs": {},
        }
    )
    assert spec_hash(other, "user-actions") == h


def test_summary() -> None:
    tally = Tally()
    tally.counts.update(
        {
            "read": 120,
            "selected": 100,
            "re-ingested": 90,
            "failed again": 10,
            "sent back": 10,
            "skipped redriven": 20,
        }
    )
    job = RedriveJob("user-actions.dlq")
    assert summary(job, tally) == (
        "redrive user-actions.dlq: 120 read, 100 selected, 90 re-ingested, 10 failed again "
        "(10 sent back to user-actions.dlq), 20 skipped (20 already redriven)"
    )
    tally.counts.update({"truncated": 2, "failed again": 2, "skipped same spec": 3, "no rule": 1})
    text = summary(RedriveJob("user-actions.dlq", dry_run=True), tally)
    assert text.startswith("redrive user-actions.dlq (dry run: nothing written): ")
    assert "91 would be re-ingested (1 matched no rule now: nothing to write)" in text
    assert "12 would fail again (2 truncated" in text
    assert "23 skipped (20 already redriven, 3 failed under this same spec)" in text


class FakeDelivery:
    max_message_bytes = 1_048_588

    def __init__(self, errors: list[str | None]) -> None:
        self.errors = errors
        self.sent: list[list[Outgoing]] = []

    def deliver(
        self, records: Sequence[Outgoing], timeout_s: float = 30.0, rounds: int = 3
    ) -> list[str | None]:
        self.sent.append(list(records))
        return [self.errors.pop(0) for _ in records]

    def close(self) -> None:
        pass


def failed_work(rec: DeadLetter, value: bytes = b"{}") -> Work:
    m = rec.message("user-actions")
    msg = type(m)(m.topic, m.partition, m.offset, m.key, value, m.origin, attempt=m.attempt)
    return Work(msg, status="malformed", reason="not valid JSON")


def test_send_back_adds_the_redrive_headers_and_recuts_a_copy_refused_as_too_large() -> None:
    rec = letter()
    big = failed_work(rec, b"x" * 100_000)
    delivery = FakeDelivery(["Broker: Message size too large (MSG_SIZE_TOO_LARGE)", None])
    _send_back(delivery, "user-actions.dlq", "abc", [(rec, big)])
    (first,), (second,) = delivery.sent
    heads = dict(first.headers)
    assert heads[REDRIVE_OF] == b"1:5" and heads[REDRIVE_SPEC] == b"abc"
    assert heads["reason"] == b"not valid JSON" and heads["offset"] == b"40"
    assert first.topic == second.topic == "user-actions.dlq"
    assert len(first.value or b"") == 100_000 and "truncated" not in heads
    cut = dict(second.headers)  # cut to a size any broker takes, the headers kept
    assert cut["truncated"] == b"true" and cut["original_size"] == b"100000"
    assert cut[REDRIVE_OF] == b"1:5" and len(second.value or b"") < 64 * 1024


def test_send_back_stops_the_run_when_the_dlq_does_not_confirm() -> None:
    delivery = FakeDelivery(["Local: Message timed out"])
    with pytest.raises(FeatureplaneError, match=r"cannot send 1 record.*run the redrive again"):
        _send_back(delivery, "user-actions.dlq", "abc", [(letter(), failed_work(letter()))])


class RefusingWriter:
    """Refuses (as invalid) any batch holding the work of `bad`; writes the rest."""

    def __init__(self, bad: Work) -> None:
        self.bad = bad
        self.calls: list[int] = []

    async def write(self, works: Sequence[Work]) -> list[Work]:
        self.calls.append(len(works))
        if any(w is self.bad for w in works):
            raise ItemTooLargeError("item of 9000 bytes")
        return [w.with_status("done") if w.status == "pending" else w for w in works]


def test_a_record_the_store_refuses_fails_again_alone() -> None:
    works = [Work(letter(offset=i).message("user-actions")) for i in range(3)]
    writer = RefusingWriter(works[1])
    sink = cast(Sink, type("FakeSink", (), {"writer": writer})())
    out = asyncio.run(_write(sink, works))
    assert [w.status for w in out] == ["done", "malformed", "done"]
    assert "ItemTooLargeError: item of 9000 bytes" in (out[1].reason or "")
    assert writer.calls == [3, 1, 1, 1]
