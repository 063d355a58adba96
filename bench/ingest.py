"""Ingestion benchmark: events/s of one `featureplane ingest` process, freshness, and the
ceiling of a bare confluent-kafka consumer on the same topic, in one run.

Starts its own tansu broker, redis-server and dynalite on free ports. Pre-produces
--events events (realistic payloads; 70% clicks feeding 3 groups, 20% searches, 10%
keyword changes: 5 groups, M:N) into one 4-partition topic, then measures:

  1. bare consumer: a confluent-kafka consumer reading every record (no decoding)
  2. ingest -> embedded store + Redis (write-through), the whole topic
  3. ingest -> embedded store alone, the first --store-only-events events
  4. ingest -> DynamoDB (dynalite) + Redis, the first --dynamo-events events
  5. freshness (write time - event ts) p50/p99 at fixed --rates events/s for --seconds
  6. 2 ingest processes (one consumer group, the same topic, one embedded store and
     Redis) against 1: the aggregate events/s and the ratio

Throughput counts from the first committed offset to the last, so the consumer-group
join time (3 s on tansu) is excluded; with several processes, from the moment every
partition has a commit and every process has its share. Each row also gives the CPU the
ingest process(es) spent per event over the same span (user + system, all threads), the
figure that stays comparable on a busy machine. Run: python bench/ingest.py [--events N]

A/B in one invocation: `git worktree add /tmp/old <commit>` then `--old /tmp/old`: every
ingest row runs twice back to back, the old tree's ingest first (marked `[old]`), each on
its own consumer group and data directory. `--only` picks rows (bare, embedded, store,
dynamo, fresh, two); `--profile` py-spies each embedded and store-only run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the service launchers live beside the tests

from tests.services import (  # noqa: E402
    Service,
    free_port,
    start_dynalite,
    start_redis,
    start_tansu,
)

PARTITIONS = 4
RULES = """
ingestion:
  - {name: clicks_recent, topic: TOPIC, event_type: click, where: {article.kind: fleaMarket},
     group: recent_user_clicked_fleaMarketArticles, id: user_id,
     features: {article_id: article.id, session_id: session, category: article.category}}
  - {name: clicks_last, topic: TOPIC, event_type: click, group: user_last_click, id: user_id,
     features: {article_id: article.id, category: article.category}}
  - {name: clicks_stats, topic: TOPIC, event_type: click, group: article_stats, id: article.id,
     features: {price: article.price}}
  - {name: searches, topic: TOPIC, event_type: search, group: recent_user_searches,
     id: user_id, features: {query: query, result_count: result_count}}
  - {name: keywords, topic: TOPIC, event_type: keywords_changed,
     group: user_notification_keywords, id: user_id,
     features: {keywords: keywords, updated_by: source}}
"""
WORDS = "bike sofa desk lamp camera phone shoes jacket guitar stroller tent kettle".split()


def event(i: int, ts: int, rng: random.Random) -> tuple[bytes, bytes]:
    user = f"user-{rng.randrange(200_000)}"
    r = rng.random()
    if r < 0.7:
        ev: dict[str, Any] = {
            "event_id": f"ev-{i}",
            "event_type": "click",
            "ts": ts,
            "user_id": user,
            "session": f"sess-{rng.randrange(10**9):09d}",
            "platform": "ios",
            "app_version": "24.3.1",
            "article": {
                "id": f"art-{rng.randrange(10**7)}",
                "kind": "fleaMarket" if rng.random() < 0.8 else "business",
                "category": rng.choice(WORDS),
                "price": round(rng.uniform(1, 500), 2),
                "region": {"id": rng.randrange(5000), "name": "Seocho-dong"},
            },
        }
    elif r < 0.9:
        ev = {
            "event_id": f"ev-{i}",
            "event_type": "search",
            "ts": ts,
            "user_id": user,
            "query": " ".join(rng.sample(WORDS, 2)),
            "result_count": rng.randrange(200),
        }
    else:
        ev = {
            "event_id": f"ev-{i}",
            "event_type": "keywords_changed",
            "ts": ts,
            "user_id": user,
            "keywords": rng.sample(WORDS, 3),
            "source": "app",
        }
    return user.encode(), json.dumps(ev).encode()


def produce(bootstrap: str, topic: str, n: int, rate: float | None = None, seed: int = 1) -> None:
    rng = random.Random(seed)
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "batch.num.messages": 10000,
            "queue.buffering.max.messages": 500_000,
            "compression.type": "lz4",
        }
    )
    start = time.monotonic()
    now = time.time_ns() // 1_000_000
    for i in range(n):
        if rate:
            due = start + i / rate
            if (lag := due - time.monotonic()) > 0:
                time.sleep(lag)
            now = time.time_ns() // 1_000_000
        elif i % 10_000 == 0:
            now = time.time_ns() // 1_000_000
        key, value = event(i, now, rng)
        while True:
            try:
                p.produce(topic, value, key)
                break
            except BufferError:
                p.poll(0.05)
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(120) == 0


def make_topic(admin: AdminClient, name: str) -> None:
    for f in admin.create_topics([NewTopic(name, PARTITIONS, -1)]).values():
        f.result(30)


def count_end(bootstrap: str, topic: str) -> dict[int, int]:
    """End offsets by reading (tansu's ListOffsets answers are not reliable)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-count-{time.time()}",
            "enable.auto.commit": False,
        }
    )
    c.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    last: dict[int, int] = {}
    idle = 0
    while idle < 6:
        batch = c.consume(10_000, 0.5)
        idle = 0 if batch else idle + 1
        for m in batch:
            if m.error() is None:
                last[m.partition()] = m.offset() + 1
    c.close()
    return last


def bare_consumer(bootstrap: str, topic: str, n: int) -> float:
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-bare-{time.time()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
        }
    )
    c.subscribe([topic])
    got, t0 = 0, None
    while got < n:
        batch = c.consume(2000, 1.0)
        if batch and t0 is None:
            t0 = time.perf_counter()
        got += sum(1 for m in batch if m.error() is None)
    assert t0 is not None
    rate = got / (time.perf_counter() - t0)
    c.close()
    return rate


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    got = c.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
    c.close()
    return {tp.partition: max(tp.offset, 0) for tp in got}


_PROCS: list[subprocess.Popen[bytes]] = []


# Runs `featureplane ingest` from another checkout: the editable install's finder maps the
# featureplane packages to this tree, so the old tree's folders are mapped in its place.
_FROM_TREE = """
import sys, __editable___featureplane_0_1_0_finder as f
f.MAPPING.update({k: v.replace(sys.argv[1], sys.argv[2], 1) for k, v in f.MAPPING.items()})
del sys.argv[1:3]
from featureplane.cli import main
sys.exit(main())
"""


class Ingest:
    def __init__(
        self,
        spec: Path,
        bootstrap: str,
        group: str,
        extra: dict[str, str],
        log: Path,
        tree: Path | None = None,
    ) -> None:
        """`tree`: run the ingest of that checkout (an older commit) instead of this one."""
        self.metrics_port = free_port()
        self.log = log
        env = {
            **os.environ,
            "FEATUREPLANE_SPEC": str(spec),
            "FEATUREPLANE_KAFKA_BOOTSTRAP": bootstrap,
            "FEATUREPLANE_KAFKA_GROUP": group,
            "FEATUREPLANE_METRICS_PORT": str(self.metrics_port),
            "FEATUREPLANE_SESSION_TIMEOUT": "6s",
            "FEATUREPLANE_COMMIT_INTERVAL": "200ms",
            **extra,
        }
        cmd = [sys.executable, "-m", "featureplane.cli", "ingest"]
        if tree is not None:
            cmd = [sys.executable, "-c", _FROM_TREE, str(REPO), str(tree), "ingest"]
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=tree or REPO,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        _PROCS.append(self.proc)

    def metric_text(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def all_assigned(ings: list[Ingest], c: dict[int, int]) -> bool:
    """Every partition has a commit and every process reports committed partitions."""
    if len(c) < PARTITIONS or min(c.values()) <= 0:
        return False
    if len(ings) == 1:
        return True
    return all("featureplane_ingest_committed_offset{" in i.metric_text() for i in ings)


def run_to_end(
    ing: Ingest | list[Ingest],
    bootstrap: str,
    group: str,
    topic: str,
    end: dict[int, int],
    profile: Path | None = None,
) -> tuple[float, int, float]:
    """(events/s, events in all, CPU us an event) of a run to the end of `end`."""
    ings = ing if isinstance(ing, list) else [ing]
    total = sum(end.values())
    t0 = None
    base = 0
    cpu0 = 0.0
    spy = None
    while True:
        for i in ings:
            if i.proc.poll() is not None:
                tail = i.log.read_text(errors="replace")[-3000:]
                raise SystemExit(f"ingest exited with {i.proc.returncode}; its log ends:\n{tail}")
        c = committed(bootstrap, group, topic)
        done = sum(min(c.get(p, 0), e) for p, e in end.items())
        started = done > 0 if len(ings) == 1 else done < total and all_assigned(ings, c)
        if t0 is None and started:
            t0, base = time.perf_counter(), done
            cpu0 = sum(cpu_seconds(i.proc.pid) for i in ings)
            spy_bin = shutil.which(
                "py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}"
            )
            if profile and spy_bin:
                spy = subprocess.Popen(
                    [
                        spy_bin,
                        "record",
                        "-d",
                        "20",
                        "-r",
                        "50",
                        "-f",
                        "raw",
                        "-o",
                        str(profile),
                        "-p",
                        str(ings[0].proc.pid),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
        if done >= total:
            break
        time.sleep(0.25)
    if t0 is None:
        raise SystemExit(f"{group}: done before every process had its partitions; more --events")
    elapsed, cpu = time.perf_counter() - t0, sum(cpu_seconds(i.proc.pid) for i in ings) - cpu0
    if spy is not None:
        spy.wait(60)
    n = max(total - base, 1)
    return n / elapsed, total, cpu / n * 1e6


def quantile(text: str, q: float) -> float:
    """histogram_quantile over every group's freshness buckets."""
    buckets: dict[float, float] = {}
    for m in re.finditer(
        r'featureplane_ingest_freshness_seconds_bucket\{[^}]*le="([^"]+)"\} (\S+)', text
    ):
        le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
        buckets[le] = buckets.get(le, 0.0) + float(m.group(2))
    pts = sorted(buckets.items())
    total = pts[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in pts:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-9)
        prev_le, prev_c = le, c
    return pts[-1][0]


def top_frames(profile: Path, n: int = 12) -> list[tuple[str, float]]:
    """Self time by function from a py-spy raw (collapsed stacks) file."""
    if not profile.exists():
        return []
    own: dict[str, int] = {}
    total = 0
    for line in profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        leaf = stack.split(";")[-1]
        own[leaf] = own.get(leaf, 0) + int(count)
        total += int(count)
    return [(k, v / total) for k, v in sorted(own.items(), key=lambda kv: -kv[1])[:n]]


ROWS = ("bare", "embedded", "store", "dynamo", "fresh", "two")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--events", type=int, default=1_000_000, help="events pre-produced [1000000]")
    ap.add_argument(
        "--dynamo-events",
        type=int,
        default=10_000,
        help="events ingested into DynamoDB-local (dynalite is slow) [10000]",
    )
    ap.add_argument(
        "--rates",
        default="10000,2000",
        help="freshness runs, events/s, comma-separated [10000,2000]",
    )
    ap.add_argument(
        "--store-only-events",
        type=int,
        default=200_000,
        help="events ingested into the embedded store without Redis [200000]",
    )
    ap.add_argument("--seconds", type=float, default=20, help="freshness run length [20]")
    ap.add_argument("--batch-size", default="2000", help="ingest batch size [2000]")
    ap.add_argument(
        "--profile", action="store_true", help="py-spy the embedded and store-only runs (20 s)"
    )
    ap.add_argument("--profile-dir", type=Path, help="keep the py-spy raw files there")
    ap.add_argument("--only", default=",".join(ROWS), help=f"rows to run [{','.join(ROWS)}]")
    ap.add_argument(
        "--old",
        type=Path,
        help="a checkout of an older commit (git worktree add): each ingest row runs with "
        "its ingest first, then with this tree's, back to back",
    )
    args = ap.parse_args()
    only = set(args.only.split(","))
    if unknown := only - set(ROWS):
        ap.error(f"--only: unknown rows {sorted(unknown)}; choose from {','.join(ROWS)}")
    trees: list[tuple[str, Path | None]] = [("", None)]
    if args.old is not None:
        trees.insert(0, (" [old]", args.old.resolve()))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the services

    work = Path(tempfile.mkdtemp(prefix="fp-bench-ingest-"))
    services: list[Service] = []
    rows: list[tuple[str, str, str]] = []

    def row(name: str, rate: str, what: str) -> None:
        rows.append((name, rate, what))
        print(rows[-1], flush=True)

    try:
        kafka = start_tansu()
        redis = start_redis()
        dyn = start_dynalite()
        services += [kafka, redis, dyn]
        bs = kafka.address
        redis_url = f"redis://{redis.address}/0"
        admin = AdminClient({"bootstrap.servers": bs})

        def spec_for(t: str) -> Path:
            d = work / f"spec-{t}"
            d.mkdir(exist_ok=True)
            # the old tree's groups when comparing: both trees' spec parsers accept them
            shutil.copy((args.old or REPO) / "examples" / "groups.yaml", d / "groups.yaml")
            (d / "rules.yaml").write_text(RULES.replace("TOPIC", t))
            return d

        def topic_of(name: str, n: int, seed: int) -> dict[int, int]:
            """A new topic of `n` produced events; its end offsets."""
            make_topic(admin, name)
            t = time.perf_counter()
            produce(bs, name, n, seed=seed)
            print(f"{name}: produced {n:,} events in {time.perf_counter() - t:.1f}s", flush=True)
            end = count_end(bs, name)
            assert sum(end.values()) == n, end
            return end

        def ingest(
            tag: str, topic: str, end: dict[int, int], env: dict[str, str], tree: Path | None
        ) -> tuple[float, int, float]:
            """One ingest process over `topic` to `end`: (events/s, events, CPU us an event)."""
            group = f"bench-{tag}-{len(rows)}"
            extra = {"FEATUREPLANE_BATCH_SIZE": args.batch_size, **env}
            if "FEATUREPLANE_DATA_DIR" in extra:
                extra["FEATUREPLANE_DATA_DIR"] += f"-{len(rows)}"
            ing = Ingest(spec_for(topic), bs, group, extra, work / f"{group}.log", tree)
            prof = (
                work / f"{group}.profile" if args.profile and tag in ("embedded", "store") else None
            )
            try:
                return run_to_end(ing, bs, group, topic, end, prof)
            finally:
                ing.stop()
                if prof is not None and args.profile_dir and prof.exists():
                    args.profile_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copy(prof, args.profile_dir / prof.name)
                if prof is not None:
                    print(f"profile of {group} (self time, top frames):")
                    for frame, share in top_frames(prof):
                        print(f"  {share * 100:5.1f}%  {frame}", flush=True)

        topic = "bench-events"
        end = topic_of(topic, args.events, 1)
        if "bare" in only:
            rate = bare_consumer(bs, topic, args.events)
            row("bare confluent-kafka consumer (ceiling)", f"{rate:,.0f}", "-")

        one_process: float | None = None
        if "embedded" in only:
            for mark, tree in trees:
                env = {
                    "FEATUREPLANE_DATA_DIR": str(work / "data"),
                    "FEATUREPLANE_REDIS_URL": redis_url,
                }
                rate, _, cpu = ingest("embedded", topic, end, env, tree)
                one_process = rate
                row(
                    f"ingest -> embedded store + Redis{mark}",
                    f"{rate:,.0f}",
                    f"cpu {cpu:.0f} us/ev",
                )

        if "store" in only:  # the store path alone, on its own topic
            store_end = topic_of("bench-store-only", args.store_only_events, 3)
            for mark, tree in trees:
                env = {"FEATUREPLANE_DATA_DIR": str(work / "data-store-only")}
                rate, n, cpu = ingest("store", "bench-store-only", store_end, env, tree)
                row(
                    f"ingest -> embedded store only (no Redis), {n:,} events{mark}",
                    f"{rate:,.0f}",
                    f"cpu {cpu:.0f} us/ev",
                )

        if "dynamo" in only:
            dyn_end = topic_of("bench-dynamo", args.dynamo_events, 4)
            env = {
                "FEATUREPLANE_STORE": "dynamodb",
                "FEATUREPLANE_DYNAMODB_ENDPOINT": f"http://{dyn.address}",
                "FEATUREPLANE_REDIS_URL": redis_url,
                "AWS_ACCESS_KEY_ID": "x",
                "AWS_SECRET_ACCESS_KEY": "x",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
            for mark, tree in trees:
                rate, n, cpu = ingest("dynamo", "bench-dynamo", dyn_end, env, tree)
                row(
                    f"ingest -> DynamoDB (dynalite) + Redis, {n:,} events{mark}",
                    f"{rate:,.0f}",
                    f"cpu {cpu:.0f} us/ev",
                )

        for k, rate_s in enumerate(args.rates.split(",") if "fresh" in only else []):
            fr = float(rate_s)
            for mark, tree in trees:
                ft = f"bench-fresh-{k}-{len(rows)}"
                make_topic(admin, ft)
                group = f"bench-fresh-{len(rows)}"
                ing = Ingest(
                    spec_for(ft),
                    bs,
                    group,
                    {
                        "FEATUREPLANE_DATA_DIR": str(work / f"data-fresh-{len(rows)}"),
                        "FEATUREPLANE_REDIS_URL": redis_url,
                    },
                    work / f"{group}.log",
                    tree,
                )
                time.sleep(8)  # join the group before the clock starts
                produce(bs, ft, int(fr * args.seconds), rate=fr, seed=2 + k)
                run_to_end(ing, bs, group, ft, count_end(bs, ft))
                text = ing.metric_text()
                ing.stop()
                p50, p99 = quantile(text, 0.5), quantile(text, 0.99)
                row(
                    f"freshness at {fr:,.0f} ev/s for {args.seconds:.0f}s, embedded + Redis{mark}",
                    f"{fr:,.0f}",
                    f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms",
                )

        # 2 processes in one group on the whole topic, sharing one embedded store and Redis
        for mark, tree in trees if "two" in only else []:
            group = f"bench-two-{len(rows)}"
            shared = {
                "FEATUREPLANE_DATA_DIR": str(work / f"data-two-{len(rows)}"),
                "FEATUREPLANE_REDIS_URL": redis_url,
                "FEATUREPLANE_BATCH_SIZE": args.batch_size,
            }
            two = [
                Ingest(spec_for(topic), bs, group, shared, work / f"{group}-{k}.log", tree)
                for k in range(2)
            ]
            rate, _, cpu = run_to_end(two, bs, group, topic, end)
            for i in two:
                i.stop()
            vs = f"; {rate / one_process:.2f}x 1 process" if one_process else ""
            row(
                f"ingest -> embedded + Redis, 2 processes (1 group){mark}",
                f"{rate:,.0f}",
                f"cpu {cpu:.0f} us/ev{vs}",
            )

        print()
        print(f"{'run':<58} {'events/s':>10}  CPU an event / freshness")
        print("-" * 106)
        for name, r, f in rows:
            print(f"{name:<58} {r:>10}  {f}")
    finally:
        for proc in _PROCS:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for s in services:
            s.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
