"""The pure parts of sharding: line cutting, the split of pieces, backfill units, and a
sharded load through a counting sink (every row written exactly once over all I/N)."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featureplane.batch import load as load_module
from featureplane.batch import sources
from featureplane.batch.load import LoadJob, load_shard
from featureplane.batch.shards import Piece, backfill_units, cut, cut_lines, split
from featureplane.settings import Settings
from featureplane.spec import load_catalog

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _lines(text: bytes) -> list[tuple[int, bytes]]:
    """(offset, line) of every line ending in \n (binary files split there alone)."""
    out, at = [], 0
    for body in text.split(b"\n"):
        line = body + b"\n" if at + len(body) < len(text) else body
        if line:
            out.append((at, line))
        at += len(line)
    return out


@settings(max_examples=300, deadline=None)
@given(
    text=st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")), max_size=30).map(
        b"\n".join
    )
    | st.binary(max_size=200),
    cuts=st.lists(st.integers(0, 220), max_size=6),
    chunk=st.integers(1, 17),
)
def test_ranges_hold_each_line_once(text: bytes, cuts: list[int], chunk: int) -> None:
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    got = []
    for a, b in itertools.pairwise(bounds):
        tail = text[max(a - 1, 0) :]
        got += cut_lines([tail[i : i + chunk] for i in range(0, len(tail), chunk)], a, b)
    assert got == _lines(text)


def test_cut_and_split_are_even_and_deterministic() -> None:
    assert cut(10, 4) == [(0, 3), (3, 6), (6, 10)]
    assert cut(0, 4) == [(0, 0)]
    ps = [Piece(f"f{i}", s, "file", 0, s) for i, s in enumerate([5, 100, 7, 30, 30, 30, 1, 60])]
    for n in (1, 2, 3, 5, 8, 12):
        shards = split(ps, n)
        assert shards == split(list(ps), n)  # from the pieces and n alone
        assert [p for s in shards for p in s] == ps  # contiguous, in order, each once
        # no shard holds more than its share plus one piece
        assert max(sum(p.size for p in s) for s in shards) <= 263 / n + 100
    even = [Piece(f"f{i}", 10, "file", 0, 10) for i in range(12)]
    assert [len(s) for s in split(even, 4)] == [3, 3, 3, 3]
    empty = [Piece(f"e{i}", 0, "file", 0, 0) for i in range(4)]
    assert [len(s) for s in split(empty, 2)] == [2, 2]


@pytest.mark.parametrize("parts", [1, 2, 3, 6])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 13])
def test_backfill_units_cover_every_partition_and_ms_once(parts: int, n: int) -> None:
    start, end = 1000, 1036
    seen: Counter[tuple[int, int]] = Counter()
    for i in range(n):
        units = backfill_units(list(range(parts)), start, end, (i, n))
        for p, (lo, hi) in units.items():
            seen.update((p, ms) for ms in range(lo, hi + 1))
    assert seen == Counter({(p, ms): 1 for p in range(parts) for ms in range(start, end + 1)})
    assert backfill_units([1, 0], 5, 9, None) == {0: (5, 9), 1: (5, 9)}


def test_a_tiny_range_gives_some_shards_nothing() -> None:
    got = [backfill_units([0], 10, 11, (i, 4)) for i in range(4)]
    assert sorted(u for g in got for u in g.values()) == [(10, 10), (11, 11)]


class CountingSink:
    """Stands in for the batch Sink: counts every item written, by event id."""

    written: Counter[str] = Counter()

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    async def __aenter__(self) -> CountingSink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def write(self, items: list) -> None:
        for item in items:
            CountingSink.written[f"{item.id}/{item.ts}"] += 1


def test_every_shard_over_n_writes_each_row_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(load_module, "Sink", CountingSink)
    monkeypatch.setattr(sources, "MIN_RANGE", 512)
    catalog = load_catalog(EXAMPLES)
    rows = [
        orjson.dumps({"id": f"u{i % 7}", "ts": 1_700_000_000_000 + i, "article_id": "x" * (i % 50)})
        for i in range(400)
    ]
    rows[17] = b""  # a blank line
    rows[33] = b"{broken"
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(rows[:350]) + b"\n")
    (tmp_path / "b.jsonl").write_bytes(b"\n".join(rows[350:]))  # no final newline
    s = Settings(data_dir=tmp_path / "d")
    group = "recent_user_clicked_fleaMarketArticles"
    for n in (1, 2, 3, 5):
        CountingSink.written.clear()
        rejected = []
        for i in range(n):
            job = LoadJob(str(tmp_path / "*.jsonl"), group, None, 50, None, (i, n))
            done = asyncio.run(load_shard(s, catalog, job))
            rejected += done.rejects
        assert len(CountingSink.written) == 398 and set(CountingSink.written.values()) == {1}
        assert [r.reason[:14] for r in rejected] == ["not valid JSON"]
    job = LoadJob(str(tmp_path / "*.jsonl"), group, None, 50, None, (0, 5))
    cut_up = asyncio.run(sources.pieces(asyncio.run(sources.list_files(job.source)), "jsonl", 5))
    assert any(p.kind == "bytes" and p.start > 0 for p in cut_up)  # a.jsonl was cut


class FakeConsumer:
    """Kafka's documented answers: offsets_for_times gives the first offset stamped at or
    after the time, -1 when there is none; the high watermark is the next offset."""

    def __init__(self, stamps: dict[int, list[int]]) -> None:
        self.stamps = stamps

    def list_topics(self, topic: str, timeout: float) -> object:
        part = type("P", (), {"error": None, "partitions": dict.fromkeys(self.stamps)})
        return type("M", (), {"topics": {topic: part}})

    def offsets_for_times(self, tps: list, timeout: float) -> list:
        from confluent_kafka import TopicPartition

        out = []
        for tp in tps:
            offsets = [o for o, ts in enumerate(self.stamps[tp.partition]) if ts >= tp.offset]
            out.append(TopicPartition(tp.topic, tp.partition, offsets[0] if offsets else -1))
        return out

    def get_watermark_offsets(self, tp: object, timeout: float) -> tuple[int, int]:
        return 0, len(self.stamps[tp.partition])  # type: ignore[attr-defined]

    def close(self) -> None:
        pass


def test_survey_counts_records_between_the_offsets(monkeypatch: pytest.MonkeyPatch) -> None:
    from featureplane.batch import backfill

    fake = FakeConsumer({0: [10, 20, 30, 40], 1: [5, 25, 26], 2: [1, 2]})
    monkeypatch.setattr(backfill, "_consumer", lambda settings: ("fake", fake))
    s = Settings(kafka_bootstrap="fake:9092")
    assert backfill.survey(s, "t", 20, 30) == (3, 2 + 2 + 0)
    assert backfill.survey(s, "t", 21, 100) == (3, 2 + 2)
    assert backfill.survey(s, "t", 100, 200) == (3, 0)


def test_a_shard_pushes_its_counts_on_success_and_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from featureplane.batch import metrics
    from featureplane.errors import FeatureplaneError

    pushed: list[tuple] = []
    monkeypatch.setattr(metrics, "push_shard", lambda *a: pushed.append(a[1:]))
    monkeypatch.setattr(load_module, "Sink", CountingSink)
    (tmp_path / "a.jsonl").write_bytes(b'{"id": "u1", "ts": 1700000000000}\n{"id": 1}\n')
    catalog = load_catalog(EXAMPLES)
    s = Settings(data_dir=tmp_path / "d", pushgateway_url="http://127.0.0.1:9")
    group = "recent_user_clicked_fleaMarketArticles"
    job = LoadJob(str(tmp_path / "*.jsonl"), group, None, 50, None, (1, 2))  # the one file's
    assert load_module.run(s, catalog, job) == 1  # one row rejected
    assert pushed == [((1, 2), load_module.ShardResult(1, 1, 44), None)]
    with pytest.raises(FeatureplaneError, match="no file matches"):
        load_module.run(s, catalog, LoadJob(str(tmp_path / "x*"), group, None, 50, None, (0, 2)))
    assert pushed[1][0] == (0, 2) and pushed[1][1] is None and "no file matches" in pushed[1][2]
    load_module.run(s.model_copy(update={"pushgateway_url": None}), catalog, job)
    assert len(pushed) == 2  # no Pushgateway, no push
