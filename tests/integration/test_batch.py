"""Batch jobs against real services: file loads (local JSONL and Parquet, S3 on moto) and backfill (tansu)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import boto3
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from featureplane.cli import main
from featureplane.codec import decode
from featureplane.spec import load_catalog
from featureplane.stores.base import Query
from featureplane.stores.embedded import EmbeddedStore
from tests.services import Service, ServiceError, start_moto

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CATALOG = load_catalog(EXAMPLES)
CLICKS = "recent_user_clicked_fleaMarketArticles"
T0 = (time.time_ns() // 1_000_000 // 3_600_000 - 48) * 3_600_000  # within retention


def _read(data: Path, group: str, ids: list[str]) -> list[list[dict]]:
    async def go() -> list[list[dict]]:
        g = CATALOG.group(group)
        async with EmbeddedStore(CATALOG, data) as store:
            got = await store.read([Query(group, i, limit=50) for i in ids])
        return [
            [dict(zip(g.index, decode(g, r.value), strict=True)) | {"ts": r.ts} for r in rs]
            for rs in got
        ]

    return asyncio.run(go())


def _rows(n: int) -> list[dict]:
    return [
        {"id": f"u{i % 3}", "ts": T0 + i, "article_id": f"a{i}", "category": "bike"}
        for i in range(n)
    ]


def test_load_jsonl_reports_bad_lines_and_is_idempotent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "clicks.jsonl"
    lines = [orjson.dumps(r) for r in _rows(30)]
    lines[4] = b"{not json"
    lines[7] = orjson.dumps({"id": "u1", "ts": T0, "nope": 1})
    src.write_bytes(b"\n".join(lines) + b"\n")
    argv = [
        "load",
        "--group",
        CLICKS,
        str(src),
        "--spec",
        str(EXAMPLES),
        "--data-dir",
        str(tmp_path / "d"),
        "--rejects",
        str(tmp_path / "rejects.jsonl"),
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert (
        f"{src}:5: not valid JSON" in err
        and f"{src}:8: group '{CLICKS}' has no feature 'nope'" in err
    )
    rejects = [orjson.loads(x) for x in (tmp_path / "rejects.jsonl").read_bytes().splitlines()]
    assert [r["line"] for r in rejects] == [5, 8]
    assert main(argv) == 1  # loading again overwrites: no duplicates
    got = _read(tmp_path / "d", CLICKS, ["u0", "u1", "u2"])
    assert sum(len(x) for x in got) == 28
    assert got[0][0] == {"ts": T0 + 27, "article_id": "a27", "session_id": None, "category": "bike"}


def test_load_parquet_with_a_features_column(tmp_path: Path) -> None:
    rows = [
        {
            "id": f"a{i}",
            "ts": T0 + i,
            "features": {"counts": {"views": i}, "price": 1.5 * i, "is_sold": i % 2 == 0},
        }
        for i in range(50)
    ]
    src = tmp_path / "stats.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    assert (
        main(
            [
                "load",
                "--group",
                "article_stats",
                str(src),
                "--spec",
                str(EXAMPLES),
                "--data-dir",
                str(tmp_path / "d"),
            ]
        )
        == 0
    )
    got = _read(tmp_path / "d", "article_stats", ["a7"])
    assert (
        got[0][0]["counts"] == {"views": 7}
        and got[0][0]["price"] == 10.5
        and got[0][0]["is_sold"] is False
    )


@pytest.fixture(scope="module")
def moto() -> Iterator[Service]:
    try:
        svc = start_moto()
    except ServiceError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield svc
    svc.cleanup()


def test_load_from_s3(tmp_path: Path, moto: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "AWS_ENDPOINT_URL_S3": f"http://{moto.address}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1")
    s3.create_bucket(Bucket="features")
    s3.put_object(
        Bucket="features",
        Key="daily/clicks.jsonl",
        Body=b"\n".join(orjson.dumps(r) for r in _rows(9)),
    )
    assert (
        main(
            [
                "load",
                "--group",
                CLICKS,
                "s3://features/daily/clicks.jsonl",
                "--spec",
                str(EXAMPLES),
                "--data-dir",
                str(tmp_path / "d"),
            ]
        )
        == 0
    )
    assert [len(x) for x in _read(tmp_path / "d", CLICKS, ["u0", "u1", "u2"])] == [3, 3, 3]
    assert (
        main(
            [
                "load",
                "--group",
                CLICKS,
                "s3://features/missing.jsonl",
                "--spec",
                str(EXAMPLES),
                "--data-dir",
                str(tmp_path / "d"),
            ]
        )
        == 1
    )


def test_backfill_a_time_range_for_some_groups(tmp_path: Path, kafka_bootstrap: str) -> None:
    topic = f"user-actions-{os.getpid()}-{id(tmp_path) % 10000}"
    spec = tmp_path / "spec"
    spec.mkdir()
    for f in EXAMPLES.glob("*.yaml"):
        (spec / f.name).write_text(f.read_text().replace("topic: user-actions", f"topic: {topic}"))
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for fut in admin.create_topics(
        [NewTopic(topic, num_partitions=2, replication_factor=1)]
    ).values():
        fut.result()
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(300):  # three windows of 100 records, one ms apart
        ts = T0 + (i // 100) * 3_600_000 + i
        event = {
            "event_id": f"e{i}",
            "event_type": "click",
            "ts": ts,
            "user_id": f"u{i % 4}",
            "session": "s",
            "article": {"id": f"a{i}", "kind": "fleaMarket", "category": "bike"},
        }
        producer.produce(topic, orjson.dumps(event), key=f"u{i % 4}".encode(), timestamp=ts)
    producer.produce(topic, b"{broken", timestamp=T0 + 3_600_000 + 50)
    producer.flush(10)
    base = [
        "backfill",
        "--topic",
        topic,
        "--spec",
        str(spec),
        "--bootstrap",
        kafka_bootstrap,
        "--data-dir",
        str(tmp_path / "d"),
    ]
    until = datetime.fromtimestamp((T0 + 3_600_000 + 199) / 1000, UTC).isoformat()
    window = ["--from", str(T0 + 3_600_000), "--to", until]  # ISO 8601 works too
    assert main([*base, *window, "--groups", CLICKS]) == 0
    clicks = _read(tmp_path / "d", CLICKS, ["u0", "u1", "u2", "u3"])
    assert sum(len(x) for x in clicks) == 100
    assert {r["ts"] for x in clicks for r in x} == {T0 + 3_600_000 + i for i in range(100, 200)}
    assert _read(tmp_path / "d", "user_last_click", ["u0"]) == [[]]  # not in --groups
    assert main([*base, *window]) == 0
    assert _read(tmp_path / "d", "user_last_click", ["u3"])[0][0]["article_id"] == "a199"
