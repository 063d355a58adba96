"""`--shard I/N` against real services: every I over one N loads (local and S3 on moto,
JSONL and Parquet) or backfills (tansu) exactly the items of one unsharded run; bad
input is a clear message and exit status 1; `batch plan` on the example catalog."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from featureplane.batch.shards import plan_job
from featureplane.batch.sources import list_files, pieces
from featureplane.cli import main
from featureplane.codec import decode
from featureplane.settings import Settings
from featureplane.spec import load_catalog
from featureplane.stores.base import Query
from featureplane.stores.embedded import EmbeddedStore
from tests.services import running, start_moto

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CATALOG = load_catalog(EXAMPLES)
CLICKS = "recent_user_clicked_fleaMarketArticles"
T0 = (time.time_ns() // 1_000_000 // 3_600_000 - 48) * 3_600_000  # within retention
IDS = [f"u{i}" for i in range(120)]


def _items(data: Path, group: str = CLICKS) -> dict[str, list[tuple[int, tuple]]]:
    async def go() -> dict[str, list[tuple[int, tuple]]]:
        g = CATALOG.group(group)
        async with EmbeddedStore(CATALOG, data) as store:
            got = await store.read([Query(group, i, limit=50) for i in IDS])
        return {
            i: [(r.ts, tuple(decode(g, r.value))) for r in rs]
            for i, rs in zip(IDS, got, strict=True)
        }

    return asyncio.run(go())


def _rows(n: int) -> list[bytes]:
    """Click rows of varying length, 25 per id, a blank line and a bad line among them."""
    rows = [
        orjson.dumps(
            {"id": IDS[i % 120], "ts": T0 + i, "article_id": f"a{i}-" + "x" * (i * 7 % 90)}
        )
        for i in range(n)
    ]
    rows[40], rows[1200] = b"", b'{"id": "u1", "ts": '
    return rows


def _jsonl_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = _rows(3000)
    (folder / "a.jsonl").write_bytes(b"\n".join(rows[:2600]) + b"\n")  # ~250 KB: cut
    (folder / "b.jsonl").write_bytes(b"\n".join(rows[2600:2900]) + b"\n")
    (folder / "c.jsonl").write_bytes(b"\n".join(rows[2900:]))  # no final newline


def _parquet_file(path: Path) -> None:
    rows = [orjson.loads(r) for r in _rows(3000) if r.startswith(b'{"id":"')]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=250, compression="none")


def _load(source: str, data: Path, *extra: str) -> int:
    return main(
        [
            "load",
            "--group",
            CLICKS,
            source,
            "--data-dir",
            str(data),
            "--spec",
            str(EXAMPLES),
            *extra,
        ]
    )


def _every_shard_matches_one_run(source: str, tmp: Path, bad: int) -> None:
    whole = tmp / "whole"
    assert _load(source, whole) == (1 if bad else 0)
    want = _items(whole)
    assert sum(len(v) for v in want.values()) == 3000 - 2
    for n in (1, 2, 3, 5):
        data = tmp / f"n{n}"
        codes = [_load(source, data, "--shard", f"{i}/{n}") for i in range(n)]
        assert codes.count(1) == bad  # the one bad line is in exactly one shard
        assert _items(data) == want, n


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    with running(start_moto) as moto:
        env = {
            "AWS_ENDPOINT_URL_S3": f"http://{moto.address}",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
        }
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        client = boto3.client(
            "s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1"
        )
        client.create_bucket(Bucket="dumps")
        yield client
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_local_jsonl_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _jsonl_files(tmp_path / "in" / "2026-11-30")
    _every_shard_matches_one_run(str(tmp_path / "in" / "**" / "*.jsonl"), tmp_path, bad=1)
    err = capsys.readouterr().err
    assert f"{tmp_path}/in/2026-11-30/a.jsonl:1201: not valid JSON" in err  # unsharded
    assert "a.jsonl: line at byte " in err  # a later range of a cut file


def test_local_parquet_shards(tmp_path: Path) -> None:
    _parquet_file(tmp_path / "clicks.parquet")
    assert pq.ParquetFile(tmp_path / "clicks.parquet").metadata.num_row_groups == 12
    files = asyncio.run(list_files(str(tmp_path / "*.parquet")))
    cut_up = asyncio.run(pieces(files, "parquet", 5))
    assert [(p.kind, p.start, p.end, p.first_row) for p in cut_up] == [
        ("row_groups", 0, 4, 0),
        ("row_groups", 4, 8, 1000),
        ("row_groups", 8, 12, 2000),
    ]  # runs of row groups of at least MIN_RANGE (64 KiB) bytes
    _every_shard_matches_one_run(str(tmp_path / "*.parquet"), tmp_path, bad=0)


def test_s3_shards(tmp_path: Path, s3: Any) -> None:
    _jsonl_files(tmp_path / "in")
    for f in sorted((tmp_path / "in").iterdir()):
        s3.put_object(Bucket="dumps", Key=f"clicks/2026-11-30/{f.name}", Body=f.read_bytes())
    _every_shard_matches_one_run("s3://dumps/clicks/2026-11-30/*.jsonl", tmp_path / "j", bad=1)
    _parquet_file(tmp_path / "c.parquet")
    s3.put_object(
        Bucket="dumps", Key="pq/2026-11-30/c.parquet", Body=(tmp_path / "c.parquet").read_bytes()
    )
    _every_shard_matches_one_run("s3://dumps/pq/*/c.parquet", tmp_path / "p", bad=0)


def test_bad_input_is_one_clear_line(
    tmp_path: Path, s3: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "d"
    assert _load("s3://dumps/nothing-here/*.jsonl", data) == 1
    assert (
        "nothing matches s3://dumps/nothing-here/*.jsonl: no S3 object under s3://dumps/nothing-here/"
        in capsys.readouterr().err
    )
    assert _load("s3://no-such-bucket/x/*.jsonl", data) == 1
    assert "no S3 bucket 'no-such-bucket'" in capsys.readouterr().err
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all\n" * 10)
    assert _load(str(tmp_path / "fake.parquet"), data) == 1
    assert f"cannot read {tmp_path}/fake.parquet" in capsys.readouterr().err
    _parquet_file(tmp_path / "cut.parquet")
    whole = (tmp_path / "cut.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(whole[: len(whole) // 2])  # truncated
    assert _load(str(tmp_path / "cut.parquet"), data, "--shard", "1/3") == 1
    assert f"cannot read {tmp_path}/cut.parquet" in capsys.readouterr().err
    # --shard on a glob matching nothing, through the real command line
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "featureplane.cli",
            "load",
            "--group",
            CLICKS,
            f"{tmp_path}/none/*.jsonl",
            "--shard",
            "0/2",
            "--spec",
            str(EXAMPLES),
            "--data-dir",
            str(data),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"no file matches {tmp_path}/none/*.jsonl" in proc.stderr


def _topic(tmp_path: Path, bootstrap: str, partitions: int) -> tuple[str, Path]:
    topic = f"user-actions-{uuid.uuid4().hex[:12]}"
    spec = tmp_path / "spec"
    spec.mkdir()
    for f in EXAMPLES.glob("*.yaml"):
        (spec / f.name).write_text(f.read_text().replace("topic: user-actions", f"topic: {topic}"))
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics(
        [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
    ).values():
        fut.result()
    return topic, spec


def test_backfill_shards_over_partitions_and_slices(
    tmp_path: Path, kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    topic, spec = _topic(tmp_path, kafka_bootstrap, 3)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(600):
        ts = T0 + i * 997  # ~10 minutes of events
        event = {
            "event_id": f"e{i}",
            "event_type": "click",
            "ts": ts,
            "user_id": IDS[i % 120],
            "session": "s",
            "article": {"id": f"a{i}", "kind": "fleaMarket", "category": "bike"},
        }
        producer.produce(topic, orjson.dumps(event), key=IDS[i % 120].encode(), timestamp=ts)
    producer.produce(topic, b"{broken", partition=0, timestamp=T0 + 5000)
    assert producer.flush(10) == 0
    window = ["--from", str(T0 + 20_000), "--to", str(T0 + 500_000)]
    base = [
        "backfill",
        "--topic",
        topic,
        "--spec",
        str(spec),
        "--bootstrap",
        kafka_bootstrap,
        *window,
        "--groups",
        CLICKS,
    ]
    assert main([*base, "--data-dir", str(tmp_path / "whole")]) == 0
    want = _items(tmp_path / "whole")
    assert sorted(ts for v in want.values() for ts, _ in v) == [
        T0 + i * 997 for i in range(600) if 20_000 <= i * 997 <= 500_000
    ]
    for n in (1, 2, 3, 5):
        for i in range(n):
            assert main([*base, "--data-dir", str(tmp_path / f"n{n}"), "--shard", f"{i}/{n}"]) == 0
        assert _items(tmp_path / f"n{n}") == want, n
    capsys.readouterr()
    empty = ["--from", str(T0 - 90_000_000), "--to", str(T0 - 80_000_000)]
    assert main([*base[:-4], *empty, "--data-dir", str(tmp_path / "e"), "--shard", "0/2"]) == 0
    assert "no record stamped in the range for this shard" in capsys.readouterr().err
    catalog = load_catalog(spec)
    job = catalog.jobs["recent_clicks_rebuild"].model_copy(
        update={
            "backfill": catalog.jobs["recent_clicks_rebuild"].backfill.model_copy(
                update={"from_": T0 - 90_000_000, "to": T0 - 80_000_000}
            )
        }
    )
    settings = Settings(kafka_bootstrap=kafka_bootstrap, data_dir=tmp_path / "e")
    plan = asyncio.run(plan_job(settings, catalog, job, T0, None))
    assert (plan.size, plan.shards, plan.unit) == (0, 1, "records")
    # (tansu answers every offsets-for-times lookup with offset 0, so a survey of a range
    # with records cannot be checked against it: tests/unit/test_batch_shards.py checks
    # the arithmetic with Kafka's documented answers)
    assert plan.inputs == "3 partitions, 0 records" and plan.reason.startswith("auto: 0 records")


def test_batch_plan_of_the_example_catalog(
    tmp_path: Path,
    kafka_bootstrap: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, spec = _topic(tmp_path, kafka_bootstrap, 2)
    day = "2026-11-30"
    stats = tmp_path / "samples" / "article_stats" / day
    stats.mkdir(parents=True)
    for k in range(3):
        (stats / f"part-{k}.jsonl").write_bytes(
            b"\n".join(
                orjson.dumps({"id": f"a{j}", "ts": T0, "features": {"price": 1.0}})
                for j in range(100)
            )
        )
    (tmp_path / "samples" / "article_embeddings").mkdir()
    (tmp_path / "samples" / "article_embeddings" / f"{day}.jsonl").write_bytes(
        b'{"id": "a1", "ts": 1, "features": {"model": "m"}}\n'
    )
    monkeypatch.chdir(tmp_path)
    base = [
        "batch",
        "plan",
        "--spec",
        str(spec),
        "--bootstrap",
        kafka_bootstrap,
        "--at",
        f"{day}T12:00:00Z",
        "--data-dir",
        str(tmp_path / "d"),
    ]
    assert main(base) == 0
    text = capsys.readouterr().out
    assert (
        text.index("article_stats_daily")
        < text.index("article_embeddings_daily")
        < text.index("recent_clicks_rebuild")
    )
    assert "3 jsonl files" in text and "shards    2: parallelism: 2 in the spec" in text
    assert (
        "(next 2026-12-01T03:30:00Z)" in text
        and "after article_stats_daily, article_embeddings_daily" in text
    )
    assert main([*base, "--json"]) == 0
    plan = orjson.loads(capsys.readouterr().out)
    jobs = {j["name"]: j for j in plan["jobs"]}
    assert list(jobs) == [
        "article_stats_daily",
        "article_embeddings_daily",
        "recent_clicks_rebuild",
    ]
    assert jobs["article_stats_daily"]["shards"] == 1 and jobs["article_stats_daily"][
        "reason"
    ].startswith("auto: ")
    assert jobs["recent_clicks_rebuild"]["inputs"] == "2 partitions, 0 records"
    assert main([*base, "--shard-list", "article_embeddings_daily"]) == 0
    assert capsys.readouterr().out == '["0/2","1/2"]\n'
    (tmp_path / "samples" / "article_embeddings" / f"{day}.jsonl").unlink()
    assert main(base) == 1
    out, err = capsys.readouterr()
    assert f"problem   no such file: samples/article_embeddings/{day}.jsonl" in out
    assert "recent_clicks_rebuild" in out and "could not plan: article_embeddings_daily" in err
    assert main([*base, "recent_clicks"]) == 1
    assert "did you mean 'recent_clicks_rebuild'?" in capsys.readouterr().err


def test_plan_job_and_run_shard_do_the_whole_load(tmp_path: Path) -> None:
    from featureplane.batch.shards import run_shard
    from featureplane.jobs import BatchJob

    _jsonl_files(tmp_path / "in" / "2026-11-30")
    job = BatchJob.model_validate(
        {"name": "clicks", "load": {"group": CLICKS, "source": f"{tmp_path}/in/{{date}}/*.jsonl"}}
    )
    at = 1_796_040_000_000  # 2026-11-30T12:00Z
    s = Settings(data_dir=tmp_path / "sharded", batch_target_duration=1, batch_max_shards=4)
    plan = asyncio.run(plan_job(s, CATALOG, job, at, None))
    assert plan.shards == 4 and "capped at batch_max_shards=4" in plan.reason
    assert plan.inputs.startswith("3 jsonl files, 0.3 MB, ") and not plan.speed_measured
    reported: list[tuple[int, int]] = []
    results = [
        asyncio.run(
            run_shard(
                s,
                CATALOG,
                job,
                at,
                (i, 4),
                lambda d, r: reported.append((d, r)),
                tmp_path / f"rejects-{i}.jsonl",
            )
        )
        for i in range(4)
    ]
    assert sum(r.done for r in results) == 2998 == sum(d for d, _ in reported)
    assert sum(r.rejected for r in results) == 1 == sum(r for _, r in reported)
    assert sum(r.work for r in results) == sum(
        f.stat().st_size for f in (tmp_path / "in").rglob("*.jsonl")
    )
    assert len(list(tmp_path.glob("rejects-*.jsonl"))) == 1
    assert _load(f"{tmp_path}/in/*/*.jsonl", tmp_path / "whole") == 1
    assert _items(tmp_path / "sharded") == _items(tmp_path / "whole")
