"""`batch run` end to end on real services: a DAG of a Parquet load and a JSONL load from
S3 (moto) and a backfill after both (tansu), into the embedded store, served by the
HTTP API; a shard SIGKILLed mid-run; the rerun resumes; metrics reach a real
Pushgateway (prometheus-pushgateway, from Debian).

The shard to kill is held still by `slow_run_shard`, a wrapper of the real
`run_shard` defined here and handed to the runner: its progress callback sleeps
for the shard named in FP_TEST_HOLD. Nothing in the product reads that variable.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp.test_utils import TestClient, TestServer
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

from featureplane.batch import metrics
from featureplane.batch.runs import Runs
from featureplane.batch.shards import ShardResult, run_shard
from featureplane.cli import main
from featureplane.jobs import BatchJob
from featureplane.serving.app import create_app
from featureplane.settings import Settings
from featureplane.spec import Catalog, load_catalog
from featureplane.stores.embedded import EmbeddedStore
from tests.services import Service, free_port, running, start_moto

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CLICKS = "recent_user_clicked_fleaMarketArticles"
USERS = [f"u{i}" for i in range(5)]
PARQUET_FILES, PARQUET_ROWS, EVENTS, STATS = 3, 30, 100, 40


async def slow_run_shard(
    settings: Settings,
    catalog: Catalog,
    job: BatchJob,
    at_ms: int,
    shard: tuple[int, int],
    report: Callable[[int, int], None] | None = None,
    rejects: Path | None = None,
) -> ShardResult:
    held = os.environ.get("FP_TEST_HOLD") == f"{job.name}.{shard[0]}"

    def slow_report(done: int, rejected: int) -> None:
        assert report is not None
        report(done, rejected)
        if held:
            Path(os.environ["FP_TEST_HELD"]).write_text(str(os.getpid()))
            time.sleep(120)  # killed here, after its first batch was written

    return await run_shard(settings, catalog, job, at_ms, shard, slow_report, rejects)


_FIRST_RUN = """
import sys
from featureplane.batch import runner
from featureplane.settings import Settings
from featureplane.spec import load_catalog
from tests.integration.test_batch_run import slow_run_shard
settings = Settings(spec=sys.argv[1], data_dir=sys.argv[2], kafka_bootstrap=sys.argv[3],
                    pushgateway_url=sys.argv[4])
sys.exit(runner.run(settings, load_catalog(settings.spec), [], int(sys.argv[5]), workers=2,
                    new=False, run_shard=slow_run_shard))
"""


@pytest.fixture(scope="module")
def moto() -> Iterator[Service]:
    with running(start_moto) as svc:
        yield svc


def _spec(folder: Path, topic: str) -> Path:
    folder.mkdir()
    for name in ("groups.yaml", "ingestion.yaml"):
        text = (EXAMPLES / name).read_text().replace("topic: user-actions", f"topic: {topic}")
        (folder / name).write_text(text)
    (folder / "batch.yaml").write_text(f"""\
batch_jobs:
  - name: clicks_parquet
    load: {{group: {CLICKS}, source: "s3://fp-batch/clicks/{{date}}/*.parquet"}}
    parallelism: 3
    schedule: "30 3 * * *"
  - name: stats_jsonl
    load: {{group: article_stats, source: "s3://fp-batch/stats/{{date}}.jsonl"}}
    parallelism: 2
  - name: rebuild
    backfill: {{topic: {topic}, from: -1d, to: now, groups: [{CLICKS}]}}
    after: [clicks_parquet, stats_jsonl]
    parallelism: 2
""")
    return folder


def _inputs(moto: Service, kafka: str, topic: str, at: int) -> None:
    s3 = boto3.client("s3", endpoint_url=f"http://{moto.address}", region_name="us-east-1")
    s3.create_bucket(Bucket="fp-batch")
    day = datetime.fromtimestamp(at / 1000, UTC).strftime("%Y-%m-%d")
    for f in range(PARQUET_FILES):
        rows = [
            {
                "id": USERS[i % len(USERS)],
                "ts": at - 7_200_000 + f * 1000 + i,
                "event_id": f"p{f}-{i}",
                "article_id": f"pa{f}-{i}",
                "session_id": "s",
                "category": "bike",
            }
            for i in range(PARQUET_ROWS)
        ]
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        s3.put_object(
            Bucket="fp-batch",
            Key=f"clicks/{day}/part-{f}.parquet",
            Body=buf.getvalue().to_pybytes(),
        )
    stats = [
        {"id": f"a{i}", "ts": at - 1000, "counts": {"views": i}, "price": 1.5, "is_sold": False}
        for i in range(STATS)
    ]
    s3.put_object(
        Bucket="fp-batch", Key=f"stats/{day}.jsonl", Body=b"\n".join(map(orjson.dumps, stats))
    )
    admin = AdminClient({"bootstrap.servers": kafka})
    for fut in admin.create_topics([NewTopic(topic, num_partitions=2)]).values():
        fut.result()
    producer = Producer({"bootstrap.servers": kafka})
    for i in range(EVENTS):
        ts = at - 3_600_000 + i
        user = USERS[i % len(USERS)]
        event = {
            "event_id": f"e{i}",
            "event_type": "click",
            "ts": ts,
            "user_id": user,
            "session": "s",
            "article": {"id": f"ea{i}", "kind": "fleaMarket", "category": "bike"},
        }
        producer.produce(topic, orjson.dumps(event), key=user.encode(), timestamp=ts)
    producer.flush(10)


async def _served(catalog: Catalog, data: Path) -> dict[str, Any]:
    app = create_app(catalog, store=EmbeddedStore(catalog, data))
    body = {
        "requests": [
            {"group": CLICKS, "ids": USERS, "limit": 50},
            {"group": "article_stats", "ids": ["a7", "a39"]},
        ]
    }
    async with TestClient(TestServer(app)) as client:
        resp = await client.post("/v1/features", json=body)
        assert resp.status == 200
        return await resp.json()  # type: ignore[no-any-return]


def _wait_for(check: Callable[[], bool], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_dag_run_killed_shard_and_resume(
    tmp_path: Path,
    moto: Service,
    kafka_bootstrap: str,
    pushgateway: Service,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for k, v in {
        "AWS_ENDPOINT_URL_S3": f"http://{moto.address}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "FP_TEST_HOLD": "clicks_parquet.1",
        "FP_TEST_HELD": str(tmp_path / "held"),
    }.items():
        monkeypatch.setenv(k, v)
    topic = f"batch-run-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    spec, data = _spec(tmp_path / "spec", topic), tmp_path / "data"
    at = int(time.time() * 1000)
    _inputs(moto, kafka_bootstrap, topic, at)
    url = f"http://{pushgateway.address}"

    # the first run: shard 1 of clicks_parquet is SIGKILLed after writing its first batch
    root = Path(__file__).resolve().parents[2]
    argv = [sys.executable, "-c", _FIRST_RUN, str(spec), str(data), kafka_bootstrap, url]
    first = subprocess.Popen([*argv, str(at)], cwd=root, stderr=subprocess.PIPE, text=True)
    held = tmp_path / "held"
    _wait_for(held.exists, "the held shard", 60)
    os.kill(int(held.read_text()), signal.SIGKILL)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 1, err
    runs = Runs.open(Settings(data_dir=data))
    (run,) = runs.recent(5)
    jobs = {j.name: (j.state, j.error) for j in run.job_records}
    assert jobs["clicks_parquet"] == ("failed", "shard 1 failed: worker died (SIGKILL)")
    assert jobs["stats_jsonl"] == ("succeeded", None)  # independent: it finished
    assert jobs["rebuild"] == ("skipped", "not run: clicks_parquet did not succeed")
    failed = [(s.job, s.shard) for s in run.shard_records if s.state == "failed"]
    assert failed == [("clicks_parquet", 1)]
    assert "clicks_parquet shard 1: worker died (SIGKILL)" in err
    done = {(s.job, s.shard): s for s in run.shard_records if s.state == "done"}
    assert {("stats_jsonl", 0), ("stats_jsonl", 1)} <= set(done)
    logs = {k: (Path(s.log or ""), Path(s.log or "").stat().st_mtime_ns) for k, s in done.items()}

    # the rerun (the CLI, as a user types it) resumes the run and does only what is left
    monkeypatch.delenv("FP_TEST_HOLD")
    base = ["--spec", str(spec), "--data-dir", str(data), "--bootstrap", kafka_bootstrap]
    capsys.readouterr()
    assert main(["batch", "run", "--workers", "2", "--pushgateway-url", url, *base]) == 0
    err = capsys.readouterr().err
    # rebuild was never planned: 5 shards known, of clicks_parquet and stats_jsonl
    assert f"resuming run {run.id}: {len(done)} of 5 shards done" in err
    again = runs.get(run.id)
    assert again.state == "succeeded" and (again.done, again.total) == (7, 7)
    for key, (log, mtime) in logs.items():
        (shard,) = [s for s in again.shard_records if (s.job, s.shard) == key]
        assert shard.attempts == 1 and log.stat().st_mtime_ns == mtime, key
    (redone,) = [s for s in again.shard_records if (s.job, s.shard) == ("clicks_parquet", 1)]
    assert redone.attempts == 2 and redone.state == "done"

    # served: every click once (Parquet rows + backfilled events), no duplicates
    catalog = load_catalog(spec)
    answer = asyncio.run(_served(catalog, data))
    clicks, stats = answer["results"][: len(USERS)], answer["results"][len(USERS) :]
    per_user = (PARQUET_FILES * PARQUET_ROWS + EVENTS) // len(USERS)
    assert [len(r["items"]) for r in clicks] == [per_user] * len(USERS)
    for r in clicks:
        assert len({i["features"]["article_id"] for i in r["items"]}) == per_user
    assert [s["features"]["counts"] for s in stats] == [{"views": 7}, {"views": 39}]

    # status names the run; the metrics file and the Pushgateway have every job
    capsys.readouterr()
    assert main(["batch", "status", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    rows = PARQUET_FILES * PARQUET_ROWS + STATS + EVENTS
    assert out.startswith(f"{run.id}  succeeded  shards 7/7  rows {rows}  rejects 0  started ")
    text = (data / "batch" / "metrics.prom").read_text()
    states = {
        s.labels["job"]: s.labels["state"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "featureplane_batch_run_state" and s.value == 1
    }
    assert states == {
        "clicks_parquet": "succeeded",
        "stats_jsonl": "succeeded",
        "rebuild": "succeeded",
    }
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        pushed = resp.read().decode()
    got = {
        (s.labels.get("job"), s.labels.get("instance")): s.value
        for f in text_string_to_metric_families(pushed)
        for s in f.samples
        if s.name == "featureplane_batch_run_state" and s.labels.get("state") == "succeeded"
    }
    host = socket.gethostname()
    assert got == {(j, host): 1.0 for j in ("clicks_parquet", "stats_jsonl", "rebuild")}
    runs.close()


def test_push_shard_reaches_the_pushgateway_and_a_dead_one_is_a_warning(
    pushgateway: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://{pushgateway.address}"
    settings = Settings(pushgateway_url=url, batch_job="nightly_stats")
    metrics.push_shard(settings, (3, 8), ShardResult(120, 2, 5000))
    metrics.push_shard(settings, (4, 8), None, "no such file")
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        pushed = resp.read().decode()
    got = {
        (s.name, s.labels.get("shard")): s.value
        for f in text_string_to_metric_families(pushed)
        for s in f.samples
        if s.labels.get("job") == "nightly_stats"
    }
    assert got[("featureplane_batch_shard_rows_written", "3")] == 120
    assert got[("featureplane_batch_shard_rejects", "3")] == 2
    assert got[("featureplane_batch_shard_done", "3")] == 1
    assert got[("featureplane_batch_shard_done", "4")] == 0
    assert time.time() - 60 < got[("featureplane_batch_shard_last_push_timestamp_seconds", "4")]
    dead = Settings(pushgateway_url=f"http://127.0.0.1:{free_port()}", batch_job="x")
    capsys.readouterr()
    metrics.push_shard(dead, (0, 1), ShardResult(1, 0, 1))
    assert "warning: could not push metrics to the Pushgateway" in capsys.readouterr().err
