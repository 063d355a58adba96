"""Batch benchmark: `load` and `backfill` speed with 1 shard and with `parallelism: auto`,
against the ideal N x single and against `ingest` on the same topic, in one run.

Starts its own tansu broker on a free port; every measurement writes into a fresh
embedded store. Measures:

  1. load of one --rows-row Parquet file (row groups of 100,000): `featureplane load`
     (1 worker), then `featureplane batch run` of a job with `parallelism: auto`
     (--workers = cores), and the ideal: min(N, cores) x the single rate
  2. backfill of --events events on a 4-partition topic: `featureplane backfill`
     (1 worker), `batch run` of a backfill job with `parallelism: auto`, and
     `featureplane ingest` reading the same topic (the streaming path's rate)

Rates count rows (or records) over the command's wall time, start-up included, as a
user sees it. `parallelism: auto` aims at FEATUREPLANE_BATCH_TARGET_DURATION, set to
--target (1m) here: at the default 10m these inputs fit one shard, which auto rightly
picks (fewest pods on Kubernetes) and which would show nothing about scaling.

Run: python bench/batch.py [--rows 2000000] [--events 1000000] [--target 1m]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the service launchers live beside the tests
sys.path.insert(0, str(REPO / "bench"))

from ingest import RULES, Ingest, count_end, make_topic, produce, run_to_end  # noqa: E402

from tests.services import Service, start_tansu  # noqa: E402

CORES = os.cpu_count() or 1
GROUP = """
feature_groups:
  - name: bench_articles
    entity: article
    kind: latest
    features:
      - {name: price, type: float}
      - {name: views, type: int}
      - {name: category, type: string}
      - {name: is_sold, type: bool}
"""
JOBS = """
batch_jobs:
  - name: articles_dump
    load: {group: bench_articles, source: "DUMP"}
    parallelism: auto
  - name: events_rebuild
    backfill: {topic: TOPIC, from: "0", to: now}
    parallelism: BACKFILL_PARALLELISM
"""


def write_parquet(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(5)
    words = "bike sofa desk lamp camera phone shoes jacket guitar stroller".split()
    now = int(time.time() * 1000)
    with pq.ParquetWriter(
        path,
        pa.schema(
            [
                ("id", pa.string()),
                ("ts", pa.int64()),
                ("price", pa.float64()),
                ("views", pa.int64()),
                ("category", pa.string()),
                ("is_sold", pa.bool_()),
            ]
        ),
    ) as w:
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            w.write_table(
                pa.table(
                    {
                        "id": [f"art-{i}" for i in range(start, start + n)],
                        "ts": [now] * n,
                        "price": [round(rng.uniform(1, 900), 2) for _ in range(n)],
                        "views": [rng.randrange(5000) for _ in range(n)],
                        "category": [rng.choice(words) for _ in range(n)],
                        "is_sold": [rng.random() < 0.2 for _ in range(n)],
                    }
                ),
                row_group_size=100_000,
            )


def timed(argv: list[str], env: dict[str, str], log: Path) -> float:
    t = time.perf_counter()
    with log.open("wb") as out:
        code = subprocess.run(
            argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        ).returncode
    elapsed = time.perf_counter() - t
    if code != 0:
        raise SystemExit(
            f"{' '.join(argv[2:6])} failed ({code}); see {log}:\n{log.read_text()[-2000:]}"
        )
    return elapsed


def shards_of(env: dict[str, str], job: str) -> int:
    out = subprocess.run(
        [sys.executable, "-m", "featureplane.cli", "batch", "plan", job, "--json"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    plan = json.loads(out)
    jobs = plan["jobs"] if isinstance(plan, dict) and "jobs" in plan else plan
    entry = next(j for j in jobs if j.get("name", j.get("job")) == job)
    print(f"plan of {job}: {entry.get('reason')}", flush=True)
    return int(entry["shards"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rows", type=int, default=2_000_000, help="Parquet rows [2000000]")
    ap.add_argument("--events", type=int, default=1_000_000, help="events backfilled [1000000]")
    ap.add_argument("--target", default="1m", help="auto's target duration [1m]")
    ap.add_argument(
        "--backfill-parallelism",
        default="auto",
        help="the backfill job's parallelism [auto; tansu answers Kafka's offsets-for-times "
        "lookup with 0 for any time, so auto sees 0 records there and picks 1 shard: give 4 "
        "to see the split]",
    )
    ap.add_argument("--skip-load", action="store_true", help="measure the backfill rows only")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the services

    work = Path(tempfile.mkdtemp(prefix="fp-bench-batch-"))
    services: list[Service] = []
    rows: list[tuple[str, str, str]] = []
    exe = [sys.executable, "-m", "featureplane.cli"]
    try:
        kafka = start_tansu()
        services.append(kafka)
        topic = "bench-batch"
        from confluent_kafka.admin import AdminClient

        make_topic(AdminClient({"bootstrap.servers": kafka.address}), topic)
        spec = work / "spec"
        spec.mkdir()
        shutil.copy(REPO / "examples" / "groups.yaml", spec / "groups.yaml")
        (spec / "bench.yaml").write_text(GROUP)
        (spec / "rules.yaml").write_text(RULES.replace("TOPIC", topic))
        dump = work / "articles.parquet"
        (spec / "jobs.yaml").write_text(
            JOBS.replace("DUMP", str(dump))
            .replace("TOPIC", topic)
            .replace("BACKFILL_PARALLELISM", args.backfill_parallelism)
        )
        t = time.perf_counter()
        write_parquet(dump, args.rows)
        print(
            f"wrote {args.rows:,} rows to {dump} ({dump.stat().st_size / 1e6:.1f} MB) "
            f"in {time.perf_counter() - t:.1f}s",
            flush=True,
        )
        base = {
            **os.environ,
            "FEATUREPLANE_SPEC": str(spec),
            "FEATUREPLANE_KAFKA_BOOTSTRAP": kafka.address,
            "FEATUREPLANE_BATCH_TARGET_DURATION": args.target,
        }

        def env(name: str) -> dict[str, str]:
            return base | {"FEATUREPLANE_DATA_DIR": str(work / f"data-{name}")}

        def single_and_sharded(
            what: str, unit: str, count: int, argv: list[str], job: str, parallelism: str
        ) -> float:
            """One process running `argv`, then `batch run` of `job`: two rows; the single
            rate."""
            single = count / timed([*exe, *argv], env(f"{job}-1"), work / f"{job}-1.log")
            rows.append((f"{what}, 1 worker", f"{single:,.0f} {unit}/s", "-"))
            print(rows[-1], flush=True)
            n = shards_of(env(f"{job}-n"), job)
            run = [*exe, "batch", "run", job, "--workers", str(CORES)]
            sharded = count / timed(run, env(f"{job}-n"), work / f"{job}-n.log")
            ideal = min(n, CORES) * single
            rows.append(
                (
                    f"{what}, {parallelism}: {n} shards on {CORES} workers",
                    f"{sharded:,.0f} {unit}/s",
                    f"{sharded / ideal:.0%} of ideal {ideal:,.0f}",
                )
            )
            print(rows[-1], flush=True)
            return single

        if not args.skip_load:  # 1. load
            load = ["load", "--group", "bench_articles", str(dump)]
            single_and_sharded("load Parquet", "rows", args.rows, load, "articles_dump", "auto")

        # 2. backfill vs ingest
        t = time.perf_counter()
        produce(kafka.address, topic, args.events)
        print(f"produced {args.events:,} events in {time.perf_counter() - t:.1f}s", flush=True)
        end = count_end(kafka.address, topic)
        assert sum(end.values()) == args.events, end
        single = single_and_sharded(
            "backfill",
            "records",
            args.events,
            ["backfill", "--topic", topic, "--from", "0"],
            "events_rebuild",
            args.backfill_parallelism,
        )
        ing = Ingest(
            spec,
            kafka.address,
            "bench-batch-ingest",
            {"FEATUREPLANE_DATA_DIR": str(work / "data-ingest")},
            work / "ingest.log",
        )
        rate, _ = run_to_end(ing, kafka.address, "bench-batch-ingest", topic, end)
        ing.stop()
        rows.append(
            (
                "ingest, same topic (1 process)",
                f"{rate:,.0f} records/s",
                f"backfill 1 worker = {single / rate:.2f}x ingest",
            )
        )
        print(rows[-1], flush=True)
    finally:
        for svc in services:
            svc.stop()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"| batch ({CORES} cores) | rate | compared |")
    print("|---|---|---|")
    for name, rate, note in rows:
        print(f"| {name} | {rate} | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
